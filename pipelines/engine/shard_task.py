"""Process one input shard through one plan segment, the same way on every engine.

The local engine runs ``run_shard_segment`` in-process. Ray and Beam run it whole in one worker for a
segment without model stages (``exchange.RunShard``: a Ray task, a Beam ``Map`` element); for a segment with
model stages they use its two halves apart, with the engine's map stages in between: ``input_batches``
feeds their read step (``exchange.tagged_batches``) and ``SegmentOutput`` their per-shard assembly
(``exchange.assemble_shard``).

Input: the source reader (segment 0) or the re-read input joined with the previous segment's saved
per-row columns, with that shard's decisions of the previous segment applied first. Output: intermediate
rows + signatures (segments that end in a global stage) or the VILA shards, rejects and stats (the last
segment).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any

import pyarrow as pa

from vila2_curate.curation.decisions import apply_decisions, index_decisions
from vila2_curate.pipelines.engine.guard import apply_guarded
from vila2_curate.pipelines.engine.markers import (
    ShardResult,
    Stopwatch,
    Timings,
    merge_timings,
    segment_timings,
    write_marker,
    write_segment_done,
)
from vila2_curate.pipelines.engine.plan import Plan, Segment
from vila2_curate.pipelines.engine.workdir import (
    IntermediateWriter,
    is_slim,
    read_rows,
    read_shard_decisions,
    rejoin_input,
    rows_path,
    write_signatures,
)
from vila2_curate.pipelines.io.readers.base import InputShard, Reader
from vila2_curate.pipelines.io.sink import ShardSink
from vila2_curate.schemas.config import OutputConfig
from vila2_curate.schemas.rows import DOCUMENT_SCHEMA, PAIR_SCHEMA


def input_batches(fs, root: str, plan: Plan, reader: Reader, shard: InputShard, seg: int, batch_size: int,
                  timings: Timings) -> Iterator[pa.Table]:
    """The rows segment ``seg`` starts from, with the previous segment's decisions applied.

    Segment 0 reads the input shard. A later segment re-reads it (inputs are immutable) and joins the
    per-row columns the previous segment saved (``workdir.rejoin_input``); its time counts as
    ``read_intermediate``. Only this shard's decisions are loaded.
    """
    if seg == 0:
        source, read_name, decisions, prev_stage = reader.read(shard, batch_size), "read", None, None
    else:
        schema = DOCUMENT_SCHEMA if shard.row_kind == "document" else PAIR_SCHEMA
        path = rows_path(root, seg - 1, shard)
        source = read_rows(fs, path, batch_size)
        if is_slim(fs, path):
            source = rejoin_input(source, reader.read(shard, batch_size), schema)
        read_name = "read_intermediate"
        prev_stage = plan.segments[seg - 1].global_stage.name
        decisions = index_decisions(read_shard_decisions(fs, root, seg - 1, shard, plan.segment_hash(seg - 1)))
    t0 = Stopwatch()
    for batch in source:
        t0.add_to(timings, read_name, batch.num_rows)
        if decisions is not None:
            t = Stopwatch()
            batch = apply_decisions(batch, decisions, prev_stage)
            t.add_to(timings, f"{prev_stage}_apply", batch.num_rows)
        yield batch
        t0 = Stopwatch()


def map_batch(segment: Segment, batch: pa.Table, timings: Timings) -> pa.Table:
    for stage in segment.maps:
        t = Stopwatch()
        batch = apply_guarded(stage, batch)
        t.add_to(timings, stage.name, batch.num_rows, gpu_share(stage))
    return batch


class SegmentOutput:
    """Where a shard's mapped rows go at the end of a segment."""

    def __init__(self, fs, root: str, plan: Plan, segment: Segment, shard: InputShard,
                 out: OutputConfig, rereadable: bool = True) -> None:
        self.fs, self.root, self.plan, self.segment, self.shard = fs, root, plan, segment, shard
        self.last = segment.global_stage is None
        self.timings: Timings = {}
        self.rows = self.kept = 0
        if self.last:
            self.sink = ShardSink(fs, root, out, shard, sidecars=plan.sidecars)
        else:
            schema = DOCUMENT_SCHEMA if shard.row_kind == "document" else PAIR_SCHEMA
            self.inter = IntermediateWriter(fs, rows_path(root, segment.index, shard), schema, rereadable)
            self.sigs: list[pa.Table] = []

    def write(self, batch: pa.Table) -> None:
        t = Stopwatch()
        self.rows += batch.num_rows
        if self.last:
            before = self.sink.stats.kept
            self.sink.write(batch)
            self.kept += self.sink.stats.kept - before
            t.add_to(self.timings, "write", batch.num_rows)
            return
        self.inter.write(batch)
        t.add_to(self.timings, "write_intermediate", batch.num_rows)
        t = Stopwatch()
        self.add_signatures([self.segment.global_stage.signatures(batch)])
        t.add_to(self.timings, f"{self.segment.global_stage.name}_signatures", batch.num_rows)

    def write_mapped(self, rows: pa.Table) -> None:
        """Rows a distributed map side already slimmed (its signatures come through ``add_signatures``)."""
        t = Stopwatch()
        self.rows += rows.num_rows
        self.inter.write_slim(rows)
        t.add_to(self.timings, "write_intermediate", rows.num_rows)

    def add_signatures(self, sigs: list[pa.Table]) -> None:
        self.sigs.extend(s for s in sigs if s.num_rows)

    def close(self, timings: Timings) -> ShardResult | None:
        timings = merge_timings([timings, self.timings])
        if self.last:
            stats, files = self.sink.close()
            # the shard's timings over the whole plan: earlier segments' from their done markers
            earlier = [segment_timings(self.fs, self.root, s.index, self.shard) for s in self.plan.segments[:-1]]
            result = ShardResult(shard=self.shard, stats=stats, files=files, config_hash=self.plan.config_hash,
                                 stage_versions=self.plan.stage_versions,
                                 timings=merge_timings([*earlier, timings]), plan_hash=self.plan.plan_hash)
            write_marker(self.fs, self.root, result)  # last: the shard is finished
            self._drop_previous_rows()
            return result
        write_signatures(self.fs, self.root, self.segment.index, self.shard, self.sigs)
        self.inter.commit()
        write_segment_done(self.fs, self.root, self.segment.index, self.shard,
                           self.plan.segment_hash(self.segment.index), self.rows, timings)
        self._drop_previous_rows()
        return None

    def _drop_previous_rows(self) -> None:
        """The previous segment's rows of this shard are spent once this segment is done for it (the
        runner's ``pending_work`` rebuilds them if a redo ever needs them)."""
        if self.segment.index:
            path = rows_path(self.root, self.segment.index - 1, self.shard)
            if self.fs.exists(path):
                self.fs.rm(path)

    def abort(self) -> None:
        if not self.last:
            self.inter.abort()


