"""Reader for COYO-700M-style parquet: one row per image-text pair, image as bytes or as a path/URL.

The published COYO-700M parquet has no image column (id, url, text, width, height, image_phash,
text_length, word_count, num_tokens_bert, num_tokens_gpt, num_faces, clip_similarity_vitb32,
clip_similarity_vitl14, nsfw_score_opennsfw2, nsfw_score_gantman, watermark_score,
aesthetic_score_laion_v2); the user adds one, either the bytes (``image_column``) or a path/URL
(``image_path_column``). A path resolves only inside ``image_root`` (refs.py); an http(s) URL, such as
COYO's own ``url`` column, is downloaded only with ``fetch_remote: true`` (fetch.py), concurrently in a
window of rows that still leave in file order. ``width`` / ``height`` there describe the image at
the URL, not necessarily the stored bytes, so they stay in meta; normalize measures the real ones.
"""

from __future__ import annotations

import posixpath
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from vila2_curate.pipelines.io.readers._common import (
    READ_STAGE,
    KeyRegistry,
    base_row,
    batched_tables,
    expand_paths,
    make_shards,
    quarantine,
    url_to_fs,
)
from vila2_curate.pipelines.io.readers.base import InputShard, SourceFormatError
from vila2_curate.pipelines.io.readers.corrupt import LostRows, lost_rows_row, parquet_batches
from vila2_curate.pipelines.io.readers.fetch import REFUSED, REFUSED_REASON, SUCCESS, Fetcher, FetchResult
from vila2_curate.pipelines.io.readers.refs import UNSAFE_REASON, ImageRoot, UnsafeRef
from vila2_curate.pipelines.io.readers.text import arrow_records, invalid_utf8_reason
from vila2_curate.pipelines.io.values import as_str, short_error, to_meta_json
from vila2_curate.schemas.config import SourceConfig
from vila2_curate.schemas.images import sniff_image_format
from vila2_curate.schemas.rows import PAIR_SCHEMA

PARQUET_SUFFIXES = (".parquet",)
_STREAM_BUFFER = 1 << 20  # buffered column-chunk reads: memory follows pages, not whole row groups


class CoyoParquetReader:
    """Streams COYO-style parquet files as PAIR_SCHEMA tables with ParquetFile.iter_batches."""

    row_kind = "pair"

    def __init__(self, source: SourceConfig) -> None:
        if (source.image_column is None) == (source.image_path_column is None):
            raise SourceFormatError(
                f"source {source.name!r}: coyo_parquet needs exactly one of image_column (bytes) or "
                "image_path_column (path/URL read through fsspec)"
            )
        self.source = source

    def list_shards(self) -> list[InputShard]:
        shards = make_shards(self.source, expand_paths(self.source, PARQUET_SUFFIXES), self.row_kind)
        if shards:  # fail early on a wrong column mapping; every other shard is checked when read
            fs, path = url_to_fs(shards[0].path, self.source.storage_options)
            with fs.open(path, "rb") as f:
                self._check_columns(self._open_parquet(f, shards[0].path).schema_arrow, shards[0].path)
        return shards

    def _check_columns(self, schema: pa.Schema, where: str) -> None:
        s = self.source
        roles = {"key_column": s.key_column, "text_column": s.text_column, "url_column": s.url_column,
                 "image_column": s.image_column, "image_path_column": s.image_path_column}
        missing: dict[str, list[str]] = {}  # one entry per column, with every setting that names it
        for setting, column in roles.items():
            if column is not None and column not in schema.names:
                missing.setdefault(column, []).append(setting)
        if missing:
            what = ", ".join(f"{c!r} (source {s.name!r} {' and '.join(settings)})" for c, settings in missing.items())
            raise SourceFormatError(
                f"{where}: missing required column {what}; the file has {schema.names}. Set the column "
                "names in the source config"
            )

    def _open_parquet(self, f: Any, where: str) -> pq.ParquetFile:
        """The file's parquet reader; no footer (not parquet, cut short) is a source error naming the file."""
        try:
            return pq.ParquetFile(f, buffer_size=_STREAM_BUFFER, pre_buffer=False)
        except (pa.ArrowException, OSError, ValueError) as e:  # ValueError: undecodable names in the footer
            raise SourceFormatError(f"source {self.source.name!r}: {where} is not a readable parquet file: "
                                    f"{' '.join(short_error(e).split())}") from e  # one line: see cli

    def read(self, shard: InputShard, batch_size: int) -> Iterator[pa.Table]:
        fs, path = url_to_fs(shard.path, self.source.storage_options)
        with fs.open(path, "rb") as f:
            pf = self._open_parquet(f, shard.path)
            self._check_columns(pf.schema_arrow, shard.path)  # before any row work
            keys = KeyRegistry()
            root = ImageRoot.from_config(self.source.image_root or "", self.source,
                                         fallback=(fs, posixpath.dirname(path)))  # default: beside the parquet
            s = self.source
            fetcher = (Fetcher(s.fetch, s.fetch_schemes, s.allow_private_networks)
                       if s.fetch_remote and s.image_path_column is not None else None)

            # when fetching, a sliding window of rows is in flight: rows leave in file order as soon as the
            # head's download is done, and the reader blocks on the head only when the window is full
            # (fetch.prefetch_rows rows, or fetch.prefetch_bytes of downloaded images waiting behind a slow
            # head), so one slow host never idles the other threads and memory stays bounded
            window_size = s.fetch.prefetch_rows if fetcher is not None else 0
            held = _HeldBytes(s.fetch.prefetch_bytes)

            def rows() -> Iterator[dict[str, Any]]:
                window: deque[_Pending] = deque()
                index = 0
                for batch in parquet_batches(pf, batch_size):
                    if isinstance(batch, LostRows):  # a corrupt row group: earlier rows first, in file order
                        while window:
                            yield _finish(window.popleft(), held)
                        yield lost_rows_row(shard, keys, batch)
                        continue
                    for rec, bad_text in arrow_records(batch):  # invalid UTF-8 -> that row, not the run
                        pending = self._row(shard, keys, index, rec, root, fetcher, bad_text)
                        if pending.future is not None:
                            pending.future.add_done_callback(held.arrived)
                        window.append(pending)
                        index += 1
                        while window and (len(window) > window_size or held.full() or window[0].ready()):
                            yield _finish(window.popleft(), held)
                while window:
                    yield _finish(window.popleft(), held)

            try:
                yield from batched_tables(rows(), PAIR_SCHEMA, batch_size)
            finally:
                if fetcher is not None:
                    fetcher.close()

    # ------------------------------------------------------------------------------------------ rows

    def _row(
        self,
        shard: InputShard,
        keys: KeyRegistry,
        index: int,
        rec: dict[str, Any],
        root: ImageRoot,
        fetcher: Fetcher | None,
        bad_text: list[str] | None = None,
    ) -> _Pending:
        s = self.source
        for col in bad_text or ():
            if col in (s.image_path_column, s.url_column):
                rec[col] = None  # a reference we cannot read faithfully is never opened or fetched
        raw = rec.get(s.key_column)
        raw_key = str(raw) if raw is not None else f"{shard.shard_id}_row{index:09d}"
        key, source_key, duplicate = keys.claim(raw_key)
        row = base_row(shard, key, source_key)
        row["url"] = as_str(rec.get(s.url_column))
        text = rec.get(s.text_column)
        row["text"] = "" if text is None else as_str(text)
        mapped = {s.key_column, s.text_column, s.url_column, s.image_column, s.image_path_column}
        meta = {k: v for k, v in rec.items() if k not in mapped}
        pending = _Pending(row, meta)
        if bad_text:
            pending.problem = invalid_utf8_reason(bad_text)
        if raw is None:
            pending.problem = "key_missing"
        if duplicate:
            pending.problem = "duplicate_key"
        if s.image_column is not None:
            data = rec.get(s.image_column)
            if data is None:
                pending.image_problem = "image_missing"
            else:
                row["image"] = bytes(data)
                row["image_format"] = sniff_image_format(row["image"])
            return pending
        ref = rec.get(s.image_path_column or "")
        if ref is None or ref == "":
            pending.image_problem = "image_path_missing"
            return pending
        meta["image_path"] = str(ref)
        try:
            target = root.resolve(str(ref))  # data may only reach inside image_root (or an allowed URL)
        except UnsafeRef as e:
            meta["unsafe_ref"] = e.why
            pending.image_problem = UNSAFE_REASON
            return pending
        if target.url is not None:
            if pending.problem is None and fetcher is not None:  # a row quarantined anyway is not fetched
                pending.url = target.url
                pending.future = fetcher.submit(target.url)
            elif fetcher is None:
                meta["unsafe_ref"] = "URL reference but the source does not set fetch_remote: true"
                pending.image_problem = UNSAFE_REASON
            return pending
        try:
            row["image"] = root.read(str(target.path))
            row["image_format"] = sniff_image_format(row["image"], str(ref))
        except Exception as e:  # noqa: BLE001 - any fsspec/backend error is bad input for this row
            pending.image_problem = f"image_unreadable: {short_error(e)}"
        return pending


