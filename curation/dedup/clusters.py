"""k-means clusters that bound dedup's neighbour searches (thumbnail neighbours, SemDeDup): centroids
trained on a bottom-M sample with faiss, then rounded to an integer grid so that assigning a row to its
cluster is exact arithmetic, the same in every batch, process and partition."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from vila2_curate.curation.dedup.columns import fixed_binary, id_rank, item_ids, list_matrix
from vila2_curate.curation.dedup.pairs import coarse_thumbs
from vila2_curate.curation.dedup.semantic import DIRECT_MAX_ITEMS, default_clusters
from vila2_curate.curation.dedup.tasks import eligible_rows
from vila2_curate.curation.dedup.thumbnails import THUMB_BYTES
from vila2_curate.schemas.config import DedupConfig

SAMPLE_ROWS = 65536  # M: k-means training sample (64-dim thumbnails: 4 MiB; 512-dim embeddings: 128 MiB)
THUMB_CLUSTER_ROWS = 2048  # target rows per thumbnail cluster: flat k-NN inside costs rows^2 x 256
LABEL_BLOCK_ROWS = 65536  # rows per block when assigning clusters
_KMEANS_ITER = 20
SAMPLE_SCHEMA = pa.schema([pa.field("task", pa.string()), pa.field("rank", pa.uint64()),
                           pa.field("thumb", pa.binary()), pa.field("embedding", pa.list_(pa.float32()))])
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


def thumb_cluster_count(n: int) -> int:
    return max(1, math.ceil(n / THUMB_CLUSTER_ROWS))


def semantic_cluster_count(n: int, configured: int | None) -> int:
    if configured:
        return configured
    return 1 if n <= DIRECT_MAX_ITEMS else default_clusters(n)


class DedupClusters:
    """The k-means clusters of one dedup config's thumbnail-neighbour and SemDeDup tasks: a bottom-M sample
    per shard (the M smallest id hashes: independent of sharding and order), ``fit`` on the merged
    sample, then each row's cluster. The reference decide and the partitioned path use the same ones."""

    def __init__(self, cfg: DedupConfig, tasks: set[str]) -> None:
        self.cfg, self.tasks = cfg, tasks & {"thumb", "semantic"}
        self.centroids: dict[str, Centroids] = {}
        self.fitted = False

    def sample(self, sig: pa.Table) -> pa.Table:
        parts = []
        for task, col in (("thumb", "thumb"), ("semantic", "embedding")):
            if task not in self.tasks:
                continue
            rows = eligible_rows(self.cfg, sig, task)
            if rows.size == 0:
                continue
            rank = id_rank(item_ids(sig.select(["source", "key", "image_index"]).take(pa.array(rows))))
            order = np.argsort(rank, kind="stable")[:SAMPLE_ROWS]
            sub = sig.select([col]).take(pa.array(rows[order], type=pa.int64()))  # only the M sampled payloads
            n = sub.num_rows
            parts.append(pa.table({
                "task": pa.array([task] * n), "rank": pa.array(rank[order], type=pa.uint64()),
                "thumb": sub.column("thumb").cast(pa.binary()) if col == "thumb" else pa.nulls(n, pa.binary()),
                "embedding": (sub.column("embedding").cast(pa.list_(pa.float32())) if col == "embedding"
                              else pa.nulls(n, pa.list_(pa.float32()))),
            }, schema=SAMPLE_SCHEMA))
        return pa.concat_tables(parts) if parts else SAMPLE_SCHEMA.empty_table()

    def fit(self, samples: Iterable[pa.Table]) -> None:
        kept: dict[str, pa.Table] = {}
        for s in samples:
            for task in ("thumb", "semantic"):
                part = s.filter(pc.equal(s.column("task"), task))
                if task in kept and kept[task].num_rows >= SAMPLE_ROWS:  # only rows that can enter the bottom M
                    part = part.filter(pc.less(part.column("rank"), kept[task].column("rank")[-1]))
                if part.num_rows == 0:
                    continue
                both = pa.concat_tables([kept[task], part]) if task in kept else part
                order = pc.sort_indices(both, sort_keys=[("rank", "ascending")])[:SAMPLE_ROWS]
                kept[task] = both.take(order)
        self.centroids = {}
        for task, tbl in kept.items():
            ranks = tbl.column("rank").to_numpy()
            n = estimate_rows(ranks, SAMPLE_ROWS)
            if task == "thumb":
                x = coarse_thumbs(fixed_binary(tbl.column("thumb"), THUMB_BYTES))
                self.centroids[task] = train_centroids(x, thumb_cluster_count(n), False, self.cfg.seed, 1020.0)
            else:
                x = list_matrix(tbl.column("embedding"), np.float32)
                k = semantic_cluster_count(n, self.cfg.semantic_clusters)
                c = train_centroids(x.astype(np.float64) * EMB_QUANT, k, True, self.cfg.seed, EMB_QUANT)
                self.centroids[task] = c
        self.fitted = True

    def labels(self, sig: pa.Table, task: str, rows: np.ndarray | None = None) -> np.ndarray:
        """Cluster of every row of ``sig`` (or of ``rows`` of it), all eligible for ``task``."""
        c = self.centroids.get(task)
        n = sig.num_rows if rows is None else len(rows)
        if c is None or n == 0:
            return np.zeros(n, dtype=np.int64)
        features = sig.select(["thumb" if task == "thumb" else "embedding"])
        out = np.empty(n, dtype=np.int64)
        for s in range(0, n, LABEL_BLOCK_ROWS):  # features per block, never a copy of all rows: bounded memory
            part = (features.slice(s, LABEL_BLOCK_ROWS) if rows is None
                    else features.take(pa.array(rows[s:s + LABEL_BLOCK_ROWS], type=pa.int64())))
            if task == "thumb":
                x = coarse_thumbs(fixed_binary(part.column("thumb"), THUMB_BYTES))
            else:
                x = quantized_embeddings(list_matrix(part.column("embedding"), np.float32))
            out[s:s + part.num_rows] = c.assign(x)
        return out
