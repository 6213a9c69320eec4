"""The engine runner: the segment loop, written once for every engine.

Per plan segment: which shards are pending (resume), run them through the segment's map stages (engine),
then, for a segment closed by a global stage, aggregate its signatures into decisions (engine grouping)
and store them per input shard under a segment marker; the last segment writes the shards and their
markers; finally the dataset files. An engine supplies only the primitives of :class:`Engine`; a new
engine is one small file.

Global decisions take one of two paths (``RunConfig.decide``):

- ``partitioned`` (default, when the stage implements ``schemas.stage.PartitionedDecide``): per shard
  ``partition`` -> engine groups by ``partition`` -> ``decide_partition`` per group -> ``combine`` once
  over the partial results -> ``shard_decisions`` per shard. A stage with ``CombinesOnEngine`` (dedup)
  goes from ``decide_partition`` to its decisions through ``components.combine_on_engine`` instead
  (pending edges confirmed per shard, connected components and keepers on the engine). No process holds
  every signature.
- ``single``: the reference: the stage's ``decide`` per ``group_by`` group (one group when None).
"""

from __future__ import annotations

import json
import logging
import posixpath
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import fsspec
import pyarrow as pa
import pyarrow.compute as pc

from vila2_curate.pipelines.engine import aggregate
from vila2_curate.pipelines.engine.aggregate import normalize_decisions
from vila2_curate.pipelines.engine.components import GROUP_COL, combine_on_engine
from vila2_curate.pipelines.engine.finalize import finalize
from vila2_curate.pipelines.engine.group_size import decide_group_count, partition_bytes
from vila2_curate.pipelines.engine.markers import (
    decide_timings,
    is_decided,
    load_marker,
    remove_stale_outputs,
    run_started_at,
    segment_done,
    write_decided,
)
from vila2_curate.pipelines.engine.plan import Plan, Segment, build_plan, set_run_started_at
from vila2_curate.pipelines.engine.workdir import (
    read_all_decisions,
    remove_signatures,
    rows_path,
    sample_path,
    samples_dir,
    seg_dir,
    signatures_path,
    write_shard_decisions,
)
from vila2_curate.pipelines.io.parquet_read import open_parquet, read_parquet
from vila2_curate.pipelines.io.readers import make_reader
from vila2_curate.pipelines.io.readers.base import InputShard, Reader
from vila2_curate.pipelines.io.writers.atomic import (
    is_temp_name,
    write_json_atomic,
    write_parquet_atomic,
)
from vila2_curate.schemas.config import DEFAULT_DECIDE_GROUP_MB, RunConfig
from vila2_curate.schemas.stage import (
    PARTITION_COL,
    SHARD_COL,
    CombinesOnEngine,
    PartitionedDecide,
)

log = logging.getLogger(__name__)
SUMMARY_MAX_SIGNATURES = 5_000_000  # above this the summary holds counts only (it reads every signature)
DEFAULT_PARTITIONS = 16  # groups of the partitioned decide on a one-process engine


@dataclass(frozen=True)
class WorkItem:
    index: int  # position in the run's shard list (stable for a given input listing)
    reader: Reader
    shard: InputShard


@dataclass
class RunContext:
    """What an engine needs to run a segment: where the run writes, its plan and its input shards."""

    fs: Any
    root: str
    plan: Plan
    config: RunConfig
    items: list[WorkItem]


class Engine(Protocol):
    """The primitives an engine supplies; everything else is the runner's."""

    def map_shards(self, ctx: RunContext, segment: Segment, pending: list[WorkItem]) -> None:
        """Run these shards through the segment's map stages into ``shard_task.SegmentOutput`` (which
        writes the intermediate rows + signatures + done marker, or the shards + marker on the last)."""

    def group_apply(self, ctx: RunContext, items: list[WorkItem], load: Callable[[WorkItem], pa.Table | None],
                    key: str | None, fn: Callable[[pa.Table], pa.Table]) -> list[pa.Table]:
        """``load`` each shard's rows (on a worker), group all rows by ``key`` (None: one group), call
        ``fn`` once per group and return its outputs (small: partial results or decisions)."""

    def per_shard(self, ctx: RunContext, items: list[WorkItem], fn: Callable[[WorkItem], Any]) -> list[Any]:
        """Call ``fn`` once per shard, anywhere; results in ``items`` order."""

    def decide_groups(self, ctx: RunContext) -> int:
        """How many groups the partitioned decide forms (any number gives the same decisions)."""


