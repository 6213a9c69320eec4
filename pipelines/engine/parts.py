"""Pieces shared by the distributed engines (Ray Data, Beam).

Distributed map stages see batches in any order and any grouping, but output must not depend on the
engine. So the reader tags every row with ``_row`` (shard index << 32 | row number); after the map
stages each batch is written as *part* files, one per input shard it holds; a per-shard assembly step
reads its parts back in ``_row`` order and feeds exactly the same SegmentOutput the local engine uses.
Part names derive from their rows, so a retried task overwrites rather than duplicates a part; the
assembly also drops repeated ``_row`` values.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.compute as pc

from vila2_curate.pipelines.engine.plan import Plan
from vila2_curate.pipelines.engine.progress import ShardResult
from vila2_curate.pipelines.engine.runner import WorkItem
from vila2_curate.pipelines.engine.shard_task import SegmentOutput, Timings, input_batches, is_rereadable
from vila2_curate.pipelines.engine.workdir import seg_dir
from vila2_curate.pipelines.io.readers.base import InputShard
from vila2_curate.pipelines.io.writers.atomic import read_parquet, write_parquet_atomic
from vila2_curate.schemas.config import OutputConfig

ROW_COL = "_row"
SHARD_BITS = 32


def uses_model(stage) -> bool:
    """Model stages run where a model is loaded once per worker (Ray actor pool, Beam RunInference)."""
    return stage.resources.gpus > 0 or stage.loads_model


def parts_dir(root: str, seg: int, shard: InputShard) -> str:
    return posixpath.join(seg_dir(root, seg), "parts", f"{shard.source}.{shard.shard_id}")


def clear_segment_parts(fs, root: str, seg: int) -> None:
    """After every pending shard is assembled: the (empty) parts folder goes too."""
    d = posixpath.join(seg_dir(root, seg), "parts")
    if fs.exists(d):
        fs.rm(d, recursive=True)


def tagged_batches(fs, root: str, plan: Plan, item: WorkItem, seg: int, batch_size: int) -> Iterator[pa.Table]:
    """The segment's input rows for one shard (its own decisions applied), each tagged with its ``_row``."""
    offset = item.index << SHARD_BITS
    timings: Timings = {}
    for batch in input_batches(fs, root, plan, item.reader, item.shard, seg, batch_size, timings):
        rows = pa.array(range(offset, offset + batch.num_rows), type=pa.int64())
        offset += batch.num_rows
        yield batch.append_column(ROW_COL, rows)


def write_parts(fs, root: str, seg: int, batch: pa.Table, shards: list[InputShard]) -> list[dict]:
    """Write one mapped batch as part files (one per input shard present); returns their descriptions."""
    out = []
    shard_of = pc.shift_right(batch.column(ROW_COL), SHARD_BITS)
    for idx in sorted(pc.unique(shard_of).to_pylist()):
        piece = batch.filter(pc.equal(shard_of, idx)).sort_by(ROW_COL)
        rows = piece.column(ROW_COL)
        first, last = rows[0].as_py(), rows[-1].as_py()
        path = posixpath.join(parts_dir(root, seg, shards[idx]), f"{first:020d}-{last:020d}.parquet")
        write_parquet_atomic(fs, path, piece.combine_chunks())
        out.append({"shard_index": idx, "path": path, "first": first, "last": last, "rows": piece.num_rows})
    return out


def assembled_batches(fs, parts: list[dict], batch_size: int) -> Iterator[pa.Table]:
    """Stream a shard's parts in ``_row`` order, without the ``_row`` column.

    Non-overlapping parts (the normal case) stream one at a time; overlapping ones (a retried task that
    re-split a batch) are loaded together, sorted and de-duplicated.
    """
    parts = sorted(parts, key=lambda p: (p["first"], p["last"]))
    groups: list[list[dict]] = []
    for p in parts:
        if groups and p["first"] <= max(q["last"] for q in groups[-1]):
            groups[-1].append(p)
        else:
            groups.append([p])
    for group in groups:
        tables = []
        for p in group:
            tables.append(read_parquet(fs, p["path"]))
        table = pa.concat_tables(tables).sort_by(ROW_COL) if len(tables) > 1 else tables[0]
        if len(tables) > 1:
            rows = table.column(ROW_COL).to_pylist()
            keep = [i == 0 or rows[i] != rows[i - 1] for i in range(len(rows))]
            table = table.filter(pa.array(keep))
        table = table.drop_columns([ROW_COL])
        for start in range(0, table.num_rows, batch_size):
            yield table.slice(start, batch_size)


def assemble_shard(fs, root: str, plan: Plan, seg: int, item: WorkItem, parts: list[dict],
                   out: OutputConfig, batch_size: int, timings: Timings | None = None) -> ShardResult | None:
    """Feed a shard's mapped rows, in reading order, to the same output the local engine uses (which
    writes the shard's done marker, or on the last segment its shards and marker)."""
    segment = plan.segments[seg]
    output = SegmentOutput(fs, root, plan, segment, item.shard, out, is_rereadable(item.reader))
    try:
        for batch in assembled_batches(fs, parts, batch_size):
            output.write(batch)
    except BaseException:
        output.abort()
        raise
    result = output.close(timings or {})
    clear_parts(fs, root, seg, item.shard)
    return result


def clear_parts(fs, root: str, seg: int, shard: InputShard) -> None:
    d = parts_dir(root, seg, shard)
    if fs.exists(d):
        fs.rm(d, recursive=True)
