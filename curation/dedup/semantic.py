"""SemDeDup (Abbas et al. 2023): k-means on CLIP embeddings, then cosine >= 1 - eps inside each cluster.

Clustering bounds the work to sum(cluster_size^2) inner products instead of n^2; pairs that k-means put
in different clusters are missed (the paper's accepted trade-off).
"""

from __future__ import annotations

import math

import faiss
import numpy as np

_DIRECT_MAX_ITEMS = 4096  # below this one exact block beats clustering
_BLOCK = 4096


def default_clusters(n: int) -> int:
    return max(1, int(round(math.sqrt(n / 4))))


def cluster_labels(emb: np.ndarray, n_clusters: int, seed: int, niter: int = 20) -> np.ndarray:
    """Seeded spherical faiss k-means assignments (deterministic for the same rows in the same order)."""
    n, d = emb.shape
    k = max(1, min(n_clusters, n))
    if k == 1:
        return np.zeros(n, dtype=np.int64)
    km = faiss.Kmeans(d, k, niter=niter, seed=seed, spherical=True, verbose=False,
                      max_points_per_centroid=max(256, math.ceil(n / k)))
    km.train(emb)
    _, labels = km.index.search(emb, 1)
    return labels.reshape(-1).astype(np.int64)


def semantic_pairs(emb: np.ndarray, eps: float, n_clusters: int | None = None, seed: int = 0) -> np.ndarray:
    """(m, 2) pairs i < j of L2-normalised embeddings with cosine >= 1 - eps, within k-means clusters."""
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    n = emb.shape[0]
    if n < 2:
        return np.empty((0, 2), dtype=np.int64)
    if n <= _DIRECT_MAX_ITEMS and n_clusters is None:
        labels = np.zeros(n, dtype=np.int64)
    else:
        labels = cluster_labels(emb, n_clusters or default_clusters(n), seed)
    order = np.argsort(labels, kind="stable")
    bounds = np.flatnonzero(np.r_[True, labels[order][1:] != labels[order][:-1], True])
    out = []
    for s, e in zip(bounds[:-1], bounds[1:], strict=True):
        members = order[s:e]
        if members.size > 1:
            out.append(_block_pairs(emb, members, 1.0 - eps))
    pairs = np.concatenate(out) if out else np.empty((0, 2), dtype=np.int64)
    return pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))] if pairs.size else pairs


def _block_pairs(emb: np.ndarray, members: np.ndarray, min_cos: float) -> np.ndarray:
    x = emb[members]
    out = []
    for s in range(0, members.size, _BLOCK):
        sims = x[s:s + _BLOCK] @ x.T  # BLAS sgemm; a (block x cluster) tile bounds memory
        r, c = np.nonzero(sims >= min_cos)
        r = r + s
        keep = r < c
        out.append(np.stack([members[r[keep]], members[c[keep]]], axis=1))
    pairs = np.concatenate(out)
    return np.sort(pairs, axis=1)


def clip_cosines(emb: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Cosine of each pair (rows are L2-normalised)."""
    if pairs.size == 0:
        return np.empty(0, dtype=np.float32)
    return np.einsum("ij,ij->i", emb[pairs[:, 0]], emb[pairs[:, 1]])
