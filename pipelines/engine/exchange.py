"""Pieces shared by the distributed engines (Ray Data, Beam): the exchange between map side and assembly.

Distributed map stages see batches in any order and any grouping, but output must not depend on the
engine. So the reader tags every row with ``_row`` (shard index << 32 | row number); after the map
stages each batch is written as *part* files, one per input shard it holds; a per-shard assembly step
reads its parts back in ``_row`` order and feeds exactly the same SegmentOutput the local engine uses.
Part names derive from their rows, so a retried task overwrites rather than duplicates a part; the
assembly also drops repeated ``_row`` values.

Parts carry no image bytes: only the columns the map stages computed (``workdir.slim_for_work``, the
same slimming the local engine's intermediate rows get), and for a segment closed by a global stage its
signatures, computed on the map side while the decoded batch is at hand. The image bytes come back from
the immutable input shard when the last segment's shard is assembled (``workdir.rejoin_input``), so the
exchange costs a few hundred bytes per row instead of a copy of the dataset. A source that cannot be read
again identically (URL fetching) keeps whole rows, as its intermediate rows do.

Each map step's cost rides along the rows as a per-row column (``_cost:<name>`` seconds, ``_gpu:<name>``
GPU-seconds): whatever batches the engine forms, splits or merges, the per-shard sums are exact, and they
reach the shard's markers (``timings.json``) through the part descriptions.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from vila2_curate.pipelines.engine.guard import apply_guarded
from vila2_curate.pipelines.engine.markers import ShardResult, Stopwatch, Timings, add_timing, merge_timings
from vila2_curate.pipelines.engine.plan import Plan, Segment
from vila2_curate.pipelines.engine.runner import WorkItem
from vila2_curate.pipelines.engine.shard_task import (
    SegmentOutput,
    gpu_share,
    input_batches,
    is_rereadable,
    run_shard_segment,
)
from vila2_curate.pipelines.engine.workdir import rejoin_input, seg_dir, slim_dropped, slim_for_work
from vila2_curate.pipelines.io.parquet_read import read_parquet
from vila2_curate.pipelines.io.readers.base import InputShard
from vila2_curate.pipelines.io.writers.atomic import write_parquet_atomic
from vila2_curate.schemas.config import OutputConfig
from vila2_curate.schemas.rows import DOCUMENT_SCHEMA, PAIR_SCHEMA

ROW_COL = "_row"
SHARD_BITS = 32
COST_PREFIX = "_cost:"
GPU_PREFIX = "_gpu:"
CPU_PREFIX = "_cpu:"
# what only a distributed engine spends: writing the parts, reading them and the input back at assembly
EXCHANGE_WRITE, EXCHANGE_READ = "exchange_write", "exchange_read"


def uses_model(stage) -> bool:
    """Model stages run where a model is loaded once per worker (Ray actor pool, Beam RunInference)."""
    return stage.resources.gpus > 0 or stage.loads_model


def runs_whole_shards(segment: Segment) -> bool:
    """A segment without model stages needs no exchange: a distributed engine runs each pending shard
    through it in one worker, start to end, exactly as the local engine does (``RunShard``). Only model
    stages, which want a model loaded once per worker and batches from any shard, go through parts."""
    return not any(uses_model(s) for s in segment.maps)


class RunShard:
    """One shard through a segment without model stages, in one worker (picklable: it is shipped to it)."""

    def __init__(self, fs, root: str, plan: Plan, segment: Segment, out: OutputConfig, batch_size: int) -> None:
        self.fs, self.root, self.plan, self.segment = fs, root, plan, segment
        self.out, self.batch_size = out, batch_size

    def __call__(self, item: WorkItem) -> None:
        for stage in self.segment.stages:  # model-free stages: setup is cheap
            stage.setup()
        run_shard_segment(self.fs, self.root, self.plan, self.segment, item.reader, item.shard, self.out,
                          self.batch_size)


def parts_dir(root: str, seg: int, shard: InputShard) -> str:
    return posixpath.join(seg_dir(root, seg), "parts", f"{shard.source}.{shard.shard_id}")


def clear_segment_parts(fs, root: str, seg: int) -> None:
    """After every pending shard is assembled: the (empty) parts folder goes too."""
    d = posixpath.join(seg_dir(root, seg), "parts")
    if fs.exists(d):
        fs.rm(d, recursive=True)


# ------------------------------------------------------------------------------------------ costs


def _spread(batch: pa.Table, col: str, total: float) -> pa.Table:
    """``total`` spread evenly over the rows of column ``col`` (added to what it holds already)."""
    per_row = pa.array(np.full(batch.num_rows, total / batch.num_rows), pa.float64())
    if col not in batch.column_names:
        return batch.append_column(col, per_row)
    i = batch.column_names.index(col)
    return batch.set_column(i, col, pc.add(batch.column(i), per_row))


def add_cost(batch: pa.Table, name: str, seconds: float, gpus: float = 0.0, cpu_seconds: float = 0.0) -> pa.Table:
    """Spread ``seconds`` of wall time, ``cpu_seconds`` of CPU time (and ``seconds * gpus`` GPU-seconds) of
    work on this batch over its rows."""
    if not batch.num_rows:
        return batch
    batch = _spread(_spread(batch, COST_PREFIX + name, seconds), CPU_PREFIX + name, cpu_seconds)
    return _spread(batch, GPU_PREFIX + name, seconds * gpus) if gpus else batch


_COST_KEYS = {COST_PREFIX: "seconds", CPU_PREFIX: "cpu_seconds", GPU_PREFIX: "gpu_seconds"}


def pop_costs(batch: pa.Table) -> tuple[pa.Table, Timings]:
    """The batch without its cost columns, and their sums as timings."""
    timings: Timings = {}
    cols = [c for c in batch.column_names if c.startswith(tuple(_COST_KEYS))]
    for col in cols:
        prefix, name = col.split(":", 1)
        acc = timings.setdefault(name, {"rows": batch.num_rows, "seconds": 0.0, "cpu_seconds": 0.0,
                                        "gpu_seconds": 0.0})
        acc[_COST_KEYS[prefix + ":"]] += float(pc.sum(batch.column(col)).as_py() or 0.0)
    return batch.drop_columns(cols), timings


def run_stage(stage: Any, batch: pa.Table) -> pa.Table:
    """One map stage on a batch of the distributed map side, its cost added to the rows."""
    t = Stopwatch()
    out = apply_guarded(stage, batch)
    seconds, cpu = t.elapsed()
    return add_cost(out, stage.name, seconds, gpu_share(stage), cpu)


# ------------------------------------------------------------------------------------------ map side


def tagged_batches(fs, root: str, plan: Plan, item: WorkItem, seg: int, batch_size: int) -> Iterator[pa.Table]:
    """The segment's input rows for one shard (its own decisions applied), each tagged with its ``_row``
    and carrying the cost of reading it."""
    offset = item.index << SHARD_BITS
    timings: Timings = {}
    spent: dict[str, tuple[float, float]] = {}
    for batch in input_batches(fs, root, plan, item.reader, item.shard, seg, batch_size, timings):
        rows = pa.array(range(offset, offset + batch.num_rows), type=pa.int64())
        offset += batch.num_rows
        batch = batch.append_column(ROW_COL, rows)
        for name, acc in timings.items():  # this batch's share: what was spent since the last one
            wall, cpu = spent.get(name, (0.0, 0.0))
            batch = add_cost(batch, name, acc["seconds"] - wall, cpu_seconds=acc["cpu_seconds"] - cpu)
            spent[name] = (acc["seconds"], acc["cpu_seconds"])
        yield batch


def signature_rows(sig: pa.Table, piece: pa.Table) -> pa.Array:
    """The ``_row`` of each signature row. Signatures name their row by (source, key) and come in row
    order, a row's several signature rows (a document and its images) in rising ``image_index`` (the
    stage contract), so one forward walk pairs them even when keys repeat in a shard."""
    keys = list(zip(piece.column("source").to_pylist(), piece.column("key").to_pylist(), strict=True))
    rows = piece.column(ROW_COL).to_numpy()
    images = (sig.column("image_index").to_pylist() if "image_index" in sig.column_names
              else [None] * sig.num_rows)
    out = np.empty(sig.num_rows, np.int64)
    j, last = 0, None  # the row paired last, and its last signature row's image_index
    paired = False
    for i, k in enumerate(zip(sig.column("source").to_pylist(), sig.column("key").to_pylist(), strict=True)):
        if paired and (images[i] is None or last is None or images[i] <= last):
            j += 1  # not a further image of row j: a later row
        while j < len(keys) and keys[j] != k:
            j += 1
        if j == len(keys):
            raise RuntimeError(f"signature row {k} is not in row order or names no row of its batch")
        out[i], last, paired = rows[j], images[i], True
    return pa.array(out, pa.int64())


def write_parts(fs, root: str, segment: Segment, batch: pa.Table, shards: list[InputShard],
                rereadable: list[bool]) -> list[dict]:
    """Write one mapped batch as part files (one per input shard present): the rows' computed columns
    and, before a global stage, their signatures. Returns the parts' descriptions, costs included."""
    out = []
    seg = segment.index
    shard_of = pc.shift_right(batch.column(ROW_COL), SHARD_BITS)
    for idx in sorted(pc.unique(shard_of).to_pylist()):
        piece, timings = pop_costs(batch.filter(pc.equal(shard_of, idx)).sort_by(ROW_COL))
        rows = piece.column(ROW_COL)
        first, last = rows[0].as_py(), rows[-1].as_py()
        base = posixpath.join(parts_dir(root, seg, shards[idx]), f"{first:020d}-{last:020d}")
        desc: dict[str, Any] = {"shard_index": idx, "path": f"{base}.parquet", "sig_path": None,
                                "first": first, "last": last, "rows": piece.num_rows}
        if segment.global_stage is not None:
            t = Stopwatch()
            sig = segment.global_stage.signatures(piece.drop_columns([ROW_COL]))
            sig = sig.append_column(ROW_COL, signature_rows(sig, piece))
            t.add_to(timings, f"{segment.global_stage.name}_signatures", piece.num_rows)
            t = Stopwatch()
            desc["sig_path"] = f"{base}.sig.parquet"
            write_parquet_atomic(fs, desc["sig_path"], sig.combine_chunks())
            t.add_to(timings, EXCHANGE_WRITE, 0)
        t = Stopwatch()
        slim = slim_for_work(piece) if rereadable[idx] else slim_dropped(piece)
        write_parquet_atomic(fs, desc["path"], slim.combine_chunks())
        t.add_to(timings, EXCHANGE_WRITE, piece.num_rows)
        desc["timings"] = timings
        out.append(desc)
    return out


