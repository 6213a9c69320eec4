"""Arrow columns as numpy arrays, item ids and their canonical order: what dedup's reference decide and
its partitioned path share (pure functions of a table)."""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from vila2_curate.curation.dedup.thumbnails import THUMB_BYTES


def item_id_array(tbl: pa.Table) -> pa.ChunkedArray:
    """``source/key/image_index`` per row: the item id edges and groups use."""
    text = tbl.schema.field("source").type  # string, or large_string in the reference's wide table
    return pc.binary_join_element_wise(tbl.column("source"), pc.cast(tbl.column("key"), text),
                                       pc.cast(tbl.column("image_index"), text), pa.scalar("/", text))


def item_ids(tbl: pa.Table) -> list[str]:
    return item_id_array(tbl).to_pylist()


def fixed_binary(col: pa.ChunkedArray | pa.Array, width: int) -> np.ndarray:
    """(n, width) uint8 matrix of a binary column whose values all have ``width`` bytes (nulls: zeros); a view
    of a one-chunk column. Chunks are joined in numpy, not Arrow: 32-bit offsets overflow at 2 GiB."""
    if isinstance(col, pa.ChunkedArray):
        if col.num_chunks != 1:
            parts = [fixed_binary(c, width) for c in col.chunks]
            return np.concatenate(parts) if parts else np.zeros((0, width), dtype=np.uint8)
        col = col.chunk(0)
    if len(col) == 0:
        return np.zeros((0, width), dtype=np.uint8)
    if col.null_count:
        col = pc.fill_null(col, pa.scalar(bytes(width), col.type))
    wide = pa.types.is_large_binary(col.type)
    offsets = np.frombuffer(col.buffers()[1], dtype=np.int64 if wide else np.int32)[col.offset:col.offset + len(col) + 1]
    data = np.frombuffer(col.buffers()[2], dtype=np.uint8)
    if not np.all(np.diff(offsets) == width):
        raise ValueError(f"binary column values are not all {width} bytes")
    return data[offsets[0]:offsets[-1]].reshape(-1, width)


def list_matrix(col: pa.ChunkedArray | pa.Array, dtype: type) -> np.ndarray:
    """(n, d) matrix of a list column whose values all have one length (the rows a task selected); chunks
    joined in numpy (see ``fixed_binary``)."""
    chunks = col.chunks if isinstance(col, pa.ChunkedArray) else [col]
    parts = [np.asarray(c.flatten().to_numpy(zero_copy_only=False), dtype=dtype).reshape(len(c), -1)
             for c in chunks if len(c)]
    if not parts:
        return np.zeros((0, 0), dtype=dtype)
    return np.ascontiguousarray(parts[0] if len(parts) == 1 else np.concatenate(parts), dtype=dtype)


def id_rank(ids: list[str]) -> np.ndarray:
    """Stable 64-bit hash of each string (blake2b; ``hash()`` differs per process): the bottom-M sample
    keeps the smallest ids; also the exact method's partition value of a sha256."""
    return np.fromiter((int.from_bytes(hashlib.blake2b(i.encode(), digest_size=8, person=b"vila2-sample")
                                       .digest(), "little") for i in ids), dtype=np.uint64, count=len(ids))


def first_of_each_id(tbl: pa.Table) -> np.ndarray:
    """Mask of the rows of ``tbl`` (sorted by source, key, image_index) whose id differs from the previous
    row's: the first row per id (Arrow compares the columns; no Python value per row)."""
    n = tbl.num_rows
    first = np.ones(n, dtype=bool)
    if n > 1:
        first[1:] = False
        for c in ("source", "key", "image_index"):
            col = tbl.column(c)
            first[1:] |= bool_mask(pc.not_equal(col.slice(1), col.slice(0, n - 1)))
    return first


Payload = tuple[np.ndarray, np.ndarray, "np.ndarray | None", "np.ndarray | None"]


def confirm_payload(thumb: pa.ChunkedArray | pa.Array, emb: pa.ChunkedArray | pa.Array | None) -> Payload:
    """(thumbs, has_thumb, embeddings, has_embedding) row-aligned arrays for ``confirm_candidates``."""
    has_t = bool_mask(pc.is_valid(thumb))
    thumbs = fixed_binary(thumb, THUMB_BYTES)
    if emb is None:
        return thumbs, has_t, None, None
    has_e = has_values(emb)
    if has_e.all():  # every row has one: the matrix directly, no zero-filled copy
        return thumbs, has_t, list_matrix(emb, np.float32), has_e
    dim = max(int(pc.max(pc.list_value_length(emb)).as_py() or 0), 1)
    matrix = np.zeros((len(has_e), dim), dtype=np.float32)
    if has_e.any():
        matrix[has_e] = list_matrix(emb.take(pa.array(np.flatnonzero(has_e))), np.float32)
    return thumbs, has_t, matrix, has_e


def bool_mask(arr: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Boolean numpy mask of an Arrow boolean result; null counts as False."""
    return np.asarray(pc.fill_null(arr, False).to_numpy(zero_copy_only=False), dtype=bool)


def has_values(lists: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Mask of the non-null, non-empty values of a list column."""
    return bool_mask(pc.greater(pc.list_value_length(lists), 0))
