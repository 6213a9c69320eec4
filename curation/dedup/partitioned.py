"""Dedup's partitioned decide (schemas.stage.PartitionedDecide): the same decisions as ``decide`` over
all rows, computed in independent groups whose size is a fraction of the dataset.

How each method splits (every candidate pair lands whole in at least one group):

* exact: hash of sha256; the group holds every copy of an image.
* pHash within k: k+1 bands of the 64 bits; a row goes to (band, band value) for each band. Two hashes
  within distance k agree exactly on at least one band (pigeonhole), and all rows with one hash share
  every group, so a group holds whole identical-hash runs and the same representatives as the
  reference's multi-index join. A band row carries ids, hash and keeper attributes only (no thumbnail,
  no embedding: they would travel k+1 times), so a group returns its candidates as *pending* edges
  (each pair once, in its first agreeing band). They are confirmed afterwards (``CombinesOnEngine`` step a,
  schemas/stage.py): per input shard of endpoint a, then of endpoint b, each endpoint's thumbnail /
  embedding is attached from its own shard's signatures and ``confirm_candidates`` (thumbnail distance
  or CLIP cosine, a pure function of the pair) keeps the confirmed ones.
* thumbnail neighbours (crops) and SemDeDup: a coarse k-means cluster (trained on a deterministic sample,
  as SemDeDup does); the reference ``decide`` uses the same clustering, so both search the same clusters.
* MinHash documents / captions: datasketch's LSH band layout; a group holds whole buckets.

Each group returns edges carrying what the keeper rule needs of both endpoints; ``combine``
(curation/dedup/combine.py) turns them into groups by connected components per method (the reason names
the first method connecting a member to its keeper, as ``decide`` does) in one process that holds only
edges and a few numbers per group member.

The k-means sample: the M smallest 64-bit hashes of the item id (a bottom-M sample, mergeable across
shards and independent of order); its M-th hash also estimates the row count (KMV), which sets the
number of clusters. Cluster assignment is computed on integer vectors in float64, where every dot
product is exact, so a row lands in the same cluster whatever batch it is assigned in.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from vila2_curate.curation.dedup.clusters import Centroids, DedupClusters
from vila2_curate.curation.dedup.columns import (
    bool_mask,
    confirm_payload,
    first_of_each_id,
    fixed_binary,
    id_rank,
    item_id_array,
    list_matrix,
)
from vila2_curate.curation.dedup.combine import EDGE_SCHEMA, NODE_COLS, PENDING_METHOD, combine_edges
from vila2_curate.curation.dedup.exact import exact_pairs
from vila2_curate.curation.dedup.minhash import _PRIME, _fmix64, band_keys, lsh_params
from vila2_curate.curation.dedup.pairs import (
    confirm_candidates,
    minhash_band_pairs,
    semantic_cluster_pairs,
    thumb_knn_pairs,
)
from vila2_curate.curation.dedup.phash import hamming_pairs
from vila2_curate.curation.dedup.tasks import dedup_tasks, eligible_rows
from vila2_curate.curation.dedup.thumbnails import THUMB_BYTES
from vila2_curate.schemas.rows import DECISION_SCHEMA
from vila2_curate.schemas.stage import NODE_COL, PARTITION_COL, SHARD_COL

if TYPE_CHECKING:
    from vila2_curate.curation.dedup.stage import DedupStage

log = logging.getLogger(__name__)


_TASK_SALT = {"exact": 1, "phash": 2, "thumb": 3, "semantic": 4, "document": 5, "caption": 6}

PART_SCHEMA = pa.schema([
    pa.field(PARTITION_COL, pa.int64()),
    pa.field("task", pa.string()),
    pa.field("band", pa.int32()),
    pa.field("cluster", pa.int64()),
    pa.field("source", pa.string()),
    pa.field("key", pa.string()),
    pa.field("image_index", pa.int32()),
    pa.field(SHARD_COL, pa.string()),
    pa.field(NODE_COL, pa.int64()),
    pa.field("sha256", pa.string()),
    pa.field("phash", pa.uint64()),
    pa.field("thumb", pa.binary()),
    pa.field("embedding", pa.list_(pa.float32())),
    pa.field("minhash", pa.list_(pa.uint32())),
    pa.field("clip_score", pa.float32()),
    pa.field("publishable", pa.bool_()),
    pa.field("pixels", pa.int64()),
])

def _part_key(task: str, values: np.ndarray) -> np.ndarray:
    """Non-negative int64 partition key of (task, uint64 value)."""
    mixed = _fmix64(values.astype(np.uint64) * _PRIME + np.uint64(_TASK_SALT[task]))
    return (mixed >> np.uint64(1)).astype(np.int64)


# ---- the stage's hooks -----------------------------------------------------------------------------------
class PartitionedDedup:
    """The partitioned hooks of one DedupStage (its config, and its clusters after ``fit``)."""

    def __init__(self, stage: DedupStage) -> None:
        self.stage = stage
        self.cfg = stage.cfg
        self.tasks = dedup_tasks(stage.cfg, stage._images)
        self.clusters = DedupClusters(stage.cfg, self.tasks)
        self._warned = False

    @property
    def fitted(self) -> bool:
        return self.clusters.fitted

    @property
    def centroids(self) -> dict[str, Centroids]:
        return self.clusters.centroids

    # -- step 0: the clusters' sample and fit --
    def sample(self, sig: pa.Table) -> pa.Table:
        return self.clusters.sample(sig)

    def fit(self, samples: Iterable[pa.Table]) -> None:
        self.clusters.fit(samples)

    def labels(self, sig: pa.Table, task: str, rows: np.ndarray | None = None) -> np.ndarray:
        return self.clusters.labels(sig, task, rows)


    # -- step 1: partition (map side, per input shard) --
    def partition(self, sig: pa.Table) -> pa.Table:
        # An engine that skips step 0 still gets correct groups: one cluster per method, which equals the
        # reference up to 2048 thumbnails / 4096 embeddings, but above that neither bounds the group nor
        # matches the reference's clusters.
        if not self.fitted and not self._warned and self.tasks & {"thumb", "semantic"}:
            log.warning("dedup partition() before fit(): one cluster for thumbnail neighbours / SemDeDup; "
                        "run stage.fit(stage.sample(sig) for each shard's sig) first "
                        "(schemas.stage.PartitionedDecide step 0)")
            self._warned = True
        sig = sig.combine_chunks()
        cfg = self.cfg
        parts: list[pa.Table] = []
        for task in sorted(self.tasks):
            rows = eligible_rows(self.cfg, sig, task)
            if rows.size == 0:
                continue
            sub = sig.take(pa.array(rows, type=pa.int64()))
            n = sub.num_rows
            band = np.full(n, -1, dtype=np.int32)
            cluster = np.full(n, -1, dtype=np.int64)
            if task == "exact":
                value = id_rank(sub.column("sha256").to_pylist())
                parts.append(self._rows(sub, task, _part_key(task, value), band, cluster))
            elif task == "phash":
                bands = cfg.phash_max_distance + 1
                ph = sub.column("phash").to_numpy(zero_copy_only=False).astype(np.uint64)
                for b in range(bands):
                    start, w = band_span(b, bands)
                    value = (ph >> np.uint64(start)) & np.uint64((1 << w) - 1)
                    key = _part_key(task, value * np.uint64(bands) + np.uint64(b))
                    parts.append(self._rows(sub, task, key, np.full(n, b, np.int32), cluster))
            elif task in ("thumb", "semantic"):
                cluster = self.labels(sub, task)
                parts.append(self._rows(sub, task, _part_key(task, cluster.astype(np.uint64)), band, cluster))
            else:
                b_count, r = lsh_params(cfg.minhash_threshold, cfg.minhash_num_perm)
                sigs = list_matrix(sub.column("minhash"), np.uint32)
                for b in range(b_count):
                    key = band_keys(sigs, b, r)
                    parts.append(self._rows(sub, task, _part_key(task, key ^ np.uint64(b)),
                                            np.full(n, b, np.int32), cluster))
        return pa.concat_tables(parts) if parts else PART_SCHEMA.empty_table()

    def _rows(self, sub: pa.Table, task: str, key: np.ndarray, band: np.ndarray, cluster: np.ndarray) -> pa.Table:
        """The projection a task's group needs (other columns null: they would only cost shuffle bytes)."""
        n = sub.num_rows
        need = {"source", "key", "image_index", SHARD_COL, NODE_COL, "sha256", "clip_score", "publishable", "pixels"}
        if task == "phash":  # k+1 rows per item: no confirmation payload (attached per shard afterwards)
            need |= {"phash"}
        elif task == "thumb":
            need |= {"phash", "thumb"} | ({"embedding"} if self.cfg.phash_confirm == "clip" else set())
        elif task == "semantic":
            need |= {"embedding"}
        elif task in ("document", "caption"):
            need |= {"minhash"}
        cols: dict[str, Any] = {PARTITION_COL: pa.array(key, type=pa.int64()), "task": pa.array([task] * n),
                                "band": pa.array(band, type=pa.int32()), "cluster": pa.array(cluster, type=pa.int64())}
        for f in PART_SCHEMA:
            if f.name in cols:
                continue
            if f.name in need and f.name in sub.column_names:
                cols[f.name] = sub.column(f.name).cast(f.type)
            else:
                cols[f.name] = pa.nulls(n, f.type)
        return pa.table(cols, schema=PART_SCHEMA)

    # -- step 2: one group --
    def decide_partition(self, rows: pa.Table) -> pa.Table:
        """Confirmed edges of one group. Each (task, band) slice is taken from ``rows`` once, in canonical
        order, so the group's memory is its input plus one slice."""
        cfg = self.cfg
        edges: list[pa.Table] = []
        task_col = rows.column("task")
        for task in sorted(set(task_col.unique().to_pylist())):
            in_task = bool_mask(pc.equal(task_col, task))
            if task in ("document", "caption"):
                _, r = lsh_params(cfg.minhash_threshold, cfg.minhash_num_perm)
                band_col = rows.column("band").to_numpy(zero_copy_only=False)
                for b in sorted(set(band_col[in_task].tolist())):
                    tb = _slice(rows, in_task & (band_col == b), dedupe=False)
                    pairs = minhash_band_pairs(list_matrix(tb.column("minhash"), np.uint32), b, r,
                                               cfg.minhash_threshold, identical=b == 0)
                    edges.append(_edges(task, tb, pairs))
                continue
            if task == "phash":  # band by band; candidates leave unconfirmed (the rows carry no payload)
                method = "phash" if cfg.phash_confirm == "none" else PENDING_METHOD
                band_col = rows.column("band").to_numpy(zero_copy_only=False)
                for b in sorted(set(band_col[in_task].tolist())):
                    t = _slice(rows, in_task & (band_col == b), dedupe=True)
                    hashes = t.column("phash").to_numpy(zero_copy_only=False).astype(np.uint64)
                    pairs = _first_band_pairs(hamming_pairs(hashes, cfg.phash_max_distance, "mih"), hashes, b,
                                              cfg.phash_max_distance + 1)
                    edges.append(_edges(method, t, pairs))
                continue
            if task == "thumb":  # cluster by cluster: one cluster's thumbnails at a time, not the task's
                edges.extend(self._thumb_edges(rows, in_task))
                continue
            t = _slice(rows, in_task, dedupe=True)
            if task == "exact":
                pairs = exact_pairs(t.column("sha256").to_pylist())
                edges.append(_edges("exact", t, pairs))
            elif task == "semantic":
                emb = list_matrix(t.column("embedding"), np.float32)
                pairs = semantic_cluster_pairs(emb, t.column("cluster").to_numpy(), cfg.semantic_eps)
                edges.append(_edges("semantic", t, pairs))
        edges = [e for e in edges if e.num_rows]
        return pa.concat_tables(edges) if edges else EDGE_SCHEMA.empty_table()

    def _thumb_edges(self, rows: pa.Table, in_task: np.ndarray) -> list[pa.Table]:
        """Thumbnail neighbours inside each cluster, confirmed like pHash candidates: the pairs of
        ``thumb_candidate_pairs`` on the task's rows in canonical order (a cluster's members keep that
        order), one cluster's rows taken at a time."""
        idx = np.flatnonzero(in_task)
        keys = rows.select(["source", "key", "image_index", "cluster"]).filter(pa.array(in_task))
        order = _canonical_order(keys, dedupe=True)
        members, labels = idx[order], keys.column("cluster").to_numpy()[order]
        del keys
        out = []
        for c in np.unique(labels).tolist():
            m = members[labels == c]
            if m.size < 2:
                continue
            mask = np.zeros(rows.num_rows, dtype=bool)
            mask[m] = True
            ascending = np.sort(m)  # filter keeps row order; take puts the members back in canonical order
            t = rows.filter(pa.array(mask)).take(pa.array(np.searchsorted(ascending, m)))
            pairs = thumb_knn_pairs(fixed_binary(t.column("thumb"), THUMB_BYTES), self.cfg.thumbnail_neighbours)
            out.append(_edges("phash", t, self._confirm(t, pairs)))
        return out

    def _confirm(self, t: pa.Table, pairs: np.ndarray) -> np.ndarray:
        if pairs.size == 0 or self.cfg.phash_confirm == "none":
            return pairs
        emb_col = t.column("embedding") if self.cfg.phash_confirm == "clip" else None
        return confirm_candidates(pairs, *confirm_payload(t.column("thumb"), emb_col), self.cfg)

    # -- confirm pending pHash candidates (schemas.stage.CombinesOnEngine, step a) --
    def split_pending(self, partial: pa.Table) -> tuple[pa.Table, pa.Table]:
        """(confirmed edges, pending pHash candidates) of one ``decide_partition`` result."""
        pending = bool_mask(pc.equal(partial.column("method"), PENDING_METHOD))
        if not pending.any():
            return partial, EDGE_SCHEMA.empty_table()
        return partial.filter(pa.array(~pending)), partial.filter(pa.array(pending))

    def attach_pending(self, pending: pa.Table, signatures: pa.Table, end: str) -> pa.Table:
        """``pending`` with endpoint ``end``'s confirmation payload (``{end}_thumb``, and ``{end}_embedding``
        under ``clip``) from ``signatures``, the input shard that holds endpoint ``end`` of every edge."""
        sig = signatures.select(["source", "key", "image_index", "thumb", "embedding"])
        ids = item_id_array(sig)
        idx = pc.index_in(pending.column(f"{end}_id"), value_set=ids)
        if pending.num_rows and idx.null_count:
            raise ValueError(f"pending edges name {end}-endpoints missing from the shard's signatures")
        out = pending.append_column(f"{end}_thumb", sig.column("thumb").take(idx))
        if self.cfg.phash_confirm == "clip":
            out = out.append_column(f"{end}_embedding", sig.column("embedding").take(idx))
        return out

    def confirm_pending(self, attached: pa.Table) -> pa.Table:
        """The edges of ``attached`` (both payloads attached) that ``confirm_candidates`` confirms, as
        ``phash`` edges without payload: the test ``decide_partition`` ran before on whole groups."""
        n = attached.num_rows
        if n == 0:
            return EDGE_SCHEMA.empty_table()
        clip = self.cfg.phash_confirm == "clip"
        thumbs = pa.chunked_array(attached.column("a_thumb").chunks + attached.column("b_thumb").chunks)
        emb = (pa.chunked_array(attached.column("a_embedding").chunks + attached.column("b_embedding").chunks)
               if clip else None)
        pairs = np.stack([np.arange(n, dtype=np.int64), np.arange(n, 2 * n, dtype=np.int64)], axis=1)
        kept = confirm_candidates(pairs, *confirm_payload(thumbs, emb), self.cfg)[:, 0]
        edges = attached.select(EDGE_SCHEMA.names).take(pa.array(np.sort(kept), type=pa.int64()))
        return edges.set_column(0, "method", pa.array(["phash"] * edges.num_rows, type=pa.string()))

    # -- step 3: combine (one process: edges and group members only) --
    def combine(self, partials: list[pa.Table]) -> pa.Table:
        return combine_edges(partials, self.cfg)

    # -- step 4: per input shard --
    @staticmethod
    def shard_decisions(combined: pa.Table, signatures: pa.Table) -> pa.Table:
        return combined.select(DECISION_SCHEMA.names).cast(DECISION_SCHEMA)