# ------------------------------------------------------------------------------------------ preparation


def list_work(config: RunConfig) -> list[tuple[Reader, InputShard]]:
    return [(reader, shard) for reader in (make_reader(s) for s in config.sources)
            for shard in reader.list_shards()]


def prepare_run(config: RunConfig, plan: Plan | None = None):
    """What every engine does first: open the output, build the plan, list the input shards, and fix
    the run's start time. Returns (fs, root, plan, work)."""
    fs, root = fsspec.core.url_to_fs(config.output.path, **config.output.storage_options)
    fs.makedirs(root, exist_ok=True)
    remove_temp_files(fs, root)
    plan = plan or build_plan(config)
    work = list_work(config)
    plan.set_inputs([shard.path for _, shard in work])
    set_run_started_at(plan, run_started_at(fs, root, plan.plan_hash))
    return fs, root, plan, work


def remove_temp_files(fs, root: str) -> int:
    """Delete temporary files a killed or failed run left (one run per output directory at a time)."""
    removed = 0
    for path in fs.find(root):
        if is_temp_name(path):
            fs.rm(path)
            removed += 1
    if removed:
        log.info("removed %d temporary files left by an interrupted run", removed)
    return removed


# ------------------------------------------------------------------------------------------ the loop


def run_engine(engine: Engine, config: RunConfig, plan: Plan | None = None) -> dict[str, Any]:
    """Run every source through the plan on ``engine``; returns the merged stats."""
    fs, root, plan, work = prepare_run(config, plan)
    ctx = RunContext(fs, root, plan, config, [WorkItem(i, r, s) for i, (r, s) in enumerate(work)])
    pending = pending_work(ctx)
    for segment in plan.segments:
        todo = pending[segment.index]
        if segment.global_stage is None:
            for it in todo:
                remove_stale_outputs(fs, root, it.shard)
            if todo:
                engine.map_shards(ctx, segment, todo)
            continue
        if todo:
            engine.map_shards(ctx, segment, todo)
        if not is_decided(fs, root, segment.index, plan.segment_hash(segment.index)):
            decide_segment(engine, ctx, segment)
        remove_signatures(fs, root, segment.index, [it.shard for it in ctx.items])  # spent once decided
    results = [load_marker(fs, root, it.shard) for it in ctx.items]
    missing = [it.shard.path for it, r in zip(ctx.items, results, strict=True) if r is None]
    if missing:
        raise RuntimeError(f"the engine finished without a marker for {missing[:3]}")
    return finalize(fs, root, config.name, results, plan_summaries(fs, root, plan), run_info(plan, config),
                    decide_timings(fs, root, plan))


def pending_work(ctx: RunContext) -> dict[int, list[WorkItem]]:
    """Per segment, the shards to run through it. Segment i runs shard X when its work there is not done
    yet (and the segment is not decided), or when segment i+1 must run X and X's rows of segment i are
    gone: a shard's rows of segment i are removed once its segment i+1 is done (``SegmentOutput``), so a
    redo of a later segment (a stage's version changed) walks back to the last rows still kept, at worst
    to the input."""
    fs, root, plan = ctx.fs, ctx.root, ctx.plan
    last = len(plan.segments) - 1
    todo = {last: {it.index for it in ctx.items if not segment_done(fs, root, plan, last, it.shard)}}
    for i in range(last - 1, -1, -1):
        decided = is_decided(fs, root, i, plan.segment_hash(i))
        need = set()
        for it in ctx.items:
            done = segment_done(fs, root, plan, i, it.shard)
            undecided_work = not done and not decided
            rows_missing = it.index in todo[i + 1] and not (done and fs.exists(rows_path(root, i, it.shard)))
            if undecided_work or rows_missing:
                need.add(it.index)
        todo[i] = need
    return {i: [it for it in ctx.items if it.index in need] for i, need in todo.items()}


# ------------------------------------------------------------------------------------------ decisions


