"""MMC4 ``.pkl`` + ``.count`` pairs for VILA's interleaved loader (``LazyMMC4Dataset``, llava/data/dataset.py).

What that loader does, and what it means for the files:

- ``n_shards = len(os.listdir(data_path)) // 2``; the ``.count`` files, sorted by name, name the shards
  (``x.count`` -> ``x.pkl``) and each holds ``int(text.strip())`` documents. The folder must therefore
  hold *only* pkl/count pairs (any other file shifts the shard count), so give the writer a prefix in a
  folder of its own. Rank r takes the r-th run of ``n_shards // world_size`` pkls in that order, the
  ``n_shards % world_size`` last ones are never read, and every rank is cut to the smallest rank's document
  count (``min(gpu_samples) * world_size``). So the writer always writes a multiple of ``min_files`` pairs
  with the documents dealt round-robin (see :class:`Mmc4PklWriter`): two pkls for 8 GPUs would mean that
  six ranks get no file, the smallest count is 0, and VILA trains on no MMC4 at all, silently.
- Each pkl is ``pickle.load``-ed whole: a list of dicts with ``text_list``, ``image_info`` (each with
  ``image_base64`` and ``matched_text_index``) and ``similarity_matrix``. Images are paired with rows by
  ``zip(image_info, similarity_matrix)``, so the matrix must keep exactly one row per kept image (a short
  matrix would silently drop images).
- It decodes every image, then keeps ``images[:6]`` in ``image_info`` order (``max_num_images = 6``) and
  re-sorts them by sentence index. We therefore *truncate* to the first ``max_images_per_doc`` kept images
  in ``image_info`` order: exactly the images the trainer would have used, without shipping and decoding
  ones it throws away. (Splitting a document would create documents VILA's recipe never had.)
- A document with no image crashes it (``images`` becomes None and is then sliced), so such documents must
  be dropped by :func:`mark_imageless` before routing rows; the writer refuses them.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import pickle
import posixpath
import zlib
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc

from vila2_curate.pipelines.io.writers.atomic import (
    HashingWriter,
    OutputFile,
    PartsWriter,
    join,
    temp_path,
    write_bytes_atomic,
)
from vila2_curate.schemas.documents import NO_USABLE_IMAGES, has_kept_image
from vila2_curate.schemas.rows import DOCUMENT_SCHEMA, conform

PICKLE_PROTOCOL = 2  # no frames (protocol 4 frames them), so documents can be streamed into one list
_PICKLE_HEAD = pickle.PROTO + bytes([PICKLE_PROTOCOL]) + pickle.EMPTY_LIST
MMC4_MIN_FILES = 8  # one 8-GPU node: OutputConfig.mmc4_min_files
VILA_MAX_IMAGES_PER_DOC = 6  # hard-coded max_num_images in LazyMMC4Dataset.__getitem__
NO_IMAGES_STAGE = "mmc4_write"


def _kept_images(doc: dict[str, Any]) -> list[int]:
    return [i for i, im in enumerate(doc.get("image_info") or []) if im is not None and im.get("drop_reason") is None]


def mark_imageless(table: pa.Table) -> pa.Table:
    """Drop (``drop_reason="no_usable_images"``) kept documents whose images were all dropped.

    VILA's loader cannot train on a document without images; marking them here, before the runner splits
    kept from dropped rows, keeps ``rows_in == kept + dropped + quarantined`` true.
    """
    if table.num_rows == 0:
        return table
    infos = table.column("image_info").to_pylist()
    reasons = table.column("drop_reason").to_pylist()
    quarantined = table.column("quarantined").to_pylist()
    mask = [
        r is None and not q and not has_kept_image(info)
        for info, r, q in zip(infos, reasons, quarantined, strict=True)
    ]
    if not any(mask):
        return table
    m = pa.array(mask, pa.bool_())
    reason = pc.if_else(m, pa.scalar(NO_USABLE_IMAGES), table.column("drop_reason"))
    stage = pc.if_else(m, pa.scalar(NO_IMAGES_STAGE), table.column("drop_stage"))
    table = table.set_column(table.schema.get_field_index("drop_reason"), table.schema.field("drop_reason"), reason)
    return table.set_column(table.schema.get_field_index("drop_stage"), table.schema.field("drop_stage"), stage)


def _face_detections(meta: str | None) -> Any:
    if not meta:
        return None
    try:
        parsed = json.loads(meta)
    except ValueError:
        return None
    return parsed.get("face_detections") if isinstance(parsed, dict) else None


def mmc4_document(doc: dict[str, Any], max_images_per_doc: int) -> tuple[dict[str, Any], int]:
    """Build the MMC4 dict VILA loads from one kept document row; returns it and the images truncated."""
    key = doc["key"]
    text_list = list(doc.get("text_list") or [])
    infos = doc.get("image_info") or []
    kept = _kept_images(doc)
    if not kept:
        raise ValueError(f"document {key!r} has no kept image; run mark_imageless() before routing rows")
    truncated = max(0, len(kept) - max_images_per_doc)
    kept = kept[:max_images_per_doc]
    sim = doc.get("similarity_matrix")
    if sim is not None and len(sim) != len(infos):
        raise ValueError(f"document {key!r}: similarity_matrix has {len(sim)} rows for {len(infos)} images")
    image_info = []
    rows = []
    for i in kept:
        im = infos[i]
        idx = im.get("matched_text_index")
        if idx is None or not 0 <= idx < len(text_list):
            raise ValueError(f"document {key!r} image {i}: matched_text_index {idx} outside text_list")
        if not im.get("image"):
            raise ValueError(f"document {key!r} image {i}: no image bytes")
        image_info.append({
            "image_name": im.get("image_name"),
            "raw_url": im.get("raw_url"),
            "matched_text_index": int(idx),
            "matched_sim": im.get("matched_sim"),
            "face_detections": _face_detections(im.get("meta")),
            "image_base64": base64.b64encode(im["image"]).decode("ascii"),
        })
        if sim is not None:
            rows.append(list(sim[i]))
        else:
            # No matrix in the source: one row per image with its own match, so zip() keeps every image.
            row = [0.0] * len(text_list)
            row[idx] = float(im.get("matched_sim") or 0.0)
            rows.append(row)
    out = {
        "url": doc.get("url"),
        "key": key,
        "text_list": text_list,
        "image_info": image_info,
        "similarity_matrix": rows,
        "could_have_url_duplicate": doc.get("could_have_url_duplicate"),
    }
    return out, truncated


def part_name(folder: str, stem: str, part: int, chunk: int, n_parts: int) -> str:
    """``<folder>/p{part}-<stem>-{chunk}.pkl``: the zero-padded part number first, so that VILA's
    ``sorted()`` listing of the ``.count`` files puts part 0 of every shard first, then part 1, ..."""
    width = max(2, len(str(n_parts - 1)))
    name = f"p{part:0{width}d}-{stem}-{chunk:04d}.pkl"
    return f"{folder}/{name}" if folder else name


def first_part(stem: str, n_parts: int) -> int:
    """Where this shard's round-robin starts: a stable hash of its name, so the parts that get one document
    more than the others differ from shard to shard without any shard knowing about another."""
    return zlib.crc32(stem.encode("utf-8")) % n_parts


class _PklPart:
    """One pkl being streamed to its temporary name: a pickled list, built one document at a time.

    ``pickle`` has no append API and ``pickle.dump(list)`` needs the whole list in memory; the list opcodes
    are therefore written by hand around each document's memo-free pickle (``Pickler.fast``), which keeps
    one document in memory instead of a whole input shard. Protocol 2 has no frames, so a document's
    opcodes can be spliced as they are; ``pickle.load`` gives exactly the list ``pickle.dumps`` would.
    """

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str, relpath: str) -> None:
        self.fs, self.path, self.relpath = fs, path, relpath
        self.tmp = temp_path(path)
        self._fh = fs.open(self.tmp, "wb")
        self._hw = HashingWriter(self._fh)
        self._hw.write(_PICKLE_HEAD)
        self.ndocs = 0

    def add(self, doc: dict[str, Any]) -> None:
        buf = io.BytesIO()
        pickler = pickle.Pickler(buf, protocol=PICKLE_PROTOCOL)
        pickler.fast = True  # no memo: every document's opcodes stand alone (our documents hold no cycles)
        pickler.dump(doc)
        body = buf.getbuffer()
        # strip this document's PROTO (2 bytes) and STOP (1 byte); APPEND adds it to the list on the stack
        self._hw.write(bytes(body[2:-1]) + pickle.APPEND)
        self.ndocs += 1

    def finish(self) -> OutputFile:
        self._hw.write(pickle.STOP)
        self._hw.close()
        self._fh.close()
        self.fs.mv(self.tmp, self.path)  # the pkl is in place before its .count makes VILA see it
        write_bytes_atomic(self.fs, self.path[: -len(".pkl")] + ".count", f"{self.ndocs}\n".encode())
        return OutputFile(self.relpath, self.ndocs, self._hw.nbytes, self._hw.hexdigest())

    def discard(self) -> None:
        with contextlib.suppress(Exception):
            self._fh.close()
        with contextlib.suppress(OSError):
            if self.fs.exists(self.tmp):
                self.fs.rm(self.tmp)


class Mmc4PklWriter(PartsWriter):
    """Write one input shard's kept documents as ``min_files`` pkl/count pairs (or a multiple of it).

    VILA's ``LazyMMC4Dataset`` gives rank r the r-th run of ``n_files // world_size`` files in sorted name
    order, drops the remainder and cuts every rank to the smallest rank's document count. So each shard
    deals its documents round-robin into ``min_files`` parts named ``p{j}-<shard>-{chunk}.pkl``: sorted,
    part j of every shard comes before part j+1, so with ``world_size`` dividing ``min_files`` every rank
    gets whole parts of every shard, and the ranks' document counts differ by at most one per input shard
    (no global step: shards are written independently and in parallel). A part holds at most
    ``docs_per_pkl`` documents; all parts roll over to the next chunk together, so the file count stays a
    multiple of ``min_files``. Same API as :class:`~pipelines.io.writers.wds.WdsShardWriter`.
    """

    def __init__(
        self,
        fs: fsspec.AbstractFileSystem,
        root: str,
        prefix: str,
        *,
        docs_per_pkl: int,
        max_images_per_doc: int = VILA_MAX_IMAGES_PER_DOC,
        min_files: int = MMC4_MIN_FILES,
    ) -> None:
        if prefix.startswith("/") or ".." in prefix.split("/") or not prefix.strip("/"):
            raise ValueError(f"prefix must be a relative path stem, got {prefix!r}")
        if docs_per_pkl < 1:
            raise ValueError("docs_per_pkl must be >= 1")
        if min_files < 1:
            raise ValueError("min_files must be >= 1")
        if not 1 <= max_images_per_doc <= VILA_MAX_IMAGES_PER_DOC:
            raise ValueError(f"max_images_per_doc must be in 1..{VILA_MAX_IMAGES_PER_DOC} (VILA's loader cap)")
        self.fs, self.prefix = fs, prefix.strip("/")
        self.folder, self.stem = posixpath.split(self.prefix)
        self.root = fs._strip_protocol(root)
        self.docs_per_pkl, self.max_images_per_doc, self.min_files = docs_per_pkl, max_images_per_doc, min_files
        self._start = first_part(self.stem, min_files)
        self._parts: list[_PklPart] = []
        self._chunk = 0
        self._ndocs = 0  # documents written so far; the next one goes to part (ndocs + start) % min_files
        self._done: list[OutputFile] = []
        self._keys: set[str] = set()
        self._closed = False
        self.counters: dict[str, int] = {"documents_written": 0, "images_written": 0, "images_truncated": 0}

    def _open_chunk(self) -> None:
        # every part of a chunk is created, empty ones too: the shard always adds a multiple of min_files
        self._parts = []
        for j in range(self.min_files):
            rel = part_name(self.folder, self.stem, j, self._chunk, self.min_files)
            self._parts.append(_PklPart(self.fs, join(self.root, rel), rel))

    def _finish_chunk(self) -> None:
        while self._parts:  # a part leaves the list only once finished, so abort() still sees the others
            self._done.append(self._parts[0].finish())
            self._parts.pop(0)
        self._chunk += 1

    def _add(self, doc: dict[str, Any]) -> None:
        if self._ndocs and self._ndocs % (self.min_files * self.docs_per_pkl) == 0:
            self._finish_chunk()  # every part holds docs_per_pkl documents
        if not self._parts:
            parent = posixpath.dirname(join(self.root, self.prefix))
            if parent:
                self.fs.makedirs(parent, exist_ok=True)
            self._open_chunk()
        self._parts[(self._ndocs + self._start) % self.min_files].add(doc)
        self._ndocs += 1

    def _write_rows(self, table: pa.Table) -> list[tuple[int, str]]:
        """Append kept DOCUMENT_SCHEMA rows, each to the next part in round-robin order."""
        refused: list[tuple[int, str]] = []
        for i, row in enumerate(conform(table, DOCUMENT_SCHEMA).to_pylist()):
            key = row["key"]
            if row.get("drop_reason") is not None or row.get("quarantined"):
                raise RuntimeError(f"document {key!r} is dropped or quarantined; only kept rows are written")
            try:
                if key in self._keys:
                    raise ValueError(f"duplicate key {key!r} in one output")
                doc, truncated = mmc4_document(row, self.max_images_per_doc)
            except ValueError as e:
                refused.append((i, str(e)))
                continue
            self._keys.add(key)
            self.counters["documents_written"] += 1
            self.counters["images_written"] += len(doc["image_info"])
            self.counters["images_truncated"] += truncated
            self._add(doc)
        return refused

    def _finish(self) -> None:
        if self._parts:
            self._finish_chunk()

    def _written(self) -> list[OutputFile]:
        return sorted(self._done, key=lambda f: f.relpath)

    def _discard(self) -> None:
        """Remove the temporary files of the unfinished chunk (finished pkls stay: they are complete)."""
        parts, self._parts = self._parts, []
        for p in parts:
            p.discard()

