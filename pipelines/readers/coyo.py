"""Reader for COYO-700M-style parquet: one row per image-text pair, image as bytes or as a path/URL.

The published COYO-700M parquet has no image column (id, url, text, width, height, image_phash,
text_length, word_count, num_tokens_bert, num_tokens_gpt, num_faces, clip_similarity_vitb32,
clip_similarity_vitl14, nsfw_score_opennsfw2, nsfw_score_gantman, watermark_score,
aesthetic_score_laion_v2); the user adds one, either the bytes (``image_column``) or a path/URL
(``image_path_column``, relative to ``image_root``). ``width`` / ``height`` there describe the image at
the URL, not necessarily the stored bytes, so they stay in meta; normalize measures the real ones.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.spec import AbstractFileSystem

from pipelines.readers._common import (
    KeyRegistry,
    as_str,
    base_row,
    batched_tables,
    expand_paths,
    make_shards,
    quarantine,
    short_error,
    sniff_image_format,
    to_meta_json,
    url_to_fs,
)
from pipelines.readers.base import InputShard, SourceFormatError
from pipelines.readers.text import arrow_records, invalid_utf8_reason
from schemas.config import SourceConfig
from schemas.rows import PAIR_SCHEMA

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
                self._check_columns(pq.ParquetFile(f).schema_arrow, shards[0].path)
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

    def read(self, shard: InputShard, batch_size: int) -> Iterator[pa.Table]:
        fs, path = url_to_fs(shard.path, self.source.storage_options)
        with fs.open(path, "rb") as f:
            try:
                pf = pq.ParquetFile(f, buffer_size=_STREAM_BUFFER, pre_buffer=False)
            except (pa.ArrowInvalid, OSError) as e:
                raise SourceFormatError(
                    f"source {self.source.name!r}: {shard.path} is not a readable parquet file: {e}"
                ) from e
            self._check_columns(pf.schema_arrow, shard.path)  # before any row work
            keys = KeyRegistry()
            if self.source.image_root is not None:
                root = url_to_fs(self.source.image_root, self.source.storage_options)
            else:
                root = (fs, posixpath.dirname(path))  # default: beside the parquet file

            def rows() -> Iterator[dict[str, Any]]:
                index = 0
                for batch in pf.iter_batches(batch_size=batch_size):
                    for rec, bad_text in arrow_records(batch):  # invalid UTF-8 -> that row, not the run
                        yield self._row(shard, keys, index, rec, root, bad_text)
                        index += 1

            yield from batched_tables(rows(), PAIR_SCHEMA, batch_size)

    # ------------------------------------------------------------------------------------------ rows

    def _row(
        self,
        shard: InputShard,
        keys: KeyRegistry,
        index: int,
        rec: dict[str, Any],
        root: tuple[AbstractFileSystem, str],
        bad_text: list[str] | None = None,
    ) -> dict[str, Any]:
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
        problem: str | None = None
        if s.image_column is not None:
            data = rec.get(s.image_column)
            if data is None:
                problem = "image_missing"
            else:
                row["image"] = bytes(data)
                row["image_format"] = sniff_image_format(row["image"])
        else:
            ref = rec.get(s.image_path_column or "")
            if ref is None or ref == "":
                problem = "image_path_missing"
            else:
                meta["image_path"] = str(ref)
                try:
                    row["image"] = self._open_image(str(ref), root)
                    row["image_format"] = sniff_image_format(row["image"], str(ref))
                except _UnsafePath:
                    problem = "image_path_unsafe"
                except Exception as e:  # noqa: BLE001 - any fsspec/backend error is bad input for this row
                    problem = f"image_unreadable: {short_error(e)}"
        if problem is None and not row.get("image"):
            problem = "image_empty"
        if bad_text:
            problem = invalid_utf8_reason(bad_text)
        if raw is None:
            problem = "key_missing"
        if duplicate:
            problem = "duplicate_key"
        row["meta"] = to_meta_json(meta)
        return quarantine(row, problem) if problem else row

    def _open_image(self, ref: str, root: tuple[AbstractFileSystem, str]) -> bytes:
        """Read an image by absolute URL/path, or relative to image_root (default: the parquet's folder).

        A relative path may not climb out of its root with "..": the parquet is data, not configuration.
        """
        if "://" in ref or ref.startswith("/"):
            fs, path = url_to_fs(ref, self.source.storage_options)
        else:
            if ".." in ref.replace("\\", "/").split("/"):
                raise _UnsafePath(ref)
            fs, base = root
            path = posixpath.join(base, ref) if base else ref
        with fs.open(path, "rb") as f:
            return f.read()


class _UnsafePath(ValueError):
    pass