def uses_partitioned(stage: Any, config: RunConfig) -> bool:
    return config.decide == "partitioned" and isinstance(stage, PartitionedDecide)


class LoadSignatures:
    """A shard's signatures with the engine's ``shard`` column; with ``partitions`` set, through
    ``stage.partition`` and keyed by ``partition % partitions`` (a picklable callable: it runs on the
    engine's workers, with the stage as fitted in step 0)."""

    def __init__(self, fs, root: str, seg: int, stage: Any, partitions: int | None) -> None:
        self.fs, self.root, self.seg, self.stage, self.partitions = fs, root, seg, stage, partitions

    def __call__(self, item: WorkItem) -> pa.Table | None:
        sig = read_shard_signatures(self.fs, self.root, self.seg, item.shard)
        if sig is None:
            return None
        if self.partitions is None:
            return sig
        rows = self.stage.partition(with_shard(sig, item))
        if not rows.num_rows:
            return None
        return rows.append_column(GROUP_COL, _modulo(rows.column(PARTITION_COL), self.partitions))


class SampleShard:
    """Step 0: one shard's bounded sample for ``stage.fit`` (dedup's k-means centroids), written to a file;
    returns its path (None: no sample). Files, not return values: every shard's sample at once would be
    up to M rows per shard on the driver, the whole dataset when shards are smaller than M."""

    def __init__(self, fs, root: str, seg: int, stage: Any) -> None:
        self.fs, self.root, self.seg, self.stage = fs, root, seg, stage

    def __call__(self, item: WorkItem) -> str | None:
        sig = read_shard_signatures(self.fs, self.root, self.seg, item.shard)
        sample = None if sig is None else self.stage.sample(with_shard(sig, item))
        if sample is None or sample.num_rows == 0:
            return None
        path = sample_path(self.root, self.seg, item.shard)
        write_parquet_atomic(self.fs, path, sample)
        return path


def fit_on_samples(engine: Engine, ctx: RunContext, seg: int, stage: Any) -> None:
    """Step 0 of the partitioned decide for a stage that ``fits_on_sample``: per shard a sample file, then
    ``fit`` streams them on the driver (it keeps the M smallest: one sample file beside M rows at a time)."""
    fs, root = ctx.fs, ctx.root
    paths = [p for p in engine.per_shard(ctx, ctx.items, SampleShard(fs, root, seg, stage)) if p]
    stage.fit(read_parquet(fs, p) for p in paths)
    folder = samples_dir(root, seg)
    if fs.exists(folder):
        fs.rm(folder, recursive=True)


class DecidePartition:
    """Step 2 on one engine group (a union of whole ``partition`` values)."""

    def __init__(self, stage: Any) -> None:
        self.stage = stage

    def __call__(self, rows: pa.Table) -> pa.Table:
        return self.stage.decide_partition(rows.drop_columns([GROUP_COL]))


def _pending_signatures(fs, root: str, seg: int, shard: InputShard) -> pa.Table:
    sig = read_shard_signatures(fs, root, seg, shard)
    if sig is None:
        raise RuntimeError(f"pending edges name {aggregate.shard_label(shard)}, which has no signatures")
    return sig


def _modulo(values: pa.ChunkedArray, n: int) -> pa.Array:
    import numpy as np

    return pa.array(np.asarray(values.to_numpy(), dtype=np.int64) % n, type=pa.int64())


def read_shard_signatures(fs, root: str, seg: int, shard: InputShard) -> pa.Table | None:
    sig = read_parquet(fs, signatures_path(root, seg, shard))
    return sig if sig.num_rows and sig.num_columns else None


def with_shard(sig: pa.Table, item: WorkItem) -> pa.Table:
    """The shard's signatures with its label and each row's integer node (``schemas.stage.NODE_COL``)."""
    return aggregate.with_shard(sig, aggregate.shard_label(item.shard), item.index)


class ShardSignatures:
    """A shard's signatures as the partitioned steps see them (``with_shard``); an error if it has none
    (a step asked for the rows behind edges that name the shard)."""

    def __init__(self, fs, root: str, seg: int) -> None:
        self.fs, self.root, self.seg = fs, root, seg

    def __call__(self, item: WorkItem) -> pa.Table:
        return with_shard(_pending_signatures(self.fs, self.root, self.seg, item.shard), item)


