"""Reader for img2dataset's WebDataset output: ``{shard}.tar`` + ``{shard}.parquet`` + ``{shard}_stats.json``.

How img2dataset writes a shard (writer.WebDatasetSampleWriter, through webdataset.TarWriter):

- only *successful* downloads go into the tar, one member per field, written in sorted extension order
  (``<key>.json``, ``<key>.jpg``, ``<key>.txt``), USTAR regular files; ``<key>`` is numeric
  (shard id * 10^oom_sample_per_shard + row index, zero-padded); the image extension is the run's
  ``encode_format`` (jpg / png / webp); ``.txt`` is written whenever a caption column was given (``""``
  for a null caption).
- ``.json`` holds the meta dict: url, caption, additional columns, key, status, error_message, width,
  height (after resize), original_width, original_height, exif (a JSON *string*), and the
  ``compute_hash`` column (default ``sha256``) -- a hash of the *downloaded* bytes, before resizing and
  re-encoding, so it is not the hash of the bytes in the tar.
- the parquet has one row per input row, successes and failures ("failed_to_download",
  "failed_to_resize", ...), with the same meta columns and no image.
- the tar is written in place (no temp name) and ``_stats.json`` last, so a killed run leaves a
  truncated tar, a parquet without a footer, or a complete tar with no stats file.

Every member and every parquet row is accounted for: samples become rows, failures become dropped rows
(``drop_stage="read"``), anything the tar cannot give us becomes a quarantined row with a reason.
"""

from __future__ import annotations

import json
import posixpath
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow.parquet as pq
from fsspec.spec import AbstractFileSystem

from vila2_curate.pipelines.io.readers._common import (
    READ_STAGE,
    KeyRegistry,
    StreamingReader,
    base_row,
    quarantine,
    strip_extensions,
    url_to_fs,
)
from vila2_curate.pipelines.io.readers.base import InputShard
from vila2_curate.pipelines.io.readers.corrupt import LostRows, lost_rows_row, parquet_batches
from vila2_curate.pipelines.io.readers.tarstream import (
    MAX_MEMBER_BYTES,
    TarMember,
    TarTruncated,
    iter_members,
)
from vila2_curate.pipelines.io.readers.text import (
    INVALID_UTF8,
    arrow_records,
    invalid_utf8_reason,
    loads_json,
)
from vila2_curate.pipelines.io.values import as_int, as_str, short_error, to_meta_json
from vila2_curate.schemas.images import IMAGE_EXTENSIONS, sniff_image_format
from vila2_curate.schemas.rows import PAIR_SCHEMA

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
_TEXT_EXTS = {"txt", "text", "caption"}
_JSON_EXTS = {"json"}
_KNOWN_EXTS = set(IMAGE_EXTENSIONS) | _TEXT_EXTS | _JSON_EXTS
# json fields that become columns; everything else (status, error_message, original_*, exif, sha256 of
# the downloaded bytes, saved extra columns) stays in meta.
_MAPPED_JSON_FIELDS = ("url", "caption", "key", "width", "height")
_PARQUET_READ_BATCH = 4096  # parquet rows carry no image: a few KB each


@dataclass
class _Sample:
    """The members of one key, gathered while streaming (only the current key is held)."""

    raw_key: str
    files: dict[str, bytes] = field(default_factory=dict)  # ext -> bytes
    names: list[str] = field(default_factory=list)
    problem: str | None = None  # first quarantine reason found among its members


def split_member_name(name: str) -> tuple[str, str]:
    """(key, ext) of a member: key = basename up to the FIRST dot, as webdataset and VILA split it.

    One exception keeps dotted keys recoverable: when the text after the first dot is not an extension
    we know but the last suffix is (``a.b.jpg``), the key is everything before that last suffix
    (``a.b``), which safe_key then rewrites, keeping the original in source_key.
    """
    stem, _, ext = name.partition(".")
    if ext.lower() not in _KNOWN_EXTS and "." in ext:
        stem2, ext2 = name.rsplit(".", 1)
        if ext2.lower() in _KNOWN_EXTS:
            return stem2, ext2.lower()
    return stem, ext.lower()


def unsafe_member_reason(info: TarMember | tarfile.TarInfo) -> str | None:
    """Why a member cannot be a sample file, or None for a plain regular file with a flat name."""
    if info.issym():
        return "tar_member_symlink"
    if info.islnk():
        return "tar_member_hardlink"
    if info.isdir():
        return "tar_member_directory"
    if not info.isreg():
        return "tar_member_not_regular"
    name = info.name
    if not name or ".." in name or name.startswith(("/", "\\")) or "/" in name or "\\" in name or "\x00" in name:
        return "tar_member_unsafe_path"
    if info.size > MAX_MEMBER_BYTES:  # not an image we can curate; tarstream never read its data
        return "tar_member_too_large"
    return None


