"""Ray Data engine: the scale-out executor. The segment loop is the runner's; this file supplies:

- map shards: a segment without model stages runs as one Ray task per pending shard, start to end, the
  local engine's path (``exchange.RunShard``: no exchange). A segment with model stages is a Ray Data
  pipeline: read tasks (one shard per call, rows tagged with their ``_row``; each loads only its own
  decisions), each map stage as ``map_batches`` (model stages as actor pools with the stage's declared
  ``num_gpus``/``num_cpus`` — fractional GPUs co-locate stages — and ``setup()`` once per actor; CPU
  stages as tasks, fused with the reader) writing image-free part files; a Ray task per shard assembles
  its parts in reading order into the same outputs the local engine writes (``parts``). Same inputs ->
  byte-identical shards to the local engine's.
- group and apply: a hash shuffle of Ray tasks (per shard: load and cut the rows among the reducers;
  per reducer: ``fn`` per group value); only ``fn``'s outputs come back.
- per shard: one Ray task per shard.
"""

from __future__ import annotations

import json
import logging
import os
import zlib
from collections.abc import Callable
from typing import Any

import pyarrow as pa

from vila2_curate.pipelines.engine.aggregate import group_order, split_by_key
from vila2_curate.pipelines.engine.exchange import (
    RunShard,
    assemble_shard,
    clear_parts,
    clear_segment_parts,
    run_stage,
    runs_whole_shards,
    tagged_batches,
    uses_model,
    write_parts,
)
from vila2_curate.pipelines.engine.plan import Segment
from vila2_curate.pipelines.engine.runner import RunContext, WorkItem, run_engine
from vila2_curate.pipelines.engine.shard_task import is_rereadable
from vila2_curate.schemas.config import RunConfig
from vila2_curate.schemas.stage import Resources

log = logging.getLogger(__name__)


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to the cluster at ``address`` / RAY_ADDRESS, or start a local one when there is none."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, ignore_reinit_error=True)


def ray_options(resources: Resources) -> dict[str, Any]:
    """A stage's declared resources as Ray task/actor options."""
    opts: dict[str, Any] = {"num_cpus": resources.cpus}
    if resources.gpus:
        opts["num_gpus"] = resources.gpus
    if resources.memory_gb:
        opts["memory"] = int(resources.memory_gb * 1024**3)
    return opts

def _read_shards(batch: pa.Table, ctx: RunContext, seg: int):
    """Read one shard per call, each with its own decisions of the previous segment. A task, so Ray Data
    fuses it with the CPU stages and the part writing that follow: a shard's rows then go through the
    segment in one worker, with no copy through the object store between operators."""
    for idx in batch.column("item").to_pylist():
        yield from tagged_batches(ctx.fs, ctx.root, ctx.plan, ctx.items[idx], seg, ctx.config.batch_size)


class _StageActor:
    """A model stage in an actor pool: ``setup()`` (model load) once per actor."""

    def __init__(self, stage: Any) -> None:
        self.stage = stage
        stage.setup()

    def __call__(self, batch: pa.Table) -> pa.Table:
        return run_stage(self.stage, batch)


def _stage_task(batch: pa.Table, stage: Any) -> pa.Table:
    stage.setup()  # model-free stages: setup is cheap
    return run_stage(stage, batch)


def _write_parts_task(batch: pa.Table, fs, root: str, segment: Segment, shards: list,
                      rereadable: list[bool]) -> pa.Table:
    # descriptions travel as JSON strings: their timings dicts have no fixed set of keys
    parts = write_parts(fs, root, segment, batch, shards, rereadable)
    return pa.table({"part": [json.dumps(p) for p in parts]})


def _load_split(load: Callable[[WorkItem], pa.Table | None], item: WorkItem, key: str | None,
                reducers: int) -> list[list[tuple[Any, pa.Table]]] | list[tuple[Any, pa.Table]]:
    """One shard's (group value, rows) pieces by reducer (``value % reducers`` for integers, else a stable
    hash); kept apart, so a reducer meets each group's pieces whole and never re-splits its input."""
    rows = load(item)
    out: list[list[tuple[Any, pa.Table]]] = [[] for _ in range(reducers)]
    if rows is not None and rows.num_rows:
        for value, part in split_by_key(rows, key):
            out[_reducer(value, reducers)].append((value, part))
    return out[0] if reducers == 1 else out


def _reducer(value: Any, reducers: int) -> int:
    if isinstance(value, int):
        return value % reducers
    return zlib.crc32(repr(value).encode()) % reducers  # not hash(): salted per process


def _reduce_groups(fn: Callable[[pa.Table], pa.Table], key: str | None,
                   *shards: list[tuple[Any, pa.Table]]) -> list[pa.Table]:
    """``fn`` per group of this reducer, one group at a time: a reducer gets many groups when there are
    more groups than reducers, and only one of them is ever concatenated."""
    pieces: dict[Any, list[pa.Table]] = {}
    for shard in shards:
        for value, part in shard:
            if part.num_rows:
                pieces.setdefault(value, []).append(part)
    results = (fn(pa.concat_tables(pieces.pop(v), promote_options="default")) for v in group_order(list(pieces)))
    return [r for r in results if r is not None and r.num_rows]