# ------------------------------------------------------------------------------------------ assembly


def _overlap_groups(parts: list[dict]) -> list[list[dict]]:
    """Parts sorted by rows; parts whose row ranges overlap (a batch that held non-adjacent rows of a
    shard, a retried task that re-split a batch) form one group."""
    groups: list[list[dict]] = []
    for p in sorted(parts, key=lambda p: (p["first"], p["last"])):
        if groups and p["first"] <= max(q["last"] for q in groups[-1]):
            groups[-1].append(p)
        else:
            groups.append([p])
    return groups


def _first_per_row(table: pa.Table) -> pa.Table:
    """Sorted by ``_row``, keeping one row per ``_row`` value: the copy from the first part listed."""
    order = pc.sort_indices(table, [(ROW_COL, "ascending"), ("_part", "ascending")])
    table = table.take(order)
    rows = table.column(ROW_COL).to_numpy()
    parts = table.column("_part").to_numpy()
    # a row kept from part p keeps every one of its rows from p (documents give several signature rows)
    first = np.ones(len(rows), bool)
    first[1:] = rows[1:] != rows[:-1]
    chosen = np.maximum.accumulate(np.where(first, np.arange(len(rows)), 0))
    return table.filter(pa.array(parts == parts[chosen])).drop_columns(["_part"])


