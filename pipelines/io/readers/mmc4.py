"""Reader for MMC4 interleaved documents: jsonl (plain, .gz or .zip) with images stored by image_name.

Real layout (allenai/mmc4): documents ship as ``docs_no_face_shard_{N}_v{2,3}.jsonl.zip``; each line has
url, text_list, image_info [{image_name, raw_url, matched_text_index, matched_sim, face_detections}],
similarity_matrix (images x sentences) and could_have_url_duplicate. Images are not distributed; the
project's ``scripts/download_images.py`` saves them under ``image_name`` into ``./{jsonl stem}_images/``
by default (and mogrifies them to <= 800x800, so the bytes need not match the ``.jpg`` name). Hence the
lookup order here: ``image_dir`` when configured, else the jsonl's folder, then ``{jsonl stem}_images/``
beside it.
"""

from __future__ import annotations

import json
import lzma
import posixpath
import zipfile
import zlib
from collections.abc import Iterator
from typing import Any

import fsspec
from fsspec.spec import AbstractFileSystem

from vila2_curate.pipelines.io.readers._common import (
    READ_STAGE,
    KeyRegistry,
    StreamingReader,
    base_row,
    quarantine,
    url_to_fs,
)
from vila2_curate.pipelines.io.readers.base import InputShard
from vila2_curate.pipelines.io.readers.fetch import REFUSED, REFUSED_REASON, SUCCESS, Fetcher
from vila2_curate.pipelines.io.readers.refs import UNSAFE_REASON, ImageRoot, UnsafeRef
from vila2_curate.pipelines.io.readers.text import INVALID_UTF8, invalid_utf8_reason, loads_json
from vila2_curate.pipelines.io.values import as_float, as_int, as_str, short_error, to_meta_json
from vila2_curate.schemas.images import sniff_image_format
from vila2_curate.schemas.rows import DOCUMENT_SCHEMA

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zip", ".jsonl.bz2", ".jsonl.xz", ".jsonl.zst")
# what a cut or corrupt compressed stream raises (BadZipFile: a bad CRC or no central directory)
_STREAM_ERRORS = (EOFError, OSError, zlib.error, zipfile.BadZipFile, lzma.LZMAError)
_DOC_FIELDS = ("url", "text_list", "image_info", "similarity_matrix", "could_have_url_duplicate")
_IMAGE_FIELDS = ("image_name", "raw_url", "matched_text_index", "matched_sim")