def _call(fn: Callable[[WorkItem], Any], item: WorkItem) -> Any:
    return fn(item)


def _cluster_cpus(ray) -> int:
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


class RayEngine:
    def __init__(self, progress: bool = True) -> None:
        import ray

        self.ray = ray
        ray.data.DataContext.get_current().enable_progress_bars = progress

    def map_shards(self, ctx: RunContext, segment: Segment, pending: list[WorkItem]) -> None:
        """Pair rows and MMC4 documents go through separate datasets: Ray Data concatenates blocks into
        batches across shards, and a batch must hold one row schema."""
        ray, seg = self.ray, segment.index
        if runs_whole_shards(segment):
            self.per_shard(ctx, pending, RunShard(ctx.fs, ctx.root, ctx.plan, segment, ctx.config.output,
                                                  ctx.config.batch_size))
            return
        for it in pending:
            clear_parts(ctx.fs, ctx.root, seg, it.shard)
        parts: dict[int, list[dict]] = {it.index: [] for it in pending}
        for kind in sorted({it.shard.row_kind for it in pending}):
            subset = [it for it in pending if it.shard.row_kind == kind]
            for row in self._map_dataset(ctx, segment, subset).take_all():
                part = json.loads(row["part"])
                parts[part["shard_index"]].append(part)

        @ray.remote(num_cpus=1)
        def assemble(ctx, seg, item, parts):
            return assemble_shard(ctx.fs, ctx.root, ctx.plan, seg, item, parts, ctx.config.output,
                                  ctx.config.batch_size)

        ctx_ref = ray.put(ctx)
        ray.get([assemble.remote(ctx_ref, seg, it, parts[it.index]) for it in pending])
        clear_segment_parts(ctx.fs, ctx.root, seg)

    def _map_dataset(self, ctx: RunContext, segment: Segment, pending: list[WorkItem]):
        ray, config = self.ray, ctx.config
        n = len(pending)
        ds = ray.data.from_items([{"item": it.index} for it in pending], override_num_blocks=n)
        ds = ds.map_batches(_read_shards, batch_size=1, batch_format="pyarrow",
                            fn_kwargs={"ctx": ctx, "seg": segment.index}, num_cpus=1)
        for stage in segment.maps:
            opts = ray_options(stage.resources)
            batch_size = stage.batch_size or config.batch_size
            if uses_model(stage):
                ds = ds.map_batches(_StageActor, fn_constructor_args=(stage,), batch_size=batch_size,
                                    batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=stage.workers),
                                    **opts)
            else:
                ds = ds.map_batches(_stage_task, fn_kwargs={"stage": stage}, batch_size=batch_size,
                                    batch_format="pyarrow", **opts)
        return ds.map_batches(_write_parts_task, batch_size=None, batch_format="pyarrow",
                              fn_kwargs={"fs": ctx.fs, "root": ctx.root, "segment": segment,
                                         "shards": [it.shard for it in ctx.items],
                                         "rereadable": [is_rereadable(it.reader) for it in ctx.items]})

    def group_apply(self, ctx: RunContext, items: list[WorkItem], load: Callable[[WorkItem], pa.Table | None],
                    key: str | None, fn: Callable[[pa.Table], pa.Table]) -> list[pa.Table]:
        """A hash shuffle of Ray tasks: each shard's load splits its rows among the reducers, each reducer
        calls ``fn`` per group value. Plain tasks, not a Ray Data ``groupby``: the combine on the engine
        runs a dozen of these in a row, and a Data pipeline costs seconds each to plan and start (and
        fails on a reduce partition that gets no rows)."""
        ray = self.ray
        reducers = 1 if key is None else max(1, min(2 * _cluster_cpus(ray), 64))
        split = ray.remote(num_cpus=1, num_returns=reducers)(_load_split)
        reduce = ray.remote(num_cpus=1)(_reduce_groups)
        load_ref, fn_ref = ray.put(load), ray.put(fn)
        outs = [split.remote(load_ref, it, key, reducers) for it in items]
        if reducers == 1:
            outs = [[o] for o in outs]
        results = ray.get([reduce.remote(fn_ref, key, *[o[r] for o in outs]) for r in range(reducers)])
        return [t for part in results for t in part]

    def decide_groups(self, ctx: RunContext) -> int:
        return 2 * _cluster_cpus(self.ray)  # a few groups per CPU evens out unequal group sizes

    def per_shard(self, ctx: RunContext, items: list[WorkItem], fn: Callable[[WorkItem], Any]) -> list[Any]:
        ray = self.ray
        task = ray.remote(num_cpus=1)(_call)
        fn_ref = ray.put(fn)
        return ray.get([task.remote(fn_ref, it) for it in items])


def run_ray(config: RunConfig, *, progress: bool = True, address: str | None = None) -> dict[str, Any]:
    ensure_ray(address)
    from vila2_curate.pipelines.engine.plan import build_plan
    from vila2_curate.pipelines.executors.ray_placement import check_placement

    check_placement(build_plan(config), config.ray.placement_timeout_s)  # a plan Ray cannot place waits forever
    return run_engine(RayEngine(progress), config)