class Img2DatasetReader(StreamingReader):
    """Streams img2dataset WebDataset shards (tar + parquet) as PAIR_SCHEMA tables."""

    row_kind = "pair"
    suffixes = TAR_SUFFIXES
    schema = PAIR_SCHEMA

    # ------------------------------------------------------------------------------------------ rows

    def _rows(self, shard: InputShard) -> Iterator[dict[str, Any]]:
        fs, tar_path = url_to_fs(shard.path, self.source.storage_options)
        folder = posixpath.dirname(tar_path)
        stem = strip_extensions(posixpath.basename(tar_path))
        keys = KeyRegistry()
        seen_raw: set[str] = set()  # raw keys found in the tar, so parquet rows are not counted twice
        state: dict[str, Any] = {"truncated": None, "samples": 0}

        yield from self._tar_rows(fs, tar_path, shard, keys, seen_raw, state)

        parquet_path = f"{folder}/{stem}.parquet" if folder else f"{stem}.parquet"
        parquet_rows = self._parquet_rows(fs, parquet_path, shard, keys, seen_raw)
        have_parquet = next(parquet_rows)  # primes the generator: False if no readable parquet
        if have_parquet:
            yield from parquet_rows
            return
        # No parquet: only the tar itself (or _stats.json) can tell us that rows are missing.
        reason_detail = state["truncated"]
        if reason_detail is None:
            expected = self._expected_successes(fs, f"{folder}/{stem}_stats.json")
            if expected is not None and state["samples"] < expected:
                reason_detail = f"{expected - state['samples']} samples missing per _stats.json"
        if reason_detail is not None:
            key, source_key, _ = keys.claim(f"{shard.shard_id}_truncated")
            row = base_row(shard, key, source_key)
            row["meta"] = to_meta_json({"error": reason_detail, "samples_read": state["samples"]})
            yield quarantine(row, "tar_truncated")

    def _tar_rows(
        self,
        fs: AbstractFileSystem,
        tar_path: str,
        shard: InputShard,
        keys: KeyRegistry,
        seen_raw: set[str],
        state: dict[str, Any],
    ) -> Iterator[dict[str, Any]]:
        """Stream members in order; a sample is complete when the next member has another key.

        Members come from ``tarstream.iter_members`` (see its docstring for why not tarfile/webdataset):
        every member is accounted for, quarantined with a reason when unusable, links never followed,
        nothing extracted; member bytes are held one key at a time.
        """
        current: _Sample | None = None
        with fs.open(tar_path, "rb") as f:
            try:
                for info in iter_members(f, want=lambda name: split_member_name(name)[1] in _KNOWN_EXTS):
                    if info.name.startswith("./"):  # `tar -C dir .` style names; harmless, not a folder
                        info.name = info.name[2:]
                    reason = unsafe_member_reason(info)
                    if reason is not None:
                        yield self._member_row(shard, keys, seen_raw, info, reason)
                        continue
                    raw_key, ext = split_member_name(info.name)
                    repeated = current is not None and (
                        ext in current.files
                        or (ext in IMAGE_EXTENSIONS and any(e in IMAGE_EXTENSIONS for e in current.files))
                    )
                    if current is not None and (raw_key != current.raw_key or repeated):
                        # a repeated field starts a second sample with the same key -> duplicate_key
                        yield self._sample_row(shard, keys, current)
                        state["samples"] += 1
                        current = None
                    if current is None:
                        current = _Sample(raw_key)
                        seen_raw.add(raw_key)
                    current.names.append(info.name)
                    if ext in _KNOWN_EXTS:
                        current.files[ext] = info.data or b""
            except (TarTruncated, EOFError, OSError, zlib.error) as e:
                state["truncated"] = short_error(e)
                if current is not None:
                    current.problem = "tar_truncated"
        if current is not None:
            if state["truncated"] is not None and current.problem is None:
                current.problem = "tar_truncated"  # the stream ended right after this sample's members
            yield self._sample_row(shard, keys, current)
            state["samples"] += 1

    def _member_row(
        self, shard: InputShard, keys: KeyRegistry, seen_raw: set[str], info: TarMember, reason: str
    ) -> dict[str, Any]:
        """One quarantined row per unusable member; its data is never read, links never resolved."""
        base = posixpath.basename(info.name.replace("\\", "/")) or info.name
        seen_raw.add(split_member_name(base)[0])  # parquet row of that key is this row, not "missing"
        key, _, _ = keys.claim(f"member:{info.name}")
        row = base_row(shard, key, info.name)
        meta: dict[str, Any] = {"member": info.name, "member_type": info.type.decode("latin-1"),
                                "size": info.size}
        if info.issym() or info.islnk():
            meta["linkname"] = info.linkname
        row["meta"] = to_meta_json(meta)
        return quarantine(row, reason)

    def _sample_row(self, shard: InputShard, keys: KeyRegistry, s: _Sample) -> dict[str, Any]:
        key, source_key, duplicate = keys.claim(s.raw_key)
        row = base_row(shard, key, source_key)
        meta: dict[str, Any] = {}
        image_ext = next((e for e in s.files if e in IMAGE_EXTENSIONS), None)
        if image_ext is not None:
            row["image"] = s.files[image_ext]
            row["image_format"] = sniff_image_format(row["image"], image_ext)
        unused = [n for n in s.names if split_member_name(n)[1] not in _KNOWN_EXTS]
        if unused:
            meta["unused_members"] = unused

        problem = s.problem
        info: dict[str, Any] = {}
        json_bytes = next((s.files[e] for e in s.files if e in _JSON_EXTS), None)
        if json_bytes is not None:
            parsed, bad = loads_json(json_bytes)
            if bad == INVALID_UTF8:
                problem = problem or invalid_utf8_reason("json")
            elif bad is not None or not isinstance(parsed, dict):
                problem = problem or "json_invalid"
                meta["json_error"] = "not a JSON object" if bad is None else "not valid JSON"
            else:
                info = parsed
        row["url"] = as_str(info.get("url"))
        row["width"] = as_int(info.get("width"))
        row["height"] = as_int(info.get("height"))
        if info.get("key") is not None and str(info.get("key")) != s.raw_key:
            meta["json_key"] = info.get("key")
        meta.update({k: v for k, v in info.items() if k not in _MAPPED_JSON_FIELDS})

        txt_bytes = next((s.files[e] for e in s.files if e in _TEXT_EXTS), None)
        if txt_bytes is not None:
            try:
                row["text"] = txt_bytes.decode("utf-8")
            except UnicodeDecodeError:
                problem = problem or "caption_not_utf8"
        elif isinstance(info.get("caption"), str):
            row["text"] = info["caption"]
        if txt_bytes is not None and info.get("caption") is not None and info.get("caption") != row.get("text"):
            meta["json_caption"] = info["caption"]

        if image_ext is None:
            problem = problem or "missing_image"
        elif not row["image"]:
            problem = problem or "image_empty"
        if duplicate:
            problem = "duplicate_key"
        row["meta"] = to_meta_json(meta)
        return quarantine(row, problem) if problem else row

    def _parquet_rows(
        self,
        fs: AbstractFileSystem,
        path: str,
        shard: InputShard,
        keys: KeyRegistry,
        seen_raw: set[str],
    ) -> Iterator[Any]:
        """First yields whether a readable parquet exists, then rows for every parquet row not in the tar.

        Failed downloads become dropped rows (``img2dataset_<status>``); successes absent from the tar
        (truncated or zero-byte tar, lost member) become quarantined ``missing_from_tar`` rows.
        """
        try:
            f = fs.open(path, "rb") if fs.exists(path) else None
        except OSError:
            f = None
        if f is None:
            yield False
            return
        with f:
            try:
                pf = pq.ParquetFile(f)
            except Exception:  # noqa: BLE001 - a half-written parquet (no footer) counts as "no parquet"
                yield False
                return
            yield True
            has_key = "key" in pf.schema_arrow.names
            matched: set[str] = set()
            index = 0
            for batch in parquet_batches(pf, _PARQUET_READ_BATCH):
                if isinstance(batch, LostRows):  # a corrupt row group: one quarantined row, the rest goes on
                    yield lost_rows_row(shard, keys, batch)
                    continue
                for rec, bad_text in arrow_records(batch):  # invalid UTF-8 -> that row, not the shard
                    raw = rec.get("key") if has_key else None
                    raw = str(raw) if raw is not None else f"{shard.shard_id}_parquet_row{index:06d}"
                    index += 1
                    if raw in seen_raw and raw not in matched:
                        matched.add(raw)  # the tar already gave this input row its one output row
                        continue
                    matched.add(raw)
                    row = self._parquet_row(shard, keys, raw, rec)
                    yield quarantine(row, invalid_utf8_reason(bad_text)) if bad_text else row

    def _parquet_row(self, shard: InputShard, keys: KeyRegistry, raw: str, rec: dict[str, Any]) -> dict:
        key, source_key, duplicate = keys.claim(raw)
        row = base_row(shard, key, source_key)
        row["url"] = as_str(rec.get("url"))
        caption = rec.get("caption")
        row["text"] = caption if isinstance(caption, str) else None
        row["meta"] = to_meta_json({k: v for k, v in rec.items() if k not in _MAPPED_JSON_FIELDS})
        status = as_str(rec.get("status")) or "unknown"
        if duplicate:
            return quarantine(row, "duplicate_key")
        if status == "success":
            return quarantine(row, "missing_from_tar")
        row["drop_reason"] = f"img2dataset_{status}"
        row["drop_stage"] = READ_STAGE
        return row

    @staticmethod
    def _expected_successes(fs: AbstractFileSystem, stats_path: str) -> int | None:
        try:
            with fs.open(stats_path, "rb") as f:
                stats = json.load(f)
            return as_int(stats.get("successes"))
        except Exception:  # noqa: BLE001 - stats are advisory; absent or broken means "unknown"
            return None