def run_shard_segment(fs, root: str, plan: Plan, segment: Segment, reader: Reader, shard: InputShard,
                      out: OutputConfig, batch_size: int,
                      on_batch: Callable[[int, int], None] | None = None) -> ShardResult | None:
    """Stream one shard through one segment; returns the ShardResult (marker written) on the last segment."""
    timings: Timings = {}
    output = SegmentOutput(fs, root, plan, segment, shard, out, is_rereadable(reader))
    try:
        for batch in input_batches(fs, root, plan, reader, shard, segment.index, batch_size, timings):
            batch = map_batch(segment, batch, timings)
            kept_before = output.kept
            output.write(batch)
            if on_batch:
                on_batch(batch.num_rows, output.kept - kept_before)
        return output.close(timings)
    except BaseException:
        output.abort()
        raise


def is_rereadable(reader: Reader) -> bool:
    """Whether reading the shard again gives the same rows; a reader that fetches URLs sets
    ``rereadable = False`` and its intermediate rows then keep their image bytes."""
    declared = getattr(reader, "rereadable", None)
    if declared is not None:
        return bool(declared)
    # a source that downloads its image URLs would download them again, maybe differently
    return not getattr(getattr(reader, "source", None), "fetch_remote", False)


def gpu_share(stage: Any) -> float:
    """GPU-seconds per wall second of this stage: its declared GPU share, when a GPU is in use."""
    gpus = float(stage.resources.gpus)
    return gpus if gpus and _cuda_available() else 0.0


@functools.cache
def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()
