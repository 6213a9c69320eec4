"""MinHash over word shingles, batch-vectorised, plus LSH banding to find near-duplicate texts.

Signatures: words are hashed once per distinct word in the batch (blake2b, stable across processes,
unlike ``hash()``), shingle hashes are combined in numpy, and the ``num_perm`` permutations are
multiply-shift hashes ((a*x + b) mod 2^64) >> 32 evaluated as one (perms x shingles) matrix per
cache-sized chunk of whole documents, reduced per document along contiguous memory with
``np.minimum.reduceat`` (the shift after the minimum). datasketch's ``MinHash.bulk`` runs a Python sha1 per
shingle and a ``% mersenne_prime`` per cell per document; benchmarks/bench_dedup.py measures both.
The values are a valid MinHash family but not bit-identical to datasketch's.

LSH: bands/rows from datasketch's own optimiser (``_optimal_param``); banding is done in numpy (sort
by band key) so a million signatures need no Python loop, and candidates are verified by the
estimated Jaccard >= threshold.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
from datasketch.lsh import _optimal_param

from vila2_curate.curation.dedup.exact import equal_key_pairs

EMPTY = np.uint32(0xFFFFFFFF)  # signature value of a text without words (never matched)
_MIX1, _MIX2 = np.uint64(0xFF51AFD7ED558CCD), np.uint64(0xC4CEB9FE1A85EC53)
_PRIME = np.uint64(0x9E3779B97F4A7C15)
_CHUNK_CELLS = 1 << 20  # perms x shingles per matrix chunk (8 MiB of uint64: stays in cache, measured)
_ALL_PAIRS_MAX_BUCKET = 64


def _fmix64(x: np.ndarray) -> np.ndarray:
    """murmur3 finaliser: spreads every input bit over the 64-bit word (vectorised)."""
    x = x ^ (x >> np.uint64(33))
    x = x * _MIX1
    x = x ^ (x >> np.uint64(33))
    x = x * _MIX2
    return x ^ (x >> np.uint64(33))


def _word_hash(word: str) -> int:
    return int.from_bytes(hashlib.blake2b(word.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.integers(1, 2**64 - 1, size=num_perm, dtype=np.uint64, endpoint=True) | np.uint64(1)
    b = rng.integers(0, 2**64 - 1, size=num_perm, dtype=np.uint64, endpoint=True)
    return a, b


def shingle_hashes(texts: Sequence[str], shingle_words: int) -> tuple[np.ndarray, np.ndarray]:
    """64-bit hashes of lower-cased word k-shingles of every text, and per-text counts.

    A text shorter than k words yields one shingle of all its words; an empty text yields none.
    """
    vocab: dict[str, int] = {}
    ids: list[int] = []
    lengths = np.empty(len(texts), dtype=np.int64)
    for t, text in enumerate(texts):
        words = (text or "").lower().split()
        lengths[t] = len(words)
        ids.extend([vocab.setdefault(w, len(vocab)) for w in words])
    word_h = np.fromiter((_word_hash(w) for w in vocab), dtype=np.uint64, count=len(vocab))
    h = word_h[np.asarray(ids, dtype=np.int64)] if ids else np.empty(0, dtype=np.uint64)
    k = max(1, shingle_words)
    n_sh = np.where(lengths >= k, lengths - k + 1, np.minimum(lengths, 1))
    total = h.size
    starts = np.cumsum(lengths) - lengths
    # shingle j of text t starts at word starts[t] + j and spans min(k, lengths[t]) words
    sh_start = np.repeat(starts, n_sh) + (np.arange(int(n_sh.sum())) - np.repeat(np.cumsum(n_sh) - n_sh, n_sh))
    span = np.repeat(np.minimum(lengths, k), n_sh)
    acc = np.zeros(sh_start.size, dtype=np.uint64)
    for j in range(k):
        pos = np.minimum(sh_start + j, max(total - 1, 0))
        word = np.where(j < span, h[pos] if total else np.uint64(0), np.uint64(0))
        acc = _fmix64(acc * _PRIME + word + np.uint64(j))
    return acc, n_sh


def minhash_signatures(texts: Sequence[str], num_perm: int = 128, shingle_words: int = 3,
                       seed: int = 0) -> np.ndarray:
    """(n, num_perm) uint32 MinHash signatures; rows of texts without words are all EMPTY."""
    a, b = permutations(num_perm, seed)
    sh, counts = shingle_hashes(texts, shingle_words)
    out = np.full((len(texts), num_perm), EMPTY, dtype=np.uint32)
    has = np.flatnonzero(counts > 0)
    if has.size == 0:
        return out
    seg_start = (np.cumsum(counts) - counts)[has]
    seg_end = seg_start + counts[has]
    # Layout (perms x shingles) so each permutation's minimum over a text is a reduction along
    # contiguous memory: np.minimum.reduceat along axis 0 of the transposed matrix was ~6x slower.
    # The >> 32 is applied after the minimum (it is monotone), on (perms x texts) instead of every cell.
    a_col, b_col = a[:, None], b[:, None]
    t0 = 0
    while t0 < has.size:
        # whole texts per chunk (reduceat segments never straddle chunks), about _CHUNK_CELLS cells each
        lo = seg_start[t0]
        t1 = max(t0 + 1, int(np.searchsorted(seg_end, lo + _CHUNK_CELLS // num_perm, side="right")))
        m = a_col * sh[lo:seg_end[t1 - 1]]
        m += b_col
        low = np.minimum.reduceat(m, seg_start[t0:t1] - lo, axis=1)
        low >>= np.uint64(32)
        out[has[t0:t1]] = low.T
        t0 = t1
    return out


def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) from datasketch's optimiser, weighted towards recall.

    Every candidate is verified against ``threshold`` afterwards, so a false positive costs one
    comparison while a false negative is a missed duplicate: with equal weights (9 bands x 13 rows at
    0.8) a pair at Jaccard 0.87 is missed about 30% of the time; weighting misses 9:1 finds ~99%.
    """
    return _optimal_param(threshold, num_perm, 0.1, 0.9)


