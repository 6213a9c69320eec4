"""Intermediate files between plan segments, under ``<output>/_work/`` (all written atomically).

    _work/seg{i}/<source>.<shard>.rows.parquet       per-row columns after segment i's map stages
    _work/seg{i}/<source>.<shard>.sig.parquet        segment i's global-stage signatures (removed once
                                                     the segment is decided: nothing reads them again)
    _work/seg{i}/<source>.<shard>.done.json          marker: both files above are complete (markers.py)
    _work/seg{i}/<source>.<shard>.decisions.parquet  segment i's decisions about that input shard's rows
    _work/seg{i}/decided.json                        marker (segment hash): every shard's decisions written
    _work/seg{i}/summary.json                        the global stage's summary, if it gives one
    _work/seg{i}/samples/<source>.<shard>.parquet    a partitioned decide's step-0 samples (removed once fitted)
    _work/seg{i}/components/                         dedup's combine on the engine: bucket files per shard
                                                     (edges, pending, rounds, labels, decisions;
                                                     pipelines/engine/components.py), removed at its end

One folder per segment (source names hold no '.'), so the layout adds no directory per source or shard.

Intermediate rows leave out what segment i+1 can read again: inputs are immutable, so segment i+1
re-reads the input shard through its reader and joins the saved columns by row order (same rows, same
order; keys are checked). Left out: the columns no stage changes (``INPUT_COLUMNS``: the url and source
key; a document's similarity matrix and url-duplicate count), and an image's bytes and its ``meta``
(source metadata, in which normalize records what it did) unless normalize changed the image (EXIF
rotation, re-encoding). Captions (``text``, ``text_list``) are stored like every other column, because
caption hygiene rewrites them. Rows dropped by a curation decision get no image back (nothing later needs
it); quarantined rows do, for the quarantine folder. A source that cannot be read again identically (URL
fetching) keeps whole rows.
"""

from __future__ import annotations

import contextlib
import posixpath
import uuid
from collections.abc import Iterable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from vila2_curate.pipelines.engine.aggregate import normalize_decisions
from vila2_curate.pipelines.io.parquet_read import open_parquet, read_parquet
from vila2_curate.pipelines.io.readers.base import InputShard
from vila2_curate.pipelines.io.writers.atomic import write_parquet_atomic
from vila2_curate.schemas.rows import check_schema_version, conform
from vila2_curate.schemas.table_ops import replace_columns

WORK_DIR = "_work"


def seg_dir(root: str, seg: int) -> str:
    return posixpath.join(root, WORK_DIR, f"seg{seg}")


def _shard_file(root: str, seg: int, shard: InputShard, suffix: str) -> str:
    return posixpath.join(seg_dir(root, seg), f"{shard.source}.{shard.shard_id}.{suffix}")


def rows_path(root: str, seg: int, shard: InputShard) -> str:
    return _shard_file(root, seg, shard, "rows.parquet")


def signatures_path(root: str, seg: int, shard: InputShard) -> str:
    return _shard_file(root, seg, shard, "sig.parquet")


def done_path(root: str, seg: int, shard: InputShard) -> str:
    return _shard_file(root, seg, shard, "done.json")


def shard_decisions_path(root: str, seg: int, shard: InputShard) -> str:
    return _shard_file(root, seg, shard, "decisions.parquet")


def remove_signatures(fs, root: str, seg: int, shards: list[InputShard]) -> None:
    """Once a segment is decided its signatures are spent (a rerun reuses the decisions)."""
    for shard in shards:
        path = signatures_path(root, seg, shard)
        if fs.exists(path):
            fs.rm(path)


def samples_dir(root: str, seg: int) -> str:
    """Per-shard samples of a partitioned decide's step 0 (removed once fitted)."""
    return posixpath.join(seg_dir(root, seg), "samples")


def sample_path(root: str, seg: int, shard: InputShard) -> str:
    return posixpath.join(samples_dir(root, seg), f"{shard.source}.{shard.shard_id}.parquet")


# Columns the reader yields again, unchanged by every stage: never stored in _work (segment i+1 takes
# them from the re-read input shard). Not text / text_list: the caption_hygiene stage rewrites them, so
# they are saved like any column.
INPUT_COLUMNS = {"pair": ("source_key", "url"),
                 "document": ("source_key", "url", "similarity_matrix", "could_have_url_duplicate")}