def _read_group(fs, group: list[dict], key: str) -> pa.Table:
    tables = [read_parquet(fs, p[key]) for p in group]
    if len(tables) == 1:
        return tables[0]
    tables = [t.append_column("_part", pa.array(np.full(t.num_rows, i), pa.int64())) for i, t in enumerate(tables)]
    return _first_per_row(pa.concat_tables(tables, promote_options="default"))


def assembled_batches(fs, parts: list[dict], batch_size: int, key: str = "path") -> Iterator[pa.Table]:
    """Stream a shard's parts (``key``: rows or signatures) in ``_row`` order, without ``_row``.

    Non-overlapping parts (the normal case) stream one at a time; overlapping ones are loaded together,
    sorted and de-duplicated.
    """
    for group in _overlap_groups(parts):
        table = _read_group(fs, group, key).drop_columns([ROW_COL])
        for start in range(0, table.num_rows, batch_size):
            yield table.slice(start, batch_size)


def assemble_shard(fs, root: str, plan: Plan, seg: int, item: WorkItem, parts: list[dict],
                   out: OutputConfig, batch_size: int) -> ShardResult | None:
    """Feed a shard's mapped rows, in reading order, to the same output the local engine uses (which
    writes the shard's done marker, or on the last segment its shards and marker). On the last segment
    the rows get their image bytes and input-only columns back from the re-read input shard."""
    segment = plan.segments[seg]
    rereadable = is_rereadable(item.reader)
    output = SegmentOutput(fs, root, plan, segment, item.shard, out, rereadable)
    timings: Timings = merge_timings(p.get("timings") for p in parts)
    exchange: Timings = {}
    try:
        rows = _timed(assembled_batches(fs, parts, batch_size), exchange)
        if segment.global_stage is None:
            if rereadable:
                schema = DOCUMENT_SCHEMA if item.shard.row_kind == "document" else PAIR_SCHEMA
                rows = rejoin_input(rows, _timed(item.reader.read(item.shard, batch_size), exchange), schema)
            for batch in rows:
                output.write(batch)
        else:
            for batch in rows:
                output.write_mapped(batch)
            sig_parts = [p for p in parts if p.get("sig_path")]
            output.add_signatures(list(_timed(assembled_batches(fs, sig_parts, 1 << 30, "sig_path"), exchange)))
        add_timing(exchange, EXCHANGE_READ, sum(p["rows"] for p in parts), 0.0)
    except BaseException:
        output.abort()
        raise
    result = output.close(merge_timings([timings, exchange]))
    clear_parts(fs, root, seg, item.shard)
    return result


def _timed(batches, timings: Timings) -> Iterator[pa.Table]:
    """Count the time spent producing each batch as exchange reading."""
    it = iter(batches)
    while True:
        t = Stopwatch()
        batch = next(it, None)
        t.add_to(timings, EXCHANGE_READ, 0)
        if batch is None:
            return
        yield batch


def clear_parts(fs, root: str, seg: int, shard: InputShard) -> None:
    d = parts_dir(root, seg, shard)
    if fs.exists(d):
        fs.rm(d, recursive=True)
