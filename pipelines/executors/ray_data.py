"""Ray Data engine: the scale-out executor.

Per plan segment: a Ray Data pipeline reads the pending input shards (reader actors, one shard per
call, rows tagged with their ``_row``), runs each map stage as ``map_batches`` (model stages as actor
pools with the stage's declared ``num_gpus``/``num_cpus`` — fractional GPUs co-locate stages — and
``setup()`` called once per actor; CPU stages as tasks), and writes part files; a Ray task per shard
assembles its parts in reading order into the same outputs the local engine writes. Global decisions
aggregate the signatures with Ray Data's ``groupby(...).map_groups`` (one group when the stage has no
``group_by``). Same inputs -> same decisions and byte-identical shards as the local engine.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import pyarrow as pa

from curation.decisions import index_decisions
from pipelines.aggregate import normalize_decisions
from pipelines.executors.local import plan_summaries, prepare_run, run_info, write_segment_summary
from pipelines.executors.parts import (
    WorkItem,
    assemble_shard,
    clear_parts,
    tagged_batches,
    uses_model,
    write_parts,
)
from pipelines.guard import apply_guarded
from pipelines.plan import Plan
from pipelines.progress import (
    finalize,
    is_done,
    load_marker,
    remove_stale_outputs,
    write_marker,
)
from pipelines.shard_task import merge_timings
from pipelines.workdir import (
    read_decisions,
    read_done,
    read_signatures,
    signatures_path,
    write_decisions,
)
from schemas.config import RunConfig

log = logging.getLogger(__name__)
SUMMARY_MAX_SIGNATURES = 5_000_000


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


class _ReadShards:
    """Reader actor: builds the previous segment's decision index once, then reads one shard per call."""

    def __init__(self, fs, root: str, items: list[WorkItem], seg: int, prev: pa.Table | None,
                 prev_stage: str | None, batch_size: int) -> None:
        self.fs, self.root, self.items, self.seg = fs, root, items, seg
        self.prev = index_decisions(prev) if prev is not None else None
        self.prev_stage, self.batch_size = prev_stage, batch_size

    def __call__(self, batch: pa.Table):
        for idx in batch.column("item").to_pylist():
            yield from tagged_batches(self.fs, self.root, self.items[idx], self.seg, self.batch_size,
                                      self.prev, self.prev_stage)


class _StageActor:
    """A model stage in an actor pool: ``setup()`` (model load) once per actor."""

    def __init__(self, stage: Any) -> None:
        self.stage = stage
        stage.setup()

    def __call__(self, batch: pa.Table) -> pa.Table:
        return apply_guarded(self.stage, batch)


def _stage_task(batch: pa.Table, stage: Any) -> pa.Table:
    stage.setup()  # model-free stages: setup is cheap
    return apply_guarded(stage, batch)


def _write_parts_task(batch: pa.Table, fs, root: str, seg: int, shards: list) -> pa.Table:
    parts = write_parts(fs, root, seg, batch, shards)
    return pa.Table.from_pylist(parts)


def _decide_task(group: pa.Table, stage: Any) -> pa.Table:
    return normalize_decisions(stage.decide(group))


def run_ray(config: RunConfig, *, progress: bool = True, address: str | None = None) -> dict[str, Any]:
    import ray

    ensure_ray(address)
    ray.data.DataContext.get_current().enable_progress_bars = progress
    fs, root, plan, work = prepare_run(config)
    items = [WorkItem(i, reader, shard) for i, (reader, shard) in enumerate(work)]
    results = []
    for segment in plan.segments:
        prev = None
        if segment.index:
            prev = read_decisions(fs, root, segment.index - 1, plan.segment_hash(segment.index - 1))
            if prev is None:
                raise RuntimeError(f"decisions of segment {segment.index - 1} are missing")
        if segment.decide is None:
            results = _final_segment(ray, fs, root, plan, config, items, prev)
        else:
            _decision_segment(ray, fs, root, plan, segment, config, items, prev)
    return finalize(fs, root, config.name, results, plan_summaries(fs, root, plan), run_info(plan, config))


def _map_segment(ray, fs, root: str, plan: Plan, seg: int, config: RunConfig, items: list[WorkItem],
                 pending: list[WorkItem], prev: pa.Table | None) -> dict[int, list[dict]]:
    """Run the segment's map stages over the pending shards; returns part descriptions per shard index.

    Pair rows and MMC4 documents go through separate datasets: Ray Data concatenates blocks into batches
    across shards, and a batch must hold one row schema.
    """
    for it in pending:
        clear_parts(fs, root, seg, it.shard)
    by_shard: dict[int, list[dict]] = {it.index: [] for it in pending}
    for kind in sorted({it.shard.row_kind for it in pending}):
        subset = [it for it in pending if it.shard.row_kind == kind]
        for row in _map_dataset(ray, fs, root, plan, seg, config, items, subset, prev).take_all():
            by_shard[row["shard_index"]].append(row)
    return by_shard


