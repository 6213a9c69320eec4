"""Every marker a run leaves, and the timings they carry: what a rerun reads to skip finished work.

* ``_progress/<source>/<shard_id>.json``: the shard is finished (the last segment wrote its output);
  its stats, output files, config and plan hashes, and its timings over the whole plan (``ShardResult``).
* ``_progress/run.json``: the run's recorded start time, per plan (a resumed run reuses it).
* ``_work/seg{i}/<source>.<shard_id>.done.json``: segment i's map side is done for the shard (its
  rows and signatures are written), with the segment hash and the shard's timings of that segment.
* ``_work/seg{i}/decided.json``: segment i's global stage has decided (every shard's decisions are
  written), with the segment hash and the decide's timings.
* Per-shard decision parquet files carry the segment hash in their metadata (``workdir``), so a file of
  another configuration is refused.

Every marker is written atomically and last, after what it vouches for; an unreadable one means "not
done". ``segment_done`` is the one answer to "is segment i done for shard s".
"""

from __future__ import annotations

import datetime
import json
import posixpath
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from vila2_curate.pipelines.engine.workdir import done_path, seg_dir
from vila2_curate.pipelines.io.readers.base import InputShard
from vila2_curate.pipelines.io.writers.atomic import OutputFile, write_json_atomic
from vila2_curate.schemas.records import ShardStats

PROGRESS_DIR = "_progress"

# step -> {rows, seconds, cpu_seconds, gpu_seconds}; cpu_seconds is the process CPU of map-side steps (a
# global decide's CPU is spread over the engine's workers: its entry holds wall seconds only)
Timings = dict[str, dict[str, float]]


# ---- timings ---------------------------------------------------------------------------------------------
def add_timing(timings: Timings, name: str, rows: int, seconds: float, gpus: float = 0.0,
               cpu_seconds: float = 0.0) -> None:
    """Add one step's rows, wall seconds, CPU seconds and GPU-seconds (wall at ``gpus`` GPUs) to ``timings``."""
    acc = timings.setdefault(name, {"rows": 0, "seconds": 0.0, "cpu_seconds": 0.0, "gpu_seconds": 0.0})
    acc["rows"] += rows
    acc["seconds"] += seconds
    acc["cpu_seconds"] = acc.get("cpu_seconds", 0.0) + cpu_seconds
    acc["gpu_seconds"] = acc.get("gpu_seconds", 0.0) + seconds * gpus