def band_span(band: int, bands: int) -> tuple[int, int]:
    """(first bit, width) of pHash band ``band`` of ``bands`` (the last band takes the remainder)."""
    width = 64 // bands
    return band * width, (width if band < bands - 1 else 64 - width * (bands - 1))


def _first_band_pairs(pairs: np.ndarray, hashes: np.ndarray, band: int, bands: int) -> np.ndarray:
    """The pairs whose first agreeing band is ``band``, so each pair leaves step 2 once, whatever the
    group count: a pair that agrees on an earlier band comes from that band's group (which holds both
    rows too), and one that disagrees on ``band`` met here only because two band values share a group."""
    if pairs.size == 0:
        return pairs
    x = hashes[pairs[:, 0]] ^ hashes[pairs[:, 1]]

    def agree(b: int) -> np.ndarray:
        start, width = band_span(b, bands)
        return ((x >> np.uint64(start)) & np.uint64((1 << width) - 1)) == 0

    keep = agree(band)
    for earlier in range(band):
        keep &= ~agree(earlier)
    return pairs[keep]


def _slice(rows: pa.Table, mask: np.ndarray, dedupe: bool) -> pa.Table:
    """The masked rows in canonical order (one take), one row per id when ``dedupe`` (a row reaches a
    group once per band that maps there)."""
    # filter works chunk by chunk; a take on the many-chunk input would first concatenate whole columns
    sub = rows.filter(pa.array(mask))
    return sub.take(pa.array(_canonical_order(sub, dedupe)))