def near_duplicate_pairs(sigs: np.ndarray, threshold: float) -> np.ndarray:
    """(m, 2) pairs i < j whose estimated Jaccard >= threshold, found by LSH banding then verified.

    Rows with identical signatures are paired as a star (one union per member); inside an LSH bucket of
    distinct signatures all pairs are checked up to 64 members, then each member against its 64 bucket
    neighbours in sorted order (bounded work on boilerplate-sized buckets).
    """
    n, num_perm = sigs.shape
    valid = np.flatnonzero(sigs[:, 0] != EMPTY) if n else np.empty(0, dtype=np.int64)
    if valid.size < 2:
        return np.empty((0, 2), dtype=np.int64)
    uniq, first, inverse = np.unique(sigs[valid], axis=0, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    rep = valid[first]
    out = [np.stack([rep[inverse], valid], axis=1)]
    out[0] = out[0][out[0][:, 0] != out[0][:, 1]]
    bands, rows = lsh_params(threshold, num_perm)
    cand = []
    for band in range(bands):
        cand.append(_bucket_pairs(band_keys(uniq, band, rows)))
    if cand:
        pairs = np.unique(np.concatenate(cand), axis=0)
        if pairs.size:
            est = (uniq[pairs[:, 0]] == uniq[pairs[:, 1]]).mean(axis=1)
            pairs = pairs[est >= threshold]
            out.append(np.stack([rep[pairs[:, 0]], rep[pairs[:, 1]]], axis=1))
    pairs = np.concatenate(out)
    return np.sort(pairs, axis=1) if pairs.size else np.empty((0, 2), dtype=np.int64)


def band_keys(uniq: np.ndarray, band: int, rows: int) -> np.ndarray:
    """datasketch-layout LSH key of each signature row in one band."""
    block = uniq[:, band * rows:(band + 1) * rows].astype(np.uint64)
    key = np.zeros(uniq.shape[0], dtype=np.uint64)
    for c in range(rows):
        key = _fmix64(key * _PRIME + block[:, c])
    return key


def _bucket_pairs(key: np.ndarray) -> np.ndarray:
    """Candidate pairs i < j of rows in the same LSH bucket (one band's keys)."""
    return equal_key_pairs(key, _ALL_PAIRS_MAX_BUCKET, _ALL_PAIRS_MAX_BUCKET)