class Mmc4Reader(StreamingReader):
    """Streams MMC4 jsonl shards line by line as DOCUMENT_SCHEMA tables, images read through fsspec."""

    row_kind = "document"
    suffixes = JSONL_SUFFIXES
    schema = DOCUMENT_SCHEMA
    _fetcher: Fetcher | None = None  # only for an http(s) image_dir; opened lazily, closed per shard

    # ------------------------------------------------------------------------------------------ rows

    def _image_dirs(self, fs: AbstractFileSystem, path: str) -> list[ImageRoot]:
        """The folders an image_name may resolve in (names never reach outside them: refs.py)."""
        if self.source.image_dir is not None:
            return [ImageRoot.from_config(self.source.image_dir, self.source, fallback=(fs, ""))]
        folder = posixpath.dirname(path)
        stem = posixpath.basename(path).split(".jsonl", 1)[0]
        return [ImageRoot(fs, folder, self.source), ImageRoot(fs, posixpath.join(folder, f"{stem}_images"), self.source)]

    def _rows(self, shard: InputShard) -> Iterator[dict[str, Any]]:
        fs, path = url_to_fs(shard.path, self.source.storage_options)
        image_dirs = self._image_dirs(fs, path)
        keys = KeyRegistry()
        line_no = 0
        # compression="infer" picks gzip/zip/bz2/xz/zstd from the suffix; the stream is decompressed as read
        of = fsspec.open(shard.path, "rb", compression="infer", **self.source.storage_options)
        try:
            with of as f:  # opening a .zip reads its directory: a broken one fails here already
                for line in f:
                    line_no += 1
                    if not line.strip():
                        continue  # blank lines (a trailing newline) are not documents
                    yield self._document(shard, keys, line_no, line, image_dirs)
        except _STREAM_ERRORS as e:
            if isinstance(e, FileNotFoundError | PermissionError | IsADirectoryError):
                raise  # the input itself is gone or unreadable: an I/O error of the run (exit 4), not data
            # a truncated or corrupt .gz/.zip/.bz2/.xz: what was read stands, the rest is one quarantined row
            key, source_key, _ = keys.claim(f"{shard.shard_id}_truncated")
            row = base_row(shard, key, source_key)
            row["meta"] = to_meta_json({"error": short_error(e), "lines_read": line_no})
            yield quarantine(row, "jsonl_truncated")
        finally:
            if self._fetcher is not None:
                self._fetcher.close()
                self._fetcher = None

    def _document(
        self,
        shard: InputShard,
        keys: KeyRegistry,
        line_no: int,
        line: bytes,
        image_dirs: list[ImageRoot],
    ) -> dict[str, Any]:
        key, source_key, _ = keys.claim(f"{shard.shard_id}_{line_no:06d}")
        row = base_row(shard, key, source_key)
        doc, bad = loads_json(line)
        if bad is not None:
            row["meta"] = to_meta_json({"line": line_no, "error": f"line is not {'UTF-8' if bad == INVALID_UTF8 else 'JSON'}"})
            return quarantine(row, invalid_utf8_reason("line") if bad == INVALID_UTF8 else "invalid_json")
        if not isinstance(doc, dict):
            row["meta"] = to_meta_json({"line": line_no, "error": f"line is a JSON {type(doc).__name__}"})
            return quarantine(row, "invalid_json")

        row["url"] = as_str(doc.get("url"))
        row["meta"] = to_meta_json({k: v for k, v in doc.items() if k not in _DOC_FIELDS})
        text_list = doc.get("text_list")
        image_info = doc.get("image_info") if doc.get("image_info") is not None else []
        if not isinstance(text_list, list) or not all(isinstance(t, str) for t in text_list):
            return quarantine(row, "invalid_document_text_list")
        if not isinstance(image_info, list) or not all(isinstance(i, dict) for i in image_info):
            return quarantine(row, "invalid_document_image_info")
        row["text_list"] = text_list
        row["could_have_url_duplicate"] = as_int(doc.get("could_have_url_duplicate"))
        row["similarity_matrix"] = _matrix(doc.get("similarity_matrix"))
        if doc.get("similarity_matrix") is not None and row["similarity_matrix"] is None:
            row["flags"] = ["similarity_matrix_invalid"]
        row["image_info"] = [self._image(info, len(text_list), image_dirs) for info in image_info]
        if any(i.get("drop_reason") == UNSAFE_REASON for i in row["image_info"]):
            return quarantine(row, UNSAFE_REASON)  # a document reaching outside its image folder is hostile
        return row

    def _image(
        self, info: dict[str, Any], n_sentences: int, image_dirs: list[ImageRoot]
    ) -> dict[str, Any]:
        """One image_info entry; a problem drops this image (drop_stage "read"), not the document."""
        name = as_str(info.get("image_name"))
        idx = info.get("matched_text_index")
        img: dict[str, Any] = {
            "image_name": name,
            "raw_url": as_str(info.get("raw_url")),
            "matched_text_index": as_int(idx),
            "matched_sim": as_float(info.get("matched_sim")),
            "meta": to_meta_json({k: v for k, v in info.items() if k not in _IMAGE_FIELDS}),
        }
        reason: str | None = None
        if isinstance(idx, bool) or not isinstance(idx, int) or not 0 <= idx < n_sentences:
            reason = "matched_text_index_out_of_range"
        elif not name or "/" in name or "\\" in name or ".." in name or "\x00" in name:
            reason = UNSAFE_REASON  # names are data; they must not reach outside the image folder
        else:
            try:
                img["image"] = self._read_first(image_dirs, name)
                if img["image"] is None:
                    reason = "image_missing"
                elif not img["image"]:
                    reason = "image_empty"
                else:
                    img["image_format"] = sniff_image_format(img["image"], name)
            except UnsafeRef as e:
                reason = UNSAFE_REASON
                img["meta"] = to_meta_json({**json.loads(img["meta"] or "{}"), "unsafe_ref": e.why})
            except _FetchFailed as e:
                reason = e.status
                img["meta"] = to_meta_json({**json.loads(img["meta"] or "{}"), "fetch": e.meta})
            except Exception as e:  # noqa: BLE001 - any backend error is bad input for this image
                reason = "image_unreadable"
                img["meta"] = to_meta_json({**json.loads(img["meta"] or "{}"), "error": short_error(e)})
        if reason is not None:
            img["drop_reason"] = reason
            img["drop_stage"] = READ_STAGE
        return img


    def _read_first(self, dirs: list[ImageRoot], name: str) -> bytes | None:
        """Bytes of ``name`` from the first folder that has it, None when none has it.

        Raises UnsafeRef when the name resolves outside a folder (a symlink out of it, for instance).
        An http(s) image_dir (``fetch_remote: true``) is fetched through the guarded fetcher, one image at a
        time: MMC4 documents carry few images each.
        """
        for root in dirs:
            target = root.resolve(name)
            if target.url is not None:
                if self._fetcher is None:
                    s = self.source
                    self._fetcher = Fetcher(s.fetch, s.fetch_schemes, s.allow_private_networks)
                result = self._fetcher.fetch(target.url)
                if result.status == SUCCESS:
                    return result.data
                if result.http_status == 404:
                    continue
                raise _FetchFailed(result.status, result.meta())
            try:
                return root.read(str(target.path))
            except FileNotFoundError:
                continue
        return None


class _FetchFailed(Exception):
    def __init__(self, status: str, meta: dict[str, Any]) -> None:
        super().__init__(status)
        self.status = REFUSED_REASON if status == REFUSED else status
        self.meta = meta


def _matrix(v: Any) -> list[list[float | None]] | None:
    """similarity_matrix as a list of float rows, or None when it is not a matrix of numbers."""
    if not isinstance(v, list) or not all(isinstance(r, list) for r in v):
        return None
    out = []
    for r in v:
        vals = [as_float(x) for x in r]
        if any(x is None and y is not None for x, y in zip(vals, r, strict=True)):
            return None
        out.append(vals)
    return out