class DecideGroup:
    """``stage.decide`` on one group, normalized (picklable: runs on the engine's workers)."""

    def __init__(self, stage: Any) -> None:
        self.stage = stage

    def __call__(self, group: pa.Table) -> pa.Table:
        return normalize_decisions(self.stage.decide(group))


class WriteShardDecisions:
    """Step 4 of the partitioned decide, or the split of single-process decisions, for one shard."""

    def __init__(self, fs, root: str, seg: int, seg_hash: str, stage: Any, combined: pa.Table | None,
                 decisions: pa.Table | None) -> None:
        self.fs, self.root, self.seg, self.seg_hash, self.stage = fs, root, seg, seg_hash, stage
        self.combined, self.decisions = combined, decisions

    def __call__(self, item: WorkItem) -> int:
        sig = read_shard_signatures(self.fs, self.root, self.seg, item.shard)
        if sig is None:
            mine = normalize_decisions(None)
        elif self.combined is not None:
            combined = self.combined
            if SHARD_COL in combined.column_names:
                combined = combined.filter(pc.equal(combined.column(SHARD_COL), aggregate.shard_label(item.shard)))
            mine = normalize_decisions(self.stage.shard_decisions(combined, with_shard(sig, item)))
        else:
            mine = decisions_of(self.decisions, sig)
        return write_shard_decisions(self.fs, self.root, self.seg, item.shard, mine, self.seg_hash)


def _ids(table: pa.Table) -> pa.Array:
    return pc.binary_join_element_wise(table.column("source"), table.column("key"), "\x00")


def decisions_of(decisions: pa.Table, sig: pa.Table) -> pa.Table:
    """The decisions about the rows a shard's signatures name (the single-process path's split)."""
    if decisions is None or decisions.num_rows == 0:
        return normalize_decisions(None)
    return decisions.filter(pc.is_in(_ids(decisions), value_set=pc.unique(_ids(sig))))


def decide_segment(engine: Engine, ctx: RunContext, segment: Segment) -> None:
    """Aggregate the segment's signatures and store the decisions per input shard, then the marker."""
    seg_hash = ctx.plan.segment_hash(segment.index)
    t = time.perf_counter()
    partitioned = uses_partitioned(segment.global_stage, ctx.config)
    n_decisions, extra = decide_signatures(engine, ctx, segment.index, seg_hash, segment.global_stage, partitioned)
    _finish_decide(ctx, segment, seg_hash, n_decisions, "partitioned" if partitioned else "single",
                   time.perf_counter() - t, extra)


def decide_signatures(engine: Engine, ctx: RunContext, seg: int, seg_hash: str, stage: Any,
                      partitioned: bool, partitions: int | None = None) -> tuple[int, dict[str, Any]]:
    """Every shard's decisions of global stage ``stage`` from the shards' signatures of segment ``seg``,
    written per shard (the steps of the module docstring's two paths); returns (decision rows, what the
    summary adds). ``partitions``: the fewest step-2 groups (default: the engine's); more when the partition
    rows would exceed the config's ``decide_group_mb`` a group (``group_size``)."""
    fs, root = ctx.fs, ctx.root
    if partitioned:
        if stage.fits_on_sample:  # step 0: bounded samples stream into fit on the driver
            fit_on_samples(engine, ctx, seg, stage)
        estimate = partition_bytes(fs, root, seg, stage, ctx.items)
        group_mb = ctx.config.decide_group_mb if ctx.config is not None else DEFAULT_DECIDE_GROUP_MB
        partitions = decide_group_count(partitions or engine.decide_groups(ctx), estimate, group_mb)
        extra: dict[str, Any] = {"decide_groups": partitions, "partition_bytes_per_row": round(estimate["bytes_per_row"], 1)}
        if isinstance(stage, CombinesOnEngine):
            n, components = combine_on_engine(engine, ctx, seg, seg_hash, stage, partitions, ShardSignatures(fs, root, seg),
                                              LoadSignatures(fs, root, seg, stage, partitions))
            return n, {**extra, **components}
        partials = engine.group_apply(ctx, ctx.items, LoadSignatures(fs, root, seg, stage, partitions),
                                      GROUP_COL, DecidePartition(stage))
        partials = [p for p in partials if p is not None]
        combined, decisions = stage.combine(partials), None
    else:
        tables = engine.group_apply(ctx, ctx.items, LoadSignatures(fs, root, seg, stage, None),
                                    stage.group_by, DecideGroup(stage))
        tables = [t for t in tables if t is not None and t.num_rows]
        combined, decisions = None, pa.concat_tables(tables) if tables else normalize_decisions(None)
        extra = {}
    counts = engine.per_shard(ctx, ctx.items, WriteShardDecisions(fs, root, seg, seg_hash, stage, combined,
                                                                  decisions))
    return sum(counts), extra


