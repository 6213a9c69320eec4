"""SemDeDup (Abbas et al. 2023): k-means on CLIP embeddings, then cosine >= 1 - eps inside each cluster.

Clustering (``partitioned.PartitionedDedup``'s faiss k-means, fitted on a sample) bounds the work to
sum(cluster_size^2) inner products instead of n^2; pairs that k-means put in different clusters are
missed (the paper's accepted trade-off). Here: the pairs inside one cluster.
"""

from __future__ import annotations

import math

import numpy as np

DIRECT_MAX_ITEMS = 4096  # below this one exact block beats clustering (the partition is one cluster)
_BLOCK = 4096


def default_clusters(n: int) -> int:
    return max(1, int(round(math.sqrt(n / 4))))


def block_pairs(emb: np.ndarray, members: np.ndarray, min_cos: float) -> np.ndarray:
    """Pairs (i < j) of ``members`` with cosine >= ``min_cos``, one (block x cluster) tile at a time."""
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
