"""MMC4 ``.pkl`` + ``.count`` pairs for VILA's interleaved loader (``LazyMMC4Dataset``, llava/data/dataset.py).

What that loader does, and what it means for the files:

- ``n_shards = len(os.listdir(data_path)) // 2``; the ``.count`` files, sorted by name, name the shards
  (``x.count`` -> ``x.pkl``) and each holds ``int(text.strip())`` documents. The folder must therefore
  hold *only* pkl/count pairs (any other file shifts the shard count), so give the writer a prefix in a
  folder of its own. Ranks take ``n_shards // world_size`` pkls each and every rank is cut to the smallest
  rank's document count, so many equal-sized pkls (``docs_per_pkl``) lose the least data.
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
import json
import pickle
import posixpath
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.writers.atomic import HashingWriter, OutputFile, atomic_open, join, write_bytes_atomic
from schemas.rows import DOCUMENT_SCHEMA, conform

PICKLE_PROTOCOL = 4
VILA_MAX_IMAGES_PER_DOC = 6  # hard-coded max_num_images in LazyMMC4Dataset.__getitem__
NO_IMAGES_REASON = "no_images"
NO_IMAGES_STAGE = "mmc4_write"


def _kept_images(doc: dict[str, Any]) -> list[int]:
    return [i for i, im in enumerate(doc.get("image_info") or []) if im is not None and im.get("drop_reason") is None]


def mark_imageless(table: pa.Table) -> pa.Table:
    """Drop (``drop_reason="no_images"``) kept documents whose images were all dropped.

    VILA's loader cannot train on a document without images; marking them here, before the runner splits
    kept from dropped rows, keeps ``rows_in == kept + dropped + quarantined`` true.
    """
    if table.num_rows == 0:
        return table
    infos = table.column("image_info").to_pylist()
    reasons = table.column("drop_reason").to_pylist()
    quarantined = table.column("quarantined").to_pylist()
    mask = [
        r is None and not q and not _kept_images({"image_info": info})
        for info, r, q in zip(infos, reasons, quarantined, strict=True)
    ]
    if not any(mask):
        return table
    m = pa.array(mask, pa.bool_())
    reason = pc.if_else(m, pa.scalar(NO_IMAGES_REASON), table.column("drop_reason"))
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


class Mmc4PklWriter:
    """Write kept document rows as ``{prefix}_{i:04d}.pkl`` (+ ``.count``) with ``docs_per_pkl`` each.

    Same API as :class:`~pipelines.writers.wds.WdsShardWriter`. The pkl is renamed into place before its
    ``.count`` appears, because VILA discovers shards through the ``.count`` files.
    """

    def __init__(
        self,
        fs: fsspec.AbstractFileSystem,
        root: str,
        prefix: str,
        *,
        docs_per_pkl: int,
        max_images_per_doc: int = VILA_MAX_IMAGES_PER_DOC,
    ) -> None:
        if prefix.startswith("/") or ".." in prefix.split("/") or not prefix.strip("/"):
            raise ValueError(f"prefix must be a relative path stem, got {prefix!r}")
        if docs_per_pkl < 1:
            raise ValueError("docs_per_pkl must be >= 1")
        if not 1 <= max_images_per_doc <= VILA_MAX_IMAGES_PER_DOC:
            raise ValueError(f"max_images_per_doc must be in 1..{VILA_MAX_IMAGES_PER_DOC} (VILA's loader cap)")
        self.fs, self.prefix = fs, prefix.strip("/")
        self.root = fs._strip_protocol(root)
        self.docs_per_pkl, self.max_images_per_doc = docs_per_pkl, max_images_per_doc
        self._buf: list[dict[str, Any]] = []
        self._index = 0
        self._done: list[OutputFile] = []
        self._keys: set[str] = set()
        self._closed = False
        self.counters: dict[str, int] = {"documents_written": 0, "images_written": 0, "images_truncated": 0}

    def _flush(self) -> None:
        if not self._buf:
            return
        docs, self._buf = self._buf, []
        rel = f"{self.prefix}_{self._index:04d}.pkl"
        self._index += 1
        path = join(self.root, rel)
        with atomic_open(self.fs, path) as f:
            hw = HashingWriter(f)
            # Dump straight into the file: only plain dict/list/str/int/float, so the bytes are deterministic.
            pickle.dump(docs, hw, protocol=PICKLE_PROTOCOL)
        write_bytes_atomic(self.fs, path[: -len(".pkl")] + ".count", f"{len(docs)}\n".encode())
        self._done.append(OutputFile(rel, len(docs), hw.nbytes, hw.hexdigest()))

    def write(self, table: pa.Table) -> list[tuple[int, str]]:
        """Append kept DOCUMENT_SCHEMA rows; a pkl is written each time ``docs_per_pkl`` accumulate.

        Returns ``(row index, why)`` for documents that cannot be published; they are skipped.
        """
        if self._closed:
            raise RuntimeError("writer is closed")
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
            self._buf.append(doc)
            if len(self._buf) >= self.docs_per_pkl:
                self._flush()
        return refused

    def close(self) -> list[OutputFile]:
        """Write the last, partial pkl; returns every pkl written (relpath, documents, bytes, sha256)."""
        if not self._closed:
            self._flush()
            self._closed = True
        return list(self._done)

    def abort(self) -> None:
        self._buf = []
        self._closed = True

    def __enter__(self) -> Mmc4PklWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def count_path(pkl_relpath: str) -> str:
    """The ``.count`` sibling of a pkl path."""
    stem, ext = posixpath.splitext(pkl_relpath)
    if ext != ".pkl":
        raise ValueError(f"not a .pkl path: {pkl_relpath!r}")
    return stem + ".count"