def _map_dataset(ray, fs, root: str, plan: Plan, seg: int, config: RunConfig, items: list[WorkItem],
                 pending: list[WorkItem], prev: pa.Table | None):
    segment = plan.segments[seg]
    prev_stage = plan.segments[seg - 1].decide.name if seg else None
    n = len(pending)
    ds = ray.data.from_items([{"item": it.index} for it in pending], override_num_blocks=n)
    ds = ds.map_batches(_ReadShards, batch_size=1, batch_format="pyarrow",
                        fn_constructor_args=(fs, root, items, seg, prev, prev_stage, config.batch_size),
                        compute=ray.data.ActorPoolStrategy(size=max(1, min(n, _cluster_cpus(ray)))),
                        num_cpus=1)
    for stage in segment.maps:
        opts = stage.resources.ray_options()
        batch_size = getattr(getattr(stage, "cfg", None), "runtime", None)
        batch_size = batch_size.batch_size if batch_size else config.batch_size
        if uses_model(stage):
            workers = getattr(getattr(stage.cfg, "runtime", None), "workers", 1)
            ds = ds.map_batches(_StageActor, fn_constructor_args=(stage,), batch_size=batch_size,
                                batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=workers),
                                **opts)
        else:
            ds = ds.map_batches(_stage_task, fn_kwargs={"stage": stage}, batch_size=batch_size,
                                batch_format="pyarrow", **opts)
    return ds.map_batches(_write_parts_task, batch_size=None, batch_format="pyarrow",
                          fn_kwargs={"fs": fs, "root": root, "seg": seg, "shards": [it.shard for it in items]})


def _cluster_cpus(ray) -> int:
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def _assemble_remote(ray):
    @ray.remote(num_cpus=1)
    def assemble(fs, root, plan, seg, item, parts, out, batch_size):
        return assemble_shard(fs, root, plan, seg, item, parts, out, batch_size)

    return assemble


def _decision_segment(ray, fs, root: str, plan: Plan, segment, config: RunConfig, items: list[WorkItem],
                      prev: pa.Table | None) -> None:
    seg_hash = plan.segment_hash(segment.index)
    if read_decisions(fs, root, segment.index, seg_hash) is not None:
        return
    pending = [it for it in items
               if (read_done(fs, root, segment.index, it.shard) or {}).get("segment_hash") != seg_hash]
    if pending:
        parts = _map_segment(ray, fs, root, plan, segment.index, config, items, pending, prev)
        assemble = _assemble_remote(ray)
        ray.get([assemble.remote(fs, root, plan, segment.index, it, parts[it.index], config.output,
                                 config.batch_size) for it in pending])
    signatures, n_sigs = _read_signatures_ray(ray, fs, root, segment.index, items)
    stage = segment.decide
    if signatures is None:
        decisions = normalize_decisions(None)
    else:
        if stage.group_by is None:
            grouped = signatures.repartition(1).map_batches(_decide_task, batch_size=None,
                                                            batch_format="pyarrow", fn_kwargs={"stage": stage})
        else:
            # hash-partitioned by group: one partition per CPU (Ray's default of 200 costs seconds each)
            grouped = signatures.groupby(stage.group_by, num_partitions=_cluster_cpus(ray)).map_groups(
                _decide_task, batch_format="pyarrow", fn_kwargs={"stage": stage})
        tables = [t for t in ray.get(grouped.to_arrow_refs()) if t.num_rows]
        decisions = pa.concat_tables(tables) if tables else normalize_decisions(None)
    # the summary reads the signatures on the driver only while they are small
    sig_table = (read_signatures(fs, root, segment.index, [it.shard for it in items])
                 if n_sigs <= SUMMARY_MAX_SIGNATURES else pa.table({}))
    write_segment_summary(fs, root, segment, normalize_decisions(decisions), sig_table)
    write_decisions(fs, root, segment.index, decisions, seg_hash)


def _read_signatures_ray(ray, fs, root: str, seg: int, items: list[WorkItem]):
    import pyarrow.parquet as pq
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    paths, total = [], 0
    for it in items:
        path = signatures_path(root, seg, it.shard)
        with fs.open(path, "rb") as f:
            n = pq.ParquetFile(f).metadata.num_rows
        if n:
            paths.append(path)
            total += n
    if not paths:
        return None, 0
    return ray.data.read_parquet(paths, filesystem=PyFileSystem(FSSpecHandler(fs))), total


def _final_segment(ray, fs, root: str, plan: Plan, config: RunConfig, items: list[WorkItem],
                   prev: pa.Table | None) -> list:
    seg = len(plan.segments) - 1
    pending = [it for it in items if not is_done(fs, root, it.shard, plan.plan_hash)]
    for it in pending:
        remove_stale_outputs(fs, root, it.shard)
    if pending:
        parts = _map_segment(ray, fs, root, plan, seg, config, items, pending, prev)
        assemble = _assemble_remote(ray)
        fresh = ray.get([assemble.remote(fs, root, plan, seg, it, parts[it.index], config.output,
                                         config.batch_size) for it in pending])
        for it, result in zip(pending, fresh, strict=True):
            earlier = [(read_done(fs, root, s.index, it.shard) or {}).get("timings") for s in plan.segments[:-1]]
            result.timings = merge_timings([*earlier, result.timings])
            result.plan_hash = plan.plan_hash
            write_marker(fs, root, result)
    return [load_marker(fs, root, it.shard) for it in items]
