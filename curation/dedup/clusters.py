"""k-means clusters that bound dedup's neighbour searches (thumbnail neighbours, SemDeDup): centroids
trained on a bottom-M sample with faiss, then rounded to an integer grid so that assigning a row to its
cluster is exact arithmetic, the same in every batch, process and partition."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

_KMEANS_ITER = 20
EMB_QUANT = 127.0  # embeddings are L2-normalised: x 127 fits int8, 512-dim dot products stay exact


def quantized_embeddings(emb: np.ndarray) -> np.ndarray:
    return np.rint(np.asarray(emb, dtype=np.float64) * EMB_QUANT)


@dataclass
class Centroids:
    """Integer-valued centroids; ``assign`` is exact (float64 sums of integer products < 2^53)."""

    centres: np.ndarray  # (k, d) float64 holding integers
    spherical: bool

    def assign(self, x: np.ndarray) -> np.ndarray:
        if len(self.centres) == 1 or len(x) == 0:
            return np.zeros(len(x), dtype=np.int64)
        out = np.empty(len(x), dtype=np.int64)
        norms = (self.centres ** 2).sum(axis=1)
        for s in range(0, len(x), 65536):  # bounded (rows x k) score block
            dots = x[s:s + 65536] @ self.centres.T
            out[s:s + 65536] = (np.argmax(dots, axis=1) if self.spherical
                                else np.argmin(norms[None, :] - 2.0 * dots, axis=1))
        return out


def train_centroids(x: np.ndarray, k: int, spherical: bool, seed: int, scale: float) -> Centroids:
    """faiss k-means on the sample (rows in rank order), centroids rounded to the integer grid."""
    import faiss

    k = max(1, min(k, len(x)))
    if k == 1:
        return Centroids(np.zeros((1, x.shape[1] if x.ndim == 2 else 1)), spherical)
    km = faiss.Kmeans(x.shape[1], k, niter=_KMEANS_ITER, seed=seed, spherical=spherical, verbose=False,
                      max_points_per_centroid=max(256, math.ceil(len(x) / k)))
    km.train(np.ascontiguousarray(x / scale, dtype=np.float32))
    return Centroids(np.rint(km.centroids.astype(np.float64) * scale), spherical)


def estimate_rows(ranks: np.ndarray, m: int) -> int:
    """Rows behind a bottom-m sample: exact when it is not full, else the KMV estimate. A function of the
    sample alone (never of how many rows the shards' samples held), so every split of the data agrees."""
    if len(ranks) < m:
        return len(ranks)
    return int((m - 1) * 2.0**64 / (float(ranks[m - 1]) + 1.0))
