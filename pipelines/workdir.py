"""Intermediate files between plan segments, under ``<output>/_work/`` (all written atomically).

    _work/seg{i}/rows/<source>/<shard>.parquet        rows after segment i's map stages
    _work/seg{i}/signatures/<source>/<shard>.parquet  segment i's global-stage signatures
    _work/seg{i}/done/<source>/<shard>.json           marker: both files above are complete
    _work/seg{i}/decisions.parquet                    segment i's whole-dataset decisions
    _work/seg{i}/summary.json                         the global stage's summary, if it gives one

Rows dropped by a curation decision keep their identity and reason but lose their image bytes here
(nothing later needs them; quarantined rows keep theirs for the quarantine folder).
"""

from __future__ import annotations

import contextlib
import json
import posixpath
import uuid
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.aggregate import normalize_decisions
from pipelines.readers.base import InputShard
from pipelines.writers.atomic import write_json_atomic, write_parquet_atomic
from schemas.rows import check_schema_version
from schemas.table_ops import replace_columns

WORK_DIR = "_work"


def seg_dir(root: str, seg: int) -> str:
    return posixpath.join(root, WORK_DIR, f"seg{seg}")


def rows_path(root: str, seg: int, shard: InputShard) -> str:
    return posixpath.join(seg_dir(root, seg), "rows", shard.source, f"{shard.shard_id}.parquet")


def signatures_path(root: str, seg: int, shard: InputShard) -> str:
    return posixpath.join(seg_dir(root, seg), "signatures", shard.source, f"{shard.shard_id}.parquet")


def done_path(root: str, seg: int, shard: InputShard) -> str:
    return posixpath.join(seg_dir(root, seg), "done", shard.source, f"{shard.shard_id}.json")


def decisions_path(root: str, seg: int) -> str:
    return posixpath.join(seg_dir(root, seg), "decisions.parquet")


def slim_dropped(batch: pa.Table) -> pa.Table:
    """Null the payload of rows a curation decision dropped (not of quarantined rows)."""
    dropped = pc.and_(pc.is_valid(batch.column("drop_reason")),
                      pc.invert(pc.fill_null(batch.column("quarantined"), False)))
    if not pc.any(dropped).as_py():
        return batch
    if "image" in batch.column_names:
        batch = replace_columns(batch, {"image": pc.if_else(dropped, pa.scalar(None, pa.binary()),
                                                            batch.column("image"))})
    return batch


class IntermediateWriter:
    """Streams one shard's rows to a temp parquet file; ``commit()`` renames it into place."""

    def __init__(self, fs, path: str, schema: pa.Schema) -> None:
        self.fs, self.path = fs, path
        self.tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
        self._file = fs.open(self.tmp, "wb")
        self._writer = pq.ParquetWriter(self._file, schema, compression="zstd")

    def write(self, batch: pa.Table) -> None:
        self._writer.write_table(slim_dropped(batch))

    def commit(self) -> None:
        self._writer.close()
        self._file.close()
        self.fs.mv(self.tmp, self.path)

    def abort(self) -> None:
        for close in (self._writer.close, self._file.close):
            with contextlib.suppress(Exception):  # the original error is what matters; clean up regardless
                close()
        if self.fs.exists(self.tmp):
            self.fs.rm(self.tmp)


def read_rows(fs, path: str, batch_size: int) -> Iterator[pa.Table]:
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        check_schema_version(pf.schema_arrow)
        for rb in pf.iter_batches(batch_size=batch_size):
            yield pa.Table.from_batches([rb], schema=pf.schema_arrow)


def write_signatures(fs, root: str, seg: int, shard: InputShard, parts: list[pa.Table]) -> None:
    table = pa.concat_tables(parts, promote_options="default").combine_chunks() if parts else pa.table({})
    write_parquet_atomic(fs, signatures_path(root, seg, shard), table)


def read_signatures(fs, root: str, seg: int, shards: list[InputShard]) -> pa.Table:
    parts = []
    for shard in shards:
        with fs.open(signatures_path(root, seg, shard), "rb") as f:
            t = pq.read_table(f)
        if t.num_columns:
            parts.append(t)
    return pa.concat_tables(parts, promote_options="default") if parts else pa.table({})


def write_done(fs, root: str, seg: int, shard: InputShard, payload: dict[str, Any]) -> None:
    write_json_atomic(fs, done_path(root, seg, shard), payload)


def read_done(fs, root: str, seg: int, shard: InputShard) -> dict[str, Any] | None:
    path = done_path(root, seg, shard)
    if not fs.exists(path):
        return None
    try:
        with fs.open(path, "rb") as f:
            return json.load(f)
    except ValueError:
        return None


def write_decisions(fs, root: str, seg: int, decisions: pa.Table, seg_hash: str) -> None:
    decisions = normalize_decisions(decisions).sort_by([("source", "ascending"), ("key", "ascending"),
                                   ("image_index", "ascending")]).combine_chunks()
    meta = {b"vila2.segment_hash": seg_hash.encode()}
    write_parquet_atomic(fs, decisions_path(root, seg), decisions.replace_schema_metadata(meta))


def read_decisions(fs, root: str, seg: int, seg_hash: str | None = None) -> pa.Table | None:
    path = decisions_path(root, seg)
    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as f:
        t = pq.read_table(f)
    if seg_hash is not None and (t.schema.metadata or {}).get(b"vila2.segment_hash") != seg_hash.encode():
        return None
    return t
