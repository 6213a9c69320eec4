"""Turn the config's stage list into an execution plan of segments.

A segment is a run of map stages, optionally closed by one global stage (a decision over the whole
dataset). Every engine executes the same plan: segment i's map stages and the signatures of its global
stage run per batch; the engine aggregates the signatures and decides; segment i+1 starts by applying
those decisions. The last segment ends in the writers.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from vila2_curate.schemas.config import RunConfig
from vila2_curate.schemas.registry import expand_stage
from vila2_curate.schemas.stage import GlobalStage, Stage


@dataclass
class Segment:
    index: int
    maps: list[Stage] = field(default_factory=list)
    global_stage: GlobalStage | None = None  # the segment's closing decision (None: the last segment)

    @property
    def stages(self) -> list:
        return [*self.maps, *([self.global_stage] if self.global_stage else [])]


@dataclass
class Plan:
    segments: list[Segment]
    config_hash: str
    stage_versions: dict[str, str]
    inputs_hash: str = ""  # set by the engine from the listed input shards
    sidecars: dict = field(default_factory=dict)  # sidecar folder -> row -> text (pipelines.io.sidecar_plan)

    def set_inputs(self, shard_paths: list[str]) -> None:
        self.inputs_hash = hashlib.sha256("\n".join(sorted(shard_paths)).encode()).hexdigest()[:16]

    @property
    def plan_hash(self) -> str:
        return self.segment_hash(len(self.segments) - 1)

    def segment_hash(self, index: int) -> str:
        """Changes when anything up to and including segment ``index`` changes (its work is then redone)."""
        names = [f"{s.name}@{s.version}" for seg in self.segments[: index + 1] for s in seg.stages]
        payload = [self.config_hash, self.inputs_hash, names]
        return hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:16]


def is_global(stage: object) -> bool:
    return isinstance(stage, GlobalStage)


def build_plan(config: RunConfig) -> Plan:
    stages = [s for c in config.stages for s in expand_stage(c)]
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        # stage names key timings, markers and drop_stage; give repeated stages distinct names
        seen: dict[str, int] = {}
        for s in stages:
            n = seen.get(s.name, 0)
            seen[s.name] = n + 1
            if n:
                s.name = f"{s.name}_{n + 1}"
    for i, s in enumerate(stages):  # caption hygiene may keep empty captions only for a later recaption
        s.recaption_follows = any(t.writes_captions for t in stages[i + 1:])
    segments = [Segment(0)]
    for s in stages:
        if is_global(s):
            segments[-1].global_stage = s
            segments.append(Segment(len(segments)))
        else:
            segments[-1].maps.append(s)
    for seg in segments:  # the thumbnail column does not outlive its segment (workdir.slim_for_work)
        for i, s in enumerate(seg.stages):
            s.thumbnails_follow = any(t.uses_thumbnails for t in seg.stages[i + 1:])
    from vila2_curate.pipelines.io.sidecar_plan import plan_sidecars

    return Plan(segments, config.config_hash(), {s.name: s.version for s in stages},
                sidecars=plan_sidecars(stages))


def set_run_started_at(plan: Plan, started_at: str) -> None:
    """Give stages that timestamp their output (caption lineage) the run's recorded start time, so a
    resumed run writes the same bytes as an uninterrupted one."""
    for segment in plan.segments:
        for stage in segment.stages:
            stage.run_started_at = started_at
