"""Local engine: in-process, shard by shard, with a progress bar. The embedded default and the test engine.

The segment loop is the runner's (``pipelines.engine.runner``); this file supplies its primitives:
map shards one after another, group with a dict, call per shard in a loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import fsspec
import pyarrow as pa
from tqdm import tqdm

from vila2_curate.pipelines.engine.aggregate import group_order, split_by_key
from vila2_curate.pipelines.engine.plan import Plan, Segment
from vila2_curate.pipelines.engine.runner import (
    DEFAULT_PARTITIONS,
    RunContext,
    WorkItem,
    decide_signatures,
    list_work,
    plan_summaries,
    prepare_run,
    remove_temp_files,
    run_engine,
    run_info,
)
from vila2_curate.pipelines.engine.shard_task import run_shard_segment
from vila2_curate.pipelines.engine.workdir import read_shard_decisions, write_signatures
from vila2_curate.pipelines.io.readers.base import InputShard
from vila2_curate.schemas.config import BeamOptions, RayOptions, RunConfig

# the CLI, tests and other engines import these from here
__all__ = ["LocalEngine", "RunContext", "WorkItem", "decide_in_process", "list_work", "plan_summaries",
           "prepare_run", "remove_temp_files", "run_info", "run_local", "signature_context"]


class _Progress:
    """One bar per segment: shards done (for the ETA) plus rows/s and kept % in the postfix."""

    def __init__(self, total: int, desc: str, enabled: bool) -> None:
        self.bar = tqdm(total=total, unit="shard", desc=desc, disable=not enabled, dynamic_ncols=True)
        self.rows = self.kept = 0
        self.started = time.perf_counter()

    def on_batch(self, n: int, k: int) -> None:
        self.rows, self.kept = self.rows + n, self.kept + k
        rate = self.rows / max(time.perf_counter() - self.started, 1e-9)
        self.bar.set_postfix_str(f"{rate:,.0f} rows/s" + (f", kept {100 * self.kept / self.rows:.1f}%"
                                                          if self.kept else ""))


class LocalEngine:
    """``max_shards`` stops (InterruptedError) once that many shard-segments were processed: a test hook
    that simulates an interrupted run at a deterministic point."""

    def __init__(self, progress: bool = True, max_shards: int | None = None) -> None:
        self.progress, self.budget = progress, max_shards
        self._set_up: set[int] = set()

    def map_shards(self, ctx: RunContext, segment: Segment, pending: list[WorkItem]) -> None:
        for stage in segment.stages:
            if id(stage) not in self._set_up:  # models load once per run, only for segments with work
                stage.setup()
                self._set_up.add(id(stage))
        desc = "write" if segment.global_stage is None else f"segment {segment.index} -> {segment.global_stage.name}"
        bar = _Progress(len(pending), desc, self.progress)
        for it in pending:
            if self.budget is not None:
                if self.budget <= 0:
                    raise InterruptedError("stopped by max_shards")
                self.budget -= 1
            run_shard_segment(ctx.fs, ctx.root, ctx.plan, segment, it.reader, it.shard, ctx.config.output,
                              ctx.config.batch_size, on_batch=bar.on_batch)
            bar.bar.update(1)
        bar.bar.close()

    def group_apply(self, ctx: RunContext, items: list[WorkItem], load: Callable[[WorkItem], pa.Table | None],
                    key: str | None, fn: Callable[[pa.Table], pa.Table]) -> list[pa.Table]:
        # in one process: the local engine is for runs that fit one machine
        groups: dict[Any, list[pa.Table]] = {}
        for it in items:
            rows = load(it)
            if rows is not None:
                for value, part in split_by_key(rows, key):
                    groups.setdefault(value, []).append(part)
        return [fn(pa.concat_tables(groups.pop(v), promote_options="default")) for v in group_order(list(groups))]

    def decide_groups(self, ctx: RunContext) -> int:
        return DEFAULT_PARTITIONS

    def per_shard(self, ctx: RunContext, items: list[WorkItem], fn: Callable[[WorkItem], Any]) -> list[Any]:
        return [fn(it) for it in items]


def run_local(config: RunConfig, *, progress: bool = True, max_shards: int | None = None,
              plan: Plan | None = None) -> dict[str, Any]:
    """Run every source through the plan in this process; returns the merged stats. ``plan``: a prepared
    plan (default: the config's)."""
    return run_engine(LocalEngine(progress, max_shards), config, plan)


def decide_in_process(stage: Any, shard_signatures: Sequence[tuple[str, pa.Table]], root: str, *,
                      partitioned: bool = True, partitions: int | None = None,
                      engine: Any = None) -> tuple[dict[str, pa.Table], dict[str, Any]]:
    """A global stage's decide over given signature tables (``"<source>/<shard_id>"`` -> table), by the
    runner's own steps (``runner.decide_signatures``) on ``engine`` (default: the local engine, in this
    process), with ``root`` as the run folder and ``partitions`` step-2 groups (default: the engine's).
    Returns (shard -> its decisions, what the summary adds).
    The tests' and benchmarks' way to run the path that production runs, on synthetic signatures."""
    ctx = signature_context(shard_signatures, root)
    _, extra = decide_signatures(engine or LocalEngine(progress=False), ctx, 0, "in-process", stage, partitioned,
                                 partitions)
    return {name: read_shard_decisions(ctx.fs, root, 0, it.shard)
            for (name, _), it in zip(shard_signatures, ctx.items, strict=True)}, extra


def signature_context(shard_signatures: Sequence[tuple[str, pa.Table]], root: str) -> RunContext:
    """A run folder at ``root`` holding the given shards' signatures of segment 0, as a segment's map side
    leaves them, and the context the decide steps read (its shards; no plan)."""
    fs = fsspec.filesystem("file")
    items = []
    for i, (name, sig) in enumerate(shard_signatures):
        source, shard_id = name.split("/", 1)
        item = WorkItem(i, None, InputShard(source, shard_id, f"in/{i}", "coyo_parquet", "pair"))
        write_signatures(fs, root, 0, item.shard, [sig])
        items.append(item)
    return RunContext(fs, root, None, RunConfig.model_construct(beam=BeamOptions(), ray=RayOptions()), items)