class _Pending:
    """A row whose image may still be downloading; ``_finish`` settles its reason once it has arrived."""

    __slots__ = ("row", "meta", "problem", "image_problem", "url", "future")

    def __init__(self, row: dict[str, Any], meta: dict[str, Any]) -> None:
        self.row = row
        self.meta = meta
        self.problem: str | None = None  # key problems: quarantine, take precedence over image problems
        self.image_problem: str | None = None
        self.url: str | None = None
        self.future: Future[FetchResult] | None = None

    def ready(self) -> bool:
        return self.future is None or self.future.done()


class _HeldBytes:
    """Bytes of downloaded images still waiting in the reader's window (the fetch's memory bound)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self._lock = threading.Lock()

    def arrived(self, future: Future[FetchResult]) -> None:
        if not future.cancelled() and (data := future.result().data):
            with self._lock:
                self.held += len(data)

    def emitted(self, result: FetchResult) -> None:
        if result.data:
            with self._lock:
                self.held -= len(result.data)

    def full(self) -> bool:
        return self.held > self.limit


def _finish(p: _Pending, held: _HeldBytes) -> dict[str, Any]:
    """The final row: fetch outcome in meta["fetch"] (img2dataset's status / error_message), then reasons.

    A refused address is hostile input (quarantined); a failed download, an opt-out or an oversized body
    is a property of the remote site, so the row is dropped at read with that status as its reason.
    """
    row, dropped = p.row, None
    if p.future is not None:
        result = p.future.result()
        held.emitted(result)
        p.meta["fetch"] = result.meta()
        if result.status == SUCCESS:
            row["image"] = result.data
            row["image_format"] = sniff_image_format(result.data, posixpath.basename(str(p.url).split("?")[0]))
        elif result.status == REFUSED:
            p.image_problem = REFUSED_REASON
        else:
            dropped = result.status  # failed_to_download | opt_out | image_too_large
    problem = p.problem or p.image_problem
    if problem is None and dropped is None and not row.get("image"):
        problem = "image_empty"
    row["meta"] = to_meta_json(p.meta)
    if problem:
        return quarantine(row, problem)
    if dropped:
        row["drop_reason"] = dropped
        row["drop_stage"] = READ_STAGE
    return row