def _finish_decide(ctx: RunContext, segment: Segment, seg_hash: str, n_decisions: int, mode: str,
                   seconds: float, extra: dict[str, Any] | None = None) -> None:
    """The segment's summary and its decided marker (with the decide's timing)."""
    stage = segment.global_stage
    log.info("%s decided (%s) in %.2fs", stage.name, mode, seconds)
    n_sigs = write_segment_summary(ctx, segment, n_decisions, mode, extra)
    write_decided(ctx.fs, ctx.root, segment.index, seg_hash, n_decisions, len(ctx.items),
                  {f"{stage.name}_decide": {"rows": n_sigs, "seconds": seconds}})


def write_segment_summary(ctx: RunContext, segment: Segment, n_decisions: int, mode: str,
                          extra: dict[str, Any] | None = None) -> int:
    """The stage's summary; ``summarize`` sees every decision and signature while they are small.
    Returns the number of signatures."""
    fs, root, seg = ctx.fs, ctx.root, segment.index
    n_sigs = 0
    for it in ctx.items:
        with open_parquet(fs, signatures_path(root, seg, it.shard)) as pf:
            n_sigs += pf.metadata.num_rows
    summary: dict[str, Any] = {}
    if n_sigs <= SUMMARY_MAX_SIGNATURES:
        parts = [s for s in (_summary_columns(read_shard_signatures(fs, root, seg, it.shard))
                             for it in ctx.items) if s is not None]
        signatures = pa.concat_tables(parts, promote_options="default") if parts else pa.table({})
        decisions = normalize_decisions(read_all_decisions(fs, root, seg, [it.shard for it in ctx.items]))
        summary = segment.global_stage.summarize(decisions, signatures)
    summary = {"stage": segment.global_stage.name, "signatures": n_sigs, "decisions": n_decisions,
               "decide": mode, **(extra or {}), **summary}
    write_json_atomic(fs, posixpath.join(seg_dir(root, seg), "summary.json"), summary)
    return n_sigs


def _summary_columns(sig: pa.Table | None) -> pa.Table | None:
    """Signatures without their bulky columns (thumbnails, MinHash, embeddings: lists and binaries),
    which no summary reads: the summary's driver memory stays ~100 B per signature."""
    if sig is None:
        return None
    bulky = [f.name for f in sig.schema
             if pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type) or pa.types.is_fixed_size_binary(f.type)
             or pa.types.is_list(f.type) or pa.types.is_large_list(f.type) or pa.types.is_fixed_size_list(f.type)]
    return sig.drop_columns(bulky)


# ------------------------------------------------------------------------------------------ run files


def run_info(plan: Plan, config: RunConfig) -> dict[str, Any]:
    """What the report needs beside the timings: stage order, each stage's declared resources."""
    stages = [{"name": s.name, "version": s.version, "segment": seg.index,
               "global": s is seg.global_stage, "cpus": s.resources.cpus, "gpus": s.resources.gpus}
              for seg in plan.segments for s in seg.stages]
    return {"run": {"name": config.name, "engine": config.engine, "config_hash": plan.config_hash,
                    "plan_hash": plan.plan_hash, "stages": stages}}


def plan_summaries(fs, root: str, plan: Plan) -> dict[str, Any]:
    out = {}
    for segment in plan.segments:
        path = posixpath.join(seg_dir(root, segment.index), "summary.json")
        if segment.global_stage is not None and fs.exists(path):
            with fs.open(path, "rb") as f:
                out[segment.global_stage.name] = json.load(f)
    return out


# ------------------------------------------------------------------------------------------ helpers