class Stopwatch:
    """Wall and process CPU seconds since it started. On a shared node other processes (an engine's own
    daemons, neighbours) stretch a step's wall time but not the CPU time it computed: both are kept."""

    __slots__ = ("cpu", "wall")

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def elapsed(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, time.process_time() - self.cpu

    def add_to(self, timings: Timings, name: str, rows: int, gpus: float = 0.0) -> None:
        seconds, cpu = self.elapsed()
        add_timing(timings, name, rows, seconds, gpus, cpu)


def merge_timings(parts: Iterable[dict[str, Any] | None]) -> Timings:
    """The step-by-step sum of several timings (shards, segments, parts)."""
    total: Timings = {}
    for p in parts:
        for k, v in (p or {}).items():
            add_timing(total, k, int(v.get("rows", 0)), float(v.get("seconds", 0.0)),
                       cpu_seconds=float(v.get("cpu_seconds", 0.0)))
            total[k]["gpu_seconds"] += float(v.get("gpu_seconds", 0.0))
    return total


# ---- the shard's final marker ----------------------------------------------------------------------------
@dataclass
class ShardResult:
    shard: InputShard
    stats: ShardStats
    files: list[OutputFile]
    config_hash: str
    stage_versions: dict[str, str]
    timings: Timings = field(default_factory=dict)  # stage -> {rows, seconds, gpu_seconds}
    plan_hash: str = ""  # config + stage versions + the set of input shards (global decisions depend on it)

    def to_json(self) -> dict[str, Any]:
        return {
            "shard": {"source": self.shard.source, "shard_id": self.shard.shard_id, "path": self.shard.path,
                      "kind": self.shard.kind, "row_kind": self.shard.row_kind},
            "stats": self.stats.model_dump(),
            "files": [f.__dict__ for f in self.files],
            "config_hash": self.config_hash,
            "stage_versions": self.stage_versions,
            "timings": self.timings,
            "plan_hash": self.plan_hash,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> ShardResult:
        return cls(shard=InputShard(**obj["shard"]), stats=ShardStats(**obj["stats"]),
                   files=[OutputFile(**f) for f in obj["files"]], config_hash=obj["config_hash"],
                   stage_versions=obj["stage_versions"], timings=obj.get("timings", {}),
                   plan_hash=obj.get("plan_hash", ""))


def marker_path(root: str, shard: InputShard) -> str:
    return posixpath.join(root, PROGRESS_DIR, shard.source, f"{shard.shard_id}.json")


def write_marker(fs, root: str, result: ShardResult) -> None:
    write_json_atomic(fs, marker_path(root, result.shard), result.to_json())


def load_marker(fs, root: str, shard: InputShard) -> ShardResult | None:
    obj = _read_json(fs, marker_path(root, shard))
    try:
        return ShardResult.from_json(obj) if obj is not None else None
    except (KeyError, TypeError):
        return None  # an unreadable marker means "not finished": the shard is redone


def is_finished(fs, root: str, shard: InputShard, plan_hash: str) -> bool:
    """The shard's output is written under this plan (config, stage versions, input shards)."""
    res = load_marker(fs, root, shard)
    return bool(res and res.plan_hash == plan_hash and res.shard.path == shard.path)


def remove_stale_outputs(fs, root: str, shard: InputShard) -> None:
    """Before redoing a shard under a new config, remove the files its old marker listed, then the marker."""
    res = load_marker(fs, root, shard)
    if res is None:
        return
    for f in res.files:
        for path in _file_and_companions(root, f.relpath):
            if fs.exists(path):
                fs.rm(path)
    fs.rm(marker_path(root, shard))


def _file_and_companions(root: str, relpath: str) -> list[str]:
    path = posixpath.join(root, relpath)
    return [path, path[: -len(".pkl")] + ".count"] if relpath.endswith(".pkl") else [path]


# ---- the run's start time --------------------------------------------------------------------------------
def run_started_at(fs, root: str, plan_hash: str) -> str:
    """The run's start time, recorded once per plan: a resumed run reuses it, so timestamps in caption
    lineage (and with them the shards) come out identical to an uninterrupted run."""
    path = posixpath.join(root, PROGRESS_DIR, "run.json")
    rec = _read_json(fs, path)
    if rec is not None and rec.get("plan_hash") == plan_hash and "started_at" in rec:
        return rec["started_at"]
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    write_json_atomic(fs, path, {"plan_hash": plan_hash, "started_at": now})
    return now


# ---- segments ----------------------------------------------------------------------------------------------
def write_segment_done(fs, root: str, seg: int, shard: InputShard, seg_hash: str, rows: int,
                       timings: Timings) -> None:
    """Segment ``seg``'s map side is done for ``shard`` (its rows and signatures are committed)."""
    write_json_atomic(fs, done_path(root, seg, shard), {"segment_hash": seg_hash, "rows": rows, "timings": timings})


def segment_timings(fs, root: str, seg: int, shard: InputShard) -> Timings:
    """The shard's timings of segment ``seg``'s map side ({} when it left none)."""
    return (_read_json(fs, done_path(root, seg, shard)) or {}).get("timings") or {}


def segment_done(fs, root: str, plan: Any, seg: int, shard: InputShard) -> bool:
    """Segment ``seg`` of ``plan`` is done for ``shard``: its output is final (the last segment) or its
    rows and signatures are committed under the segment's hash (an earlier one)."""
    if seg == len(plan.segments) - 1:
        return is_finished(fs, root, shard, plan.plan_hash)
    rec = _read_json(fs, done_path(root, seg, shard)) or {}
    return rec.get("segment_hash") == plan.segment_hash(seg)


def decided_path(root: str, seg: int) -> str:
    return posixpath.join(seg_dir(root, seg), "decided.json")


def write_decided(fs, root: str, seg: int, seg_hash: str, decisions: int, shards: int, timings: Timings) -> None:
    """The segment's commit point, written after every shard's decisions."""
    write_json_atomic(fs, decided_path(root, seg), {"segment_hash": seg_hash, "decisions": decisions,
                                                    "shards": shards, "timings": timings})


def is_decided(fs, root: str, seg: int, seg_hash: str) -> bool:
    return (_read_json(fs, decided_path(root, seg)) or {}).get("segment_hash") == seg_hash


def decide_timings(fs, root: str, plan: Any) -> Timings:
    """Each global stage's decide (all its steps, on whatever engine): seconds and signatures, from the
    segment markers, so a resumed run reports the decide it reused."""
    out: Timings = {}
    for segment in plan.segments:
        if segment.global_stage is not None:
            out.update((_read_json(fs, decided_path(root, segment.index)) or {}).get("timings") or {})
    return out


def _read_json(fs, path: str) -> dict[str, Any] | None:
    """A marker's object; None when it is absent or unreadable (both mean "not done")."""
    if not fs.exists(path):
        return None
    try:
        with fs.open(path, "rb") as f:
            obj = json.load(f)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None