def _canonical_order(tbl: pa.Table, dedupe: bool) -> np.ndarray:
    """Row positions of ``tbl`` in canonical (source, key, image_index) order (stable), the first row
    per id only when ``dedupe``."""
    keys = tbl.select(["source", "key", "image_index"])
    order = pc.sort_indices(keys, sort_keys=[("source", "ascending"), ("key", "ascending"),
                                             ("image_index", "ascending")]).to_numpy()
    if dedupe:
        order = order[first_of_each_id(keys.take(pa.array(order)))]
    return order


def _edges(method: str, t: pa.Table, pairs: np.ndarray) -> pa.Table:
    """Edge rows for local index pairs of ``t``, each endpoint with its keeper attributes and shard."""
    if pairs.size == 0:
        return EDGE_SCHEMA.empty_table()
    involved = np.unique(pairs)
    sub = t.select(["source", "key", "image_index", *NODE_COLS[1:]]).take(pa.array(involved))
    nodes = {"id": item_id_array(sub), **{c: sub.column(c) for c in NODE_COLS[1:]}}
    local = np.searchsorted(involved, pairs)
    cols: dict[str, Any] = {"method": pa.array([method] * len(pairs))}
    for end, idx in (("a", local[:, 0]), ("b", local[:, 1])):
        take = pa.array(idx, type=pa.int64())
        for c in NODE_COLS:
            cols[f"{end}_{c}"] = nodes[c].take(take)
    return pa.table(cols, schema=EDGE_SCHEMA)
