"""Near-duplicate candidates by pHash: all pairs within Hamming distance k, without an all-pairs scan.

Small n: faiss.IndexBinaryFlat.range_search (exact, C++ popcount scan; fine up to ~20k items).
Large n: multi-index hashing (Norouzi et al.) as a sorted self-join in numpy. The 64 bits are split into
m = k // 2 + 1 chunks (k=4: three 21-bit chunks); by pigeonhole a pair within distance k agrees on some
chunk up to one flipped bit, so probing every key and its single-bit flips finds all pairs (exact recall).
Hand-written because faiss.IndexBinaryMultiHash with the same chunks and nflip=1 took 30 s for a
1M-item self-join on 2 cores where this join takes a few seconds (benchmarks/bench_dedup.py measures).
"""

from __future__ import annotations

import faiss
import numpy as np

from vila2_curate.curation.dedup.exact import equal_key_pairs

FLAT_MAX_ITEMS = 20_000
_ALL_PAIRS_MAX_RUN = 64  # identical hashes: all pairs up to this many, then a sliding window
_RUN_WINDOW = 32
_TABLE_MAX_BITS = 24  # 2^24 int64 counts + starts = 256 MiB at most


def hamming_pairs(hashes: np.ndarray, max_distance: int, method: str = "auto") -> np.ndarray:
    """(m, 2) int64 pairs i < j with popcount(h_i ^ h_j) <= max_distance, sorted; ``hashes`` uint64."""
    hashes = np.ascontiguousarray(hashes, dtype=np.uint64)
    if hashes.size < 2:
        return np.empty((0, 2), dtype=np.int64)
    if method == "auto":
        method = "flat" if hashes.size <= FLAT_MAX_ITEMS else "mih"
    if method == "flat":
        pairs = _flat_pairs(hashes, max_distance)
    elif method == "mih":
        pairs = _mih_pairs(hashes, max_distance)
    else:
        raise ValueError(f"unknown pHash search method {method!r}")
    return _sorted_unique(pairs, hashes.size)


def _flat_pairs(hashes: np.ndarray, k: int) -> np.ndarray:
    index = faiss.IndexBinaryFlat(64)
    codes = hashes.view(np.uint8).reshape(-1, 8)
    index.add(codes)
    lims, _dist, ids = index.range_search(codes, k + 1)  # faiss keeps distances < radius
    rows = np.repeat(np.arange(hashes.size, dtype=np.int64), np.diff(lims).astype(np.int64))
    cols = ids.astype(np.int64)
    keep = rows < cols
    return np.stack([rows[keep], cols[keep]], axis=1)


def _mih_pairs(hashes: np.ndarray, k: int) -> np.ndarray:
    # Identical hashes are joined separately: a run of 10k blank images must not become 10k^2 pairs here.
    uniq, inverse = np.unique(hashes, return_inverse=True)
    out = [_identical_run_pairs(inverse)]
    if uniq.size > 1:
        upairs = _mih_unique(uniq, k)
        if upairs.size:
            # one representative per unique hash: decide() joins the rest through the identical-run pairs
            first = np.full(uniq.size, -1, dtype=np.int64)
            order = np.argsort(inverse, kind="stable")
            starts = np.flatnonzero(np.r_[True, np.diff(inverse[order]) != 0])
            first[inverse[order[starts]]] = order[starts]
            out.append(np.stack([first[upairs[:, 0]], first[upairs[:, 1]]], axis=1))
    return np.concatenate(out)


def _identical_run_pairs(inverse: np.ndarray) -> np.ndarray:
    """Pairs of rows with identical hashes; bounded work on huge runs (confirmation still sees every
    neighbour in the window)."""
    return equal_key_pairs(inverse, _ALL_PAIRS_MAX_RUN, _RUN_WINDOW)


def _mih_unique(uniq: np.ndarray, k: int) -> np.ndarray:
    """Pairs among distinct hashes within distance k via chunk keys and their single-bit flips."""
    n_chunks = k // 2 + 1  # pigeonhole with radius-1 probes: k < 2 * n_chunks
    bits = 64 // n_chunks
    out = []
    for c in range(n_chunks):
        width = bits if c < n_chunks - 1 else 64 - bits * (n_chunks - 1)
        keys = (uniq >> np.uint64(c * bits)) & np.uint64((1 << width) - 1)
        order = np.argsort(keys, kind="stable")
        if width <= _TABLE_MAX_BITS:  # direct bucket table: O(1) gathers instead of binary searches
            keys = keys.astype(np.int64)
            counts = np.bincount(keys, minlength=1 << width)
            starts = np.cumsum(counts) - counts
        else:
            skeys = keys[order]
        for f in range(-1, width):
            q = keys ^ (keys.dtype.type(1) << keys.dtype.type(f)) if f >= 0 else keys
            if width <= _TABLE_MAX_BITS:
                cnt, lo = counts[q], starts[q]
            else:
                lo = np.searchsorted(skeys, q, side="left")
                cnt = np.searchsorted(skeys, q, side="right") - lo
            qi = np.repeat(np.arange(uniq.size, dtype=np.int64), cnt)
            if qi.size == 0:
                continue
            offs = np.arange(qi.size) - np.repeat(np.cumsum(cnt) - cnt, cnt)
            cj = order[np.repeat(lo, cnt) + offs]
            keep = qi < cj
            qi, cj = qi[keep], cj[keep]
            dist = np.bitwise_count(uniq[qi] ^ uniq[cj])
            ok = dist <= k
            out.append(np.stack([qi[ok], cj[ok]], axis=1))
    return np.concatenate(out) if out else np.empty((0, 2), dtype=np.int64)


def _sorted_unique(pairs: np.ndarray, n: int) -> np.ndarray:
    if pairs.size == 0:
        return np.empty((0, 2), dtype=np.int64)
    lo, hi = np.minimum(pairs[:, 0], pairs[:, 1]), np.maximum(pairs[:, 0], pairs[:, 1])
    code = np.unique(lo.astype(np.int64) * n + hi)
    return np.stack([code // n, code % n], axis=1)


def brute_force_pairs(hashes: np.ndarray, max_distance: int, queries: np.ndarray | None = None,
                      chunk: int = 256) -> np.ndarray:
    """Reference: chunked numpy popcount(XOR) over all pairs (queries x all); for tests and benchmarks."""
    hashes = np.asarray(hashes, dtype=np.uint64)
    qidx = np.arange(hashes.size) if queries is None else np.asarray(queries, dtype=np.int64)
    out = []
    for s in range(0, qidx.size, chunk):
        q = qidx[s:s + chunk]
        d = np.bitwise_count(hashes[q][:, None] ^ hashes[None, :])
        r, c = np.nonzero(d <= max_distance)
        r = q[r]
        keep = r != c
        out.append(np.stack([r[keep], c[keep]], axis=1))
    pairs = np.concatenate(out) if out else np.empty((0, 2), dtype=np.int64)
    return _sorted_unique(pairs, hashes.size)