_REENCODED = '"reencoded"'  # the meta key normalize sets when it changed an image's bytes


class InputChangedError(RuntimeError):
    """The input shard no longer matches the rows a previous segment saved (inputs must be immutable)."""


def _row_kind(schema: pa.Schema) -> str:
    return "document" if "image_info" in schema.names else "pair"


def work_schema(schema: pa.Schema) -> pa.Schema:
    """The intermediate file's schema: the row schema without the input-only columns."""
    drop = INPUT_COLUMNS[_row_kind(schema)]
    return pa.schema([f for f in schema if f.name not in drop], metadata=schema.metadata)


def _changed_by_normalize(meta: pa.ChunkedArray | pa.Array) -> pa.Array:
    return pc.fill_null(pc.match_substring(meta, _REENCODED), False)


def _dropped_by_decision(batch: pa.Table) -> pa.ChunkedArray:
    """Rows a curation decision dropped (quarantined rows are not: they keep their image)."""
    return pc.and_(pc.is_valid(batch.column("drop_reason")),
                   pc.invert(pc.fill_null(batch.column("quarantined"), False)))


def slim_for_work(batch: pa.Table) -> pa.Table:
    """What segment i+1 cannot get back from the input shard: the input-only columns go, image bytes and
    metadata stay only where normalize changed the image, dedup thumbnails go (its signatures hold them)."""
    kind = _row_kind(batch.schema)
    if kind == "pair":
        changed = _changed_by_normalize(batch.column("meta"))
        dropped = _dropped_by_decision(batch)
        keep_image = pc.and_(changed, pc.invert(dropped))
        batch = replace_columns(batch, {
            "image": pc.if_else(keep_image, batch.column("image"), pa.scalar(None, pa.binary())),
            "meta": pc.if_else(changed, batch.column("meta"), pa.scalar(None, pa.string())),
            "thumb": pa.nulls(batch.num_rows, pa.binary())})
    else:
        # documents hold at most a few images each; a python pass over the nested structs is simplest
        infos = batch.column("image_info").to_pylist()
        for images in infos:
            for im in images or []:
                im["thumb"] = None
                if _REENCODED not in (im.get("meta") or ""):
                    im["image"] = im["meta"] = None
        batch = replace_columns(batch, {"image_info": infos})
    return batch.drop_columns(list(INPUT_COLUMNS[kind]))


def restore_from_input(work: pa.Table, source: pa.Table, schema: pa.Schema) -> pa.Table:
    """Join one batch of saved per-row columns with the same rows re-read from the input shard."""
    if work.num_rows != source.num_rows or not work.column("key").equals(source.column("key")):
        raise InputChangedError("the input shard's rows differ from the ones an earlier segment saved; "
                                "inputs must not change during a run (remove _work/ to start over)")
    cols: dict = {name: source.column(name) for name in INPUT_COLUMNS[_row_kind(schema)]}
    if _row_kind(schema) == "pair":
        dropped = _dropped_by_decision(work)
        image = pc.coalesce(work.column("image"), source.column("image"))
        cols["image"] = pc.if_else(dropped, pa.scalar(None, pa.binary()), image)
        cols["meta"] = pc.coalesce(work.column("meta"), source.column("meta"))
    else:
        infos, originals = work.column("image_info").to_pylist(), source.column("image_info").to_pylist()
        for images, orig in zip(infos, originals, strict=True):
            if len(images or []) != len(orig or []):
                raise InputChangedError("a document's images differ from the ones an earlier segment saved")
            for im, o in zip(images or [], orig or [], strict=True):
                if im.get("image") is None:
                    im["image"] = o.get("image")
                if im.get("meta") is None:
                    im["meta"] = o.get("meta")
        cols["image_info"] = infos
    table = conform(work, schema)
    return replace_columns(table, cols)


def rejoin_input(work_batches: Iterator[pa.Table], input_batches: Iterable[pa.Table],
                 schema: pa.Schema) -> Iterator[pa.Table]:
    """Stream saved rows joined with the re-read input rows, by row order, batch by batch."""
    inputs = iter(input_batches)
    buffered: list[pa.Table] = []
    have = 0
    for work in work_batches:
        while have < work.num_rows:
            nxt = next(inputs, None)
            if nxt is None:
                raise InputChangedError("the input shard has fewer rows than an earlier segment saved")
            buffered.append(nxt)
            have += nxt.num_rows
        pool = pa.concat_tables(buffered) if len(buffered) > 1 else buffered[0]
        rest = pool.slice(work.num_rows)
        buffered, have = ([rest] if rest.num_rows else []), rest.num_rows
        yield restore_from_input(work, pool.slice(0, work.num_rows), schema)
    if have or any(b.num_rows for b in inputs):
        raise InputChangedError("the input shard has more rows than an earlier segment saved")


def slim_dropped(batch: pa.Table) -> pa.Table:
    """Null the image bytes of pair rows a curation decision dropped (not of quarantined rows), and the
    dedup thumbnails."""
    if "image" not in batch.column_names:
        return batch
    dropped = _dropped_by_decision(batch)
    return replace_columns(batch, {"image": pc.if_else(dropped, pa.scalar(None, pa.binary()),
                                                        batch.column("image")),
                                   "thumb": pa.nulls(batch.num_rows, pa.binary())})


def is_slim(fs, path: str) -> bool:
    """Whether a rows file was written by ``slim_for_work`` (needs the input shard joined back)."""
    with open_parquet(fs, path) as pf:
        names = pf.schema_arrow.names
    return "url" not in names


class IntermediateWriter:
    """Streams one shard's slimmed rows (``slim_for_work``) to a temp parquet file; ``commit()`` renames
    it into place."""

    def __init__(self, fs, path: str, schema: pa.Schema, rereadable: bool = True) -> None:
        self.fs, self.path = fs, path
        self.tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
        self._file = fs.open(self.tmp, "wb")
        # a source that cannot be read again identically (URL fetching) keeps whole rows
        self.slim = rereadable
        self.schema = work_schema(schema) if rereadable else schema
        # no column statistics: nothing filters these files, and on small shards they cost as much as data
        self._writer = pq.ParquetWriter(self._file, self.schema, compression="zstd", write_statistics=False)

    def write(self, batch: pa.Table) -> None:
        if self.slim:
            batch = slim_for_work(batch).select(self.schema.names).cast(self.schema)
        else:
            batch = slim_dropped(batch)
        self._writer.write_table(batch)

    def write_slim(self, batch: pa.Table) -> None:
        """Rows already slimmed where they were mapped (a distributed engine's parts)."""
        self._writer.write_table(batch.select(self.schema.names).cast(self.schema))

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
    with open_parquet(fs, path) as pf:
        check_schema_version(pf.schema_arrow)
        for rb in pf.iter_batches(batch_size=batch_size):
            yield pa.Table.from_batches([rb], schema=pf.schema_arrow)


def write_signatures(fs, root: str, seg: int, shard: InputShard, parts: list[pa.Table]) -> None:
    table = pa.concat_tables(parts, promote_options="default").combine_chunks() if parts else pa.table({})
    write_parquet_atomic(fs, signatures_path(root, seg, shard), table)


def write_shard_decisions(fs, root: str, seg: int, shard: InputShard, decisions: pa.Table,
                          seg_hash: str) -> int:
    """One input shard's decisions, sorted (the same bytes whatever engine or grouping made them)."""
    decisions = normalize_decisions(decisions).sort_by([("source", "ascending"), ("key", "ascending"),
                                   ("image_index", "ascending")]).combine_chunks()
    meta = {b"vila2.segment_hash": seg_hash.encode()}
    write_parquet_atomic(fs, shard_decisions_path(root, seg, shard), decisions.replace_schema_metadata(meta))
    return decisions.num_rows


def read_shard_decisions(fs, root: str, seg: int, shard: InputShard, seg_hash: str | None = None) -> pa.Table:
    """The decisions about one input shard's rows: all a shard task loads (never the whole dataset's)."""
    path = shard_decisions_path(root, seg, shard)
    t = read_parquet(fs, path)
    if seg_hash is not None and (t.schema.metadata or {}).get(b"vila2.segment_hash") != seg_hash.encode():
        raise RuntimeError(f"{path} belongs to another run configuration")
    return t


def read_all_decisions(fs, root: str, seg: int, shards: list[InputShard]) -> pa.Table:
    """Every shard's decisions of a segment in one table (summaries and tests; small runs only)."""
    parts = [read_shard_decisions(fs, root, seg, s) for s in shards]
    return pa.concat_tables(parts) if parts else normalize_decisions(None)
