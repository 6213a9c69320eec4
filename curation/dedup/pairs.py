"""Candidate pairs and their confirmation, shared by dedup's single-process ``decide`` (the reference) and
its partitioned path, so both find the same pairs: thumbnail k-NN inside clusters, SemDeDup cosine
blocks inside clusters, LSH band buckets for MinHash, and the second signal (CLIP cosine or the
colour-aware thumbnail test) that confirms a pHash or thumbnail candidate."""

from __future__ import annotations

import numpy as np

from vila2_curate.curation.dedup.minhash import _bucket_pairs, band_keys
from vila2_curate.curation.dedup.semantic import block_pairs, clip_cosines
from vila2_curate.curation.dedup.thumb_match import confirm_pairs, content_lines, knn_index_pairs, knn_key
from vila2_curate.curation.dedup.thumbnails import GREY_SIDE
from vila2_curate.schemas.config import DedupConfig


def coarse_thumbs(thumbs: np.ndarray) -> np.ndarray:
    """(n, 64) float64: 2x2 sums of the 16x16 grey thumbnail, integers <= 1020 (exact dot products). For a
    line of text the sums across the line are replaced by their rounded mean: a line is a few pixels
    tall, so its grid's rows move with a pixel of content-box error."""
    g = thumbs[:, :GREY_SIDE * GREY_SIDE].reshape(-1, GREY_SIDE // 2, 2, GREY_SIDE // 2, 2).astype(np.float64)
    g = g.sum(axis=(2, 4))
    lines = content_lines(thumbs)
    for axis, line in ((1, 1), (2, 2)):
        sel = lines == line
        if sel.any():
            g[sel] = np.broadcast_to(np.rint(g[sel].mean(axis=axis, keepdims=True)), g[sel].shape)
    return g.reshape(len(thumbs), -1)


def thumb_knn_pairs(thumbs: np.ndarray, k: int) -> np.ndarray:
    """Pairs i < j with j among i's k nearest thumbnails (exact faiss flat search, rows in the given order)
    by ``thumb_match.knn_key``: the 8x8 pooled grey grid (a quarter of the 16x16 grid's cost; a small crop
    or shift moves it even less), the content box and the mean colour. Every candidate is then confirmed
    on the full thumbnail."""
    import faiss

    n = len(thumbs)
    if n < 2 or k <= 0:
        return np.empty((0, 2), dtype=np.int64)
    x = knn_key(thumbs, np.rint(coarse_thumbs(thumbs) / 4))
    return knn_index_pairs(faiss.IndexFlatL2(x.shape[1]), x, k)


def clustered_pairs(labels: np.ndarray, fn) -> np.ndarray:
    """fn(members) -> (m, 2) global index pairs, called per cluster with members in ascending order."""
    order = np.argsort(labels, kind="stable")
    bounds = np.flatnonzero(np.r_[True, labels[order][1:] != labels[order][:-1], True]) if len(labels) else []
    out = [fn(order[s:e]) for s, e in zip(bounds[:-1], bounds[1:], strict=True) if e - s > 1]
    out = [p for p in out if p.size]
    return np.concatenate(out) if out else np.empty((0, 2), dtype=np.int64)


def thumb_candidate_pairs(thumbs: np.ndarray, rows: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Thumbnail k-NN pairs (indices of ``thumbs``) among ``rows``, inside each cluster (``labels``, one per
    row), with no pHash bound: a 2-6% crop or a JPEG q35 re-encode of a flat graphic moves its pHash by tens
    of bits (pipelines/demo/dedup_eval.py), so the colour-aware ``thumb_match.confirm_pairs`` decides alone.
    A cluster's thumbnails are gathered one cluster at a time (never a copy of every row's)."""
    return clustered_pairs(labels, lambda m: rows[m][thumb_knn_pairs(thumbs[rows[m]], k)])


def semantic_cluster_pairs(emb: np.ndarray, labels: np.ndarray, eps: float) -> np.ndarray:
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    return clustered_pairs(labels, lambda m: block_pairs(emb, m, 1.0 - eps))


def confirm_candidates(pairs: np.ndarray, thumbs: np.ndarray, has_thumb: np.ndarray, emb: np.ndarray | None,
                       has_emb: np.ndarray | None, cfg: DedupConfig) -> np.ndarray:
    """Keep candidate pairs a second signal confirms: CLIP cosine where both have embeddings (``clip``),
    else thumbnails (``thumb_match.confirm_pairs``) where both have them; neither signal: not confirmed.
    ``thumbs`` (n, THUMB_BYTES) and ``emb`` (n, d) are row-aligned with their ``has_*`` masks."""
    if pairs.size == 0 or cfg.phash_confirm == "none":
        return pairs
    ok = np.zeros(len(pairs), dtype=bool)
    todo = np.ones(len(pairs), dtype=bool)
    if cfg.phash_confirm == "clip" and emb is not None and has_emb is not None:
        has = has_emb[pairs[:, 0]] & has_emb[pairs[:, 1]]
        if has.any():
            uniq, inv = np.unique(pairs[has], return_inverse=True)
            ok[has] = clip_cosines(np.ascontiguousarray(emb[uniq], dtype=np.float32),
                                   inv.reshape(-1, 2)) >= cfg.clip_confirm_min_cosine
            todo &= ~has
    has_t = todo & has_thumb[pairs[:, 0]] & has_thumb[pairs[:, 1]]
    if has_t.any():  # indexes ``thumbs`` in place: a compacted copy would cost a group's thumbnails again
        ok[has_t] = confirm_pairs(thumbs, pairs[has_t], cfg)
    return pairs[ok]


def minhash_band_pairs(sigs: np.ndarray, band: int, rows: int, threshold: float,
                       identical: bool) -> np.ndarray:
    """Pairs (row indices) found in one LSH band: identical signatures as a star (when ``identical``) and
    bucket candidates among distinct signatures verified by estimated Jaccard, as the reference does."""
    if len(sigs) < 2:
        return np.empty((0, 2), dtype=np.int64)
    uniq, first, inverse = np.unique(sigs, axis=0, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    out = []
    if identical:
        star = np.stack([first[inverse], np.arange(len(sigs))], axis=1)
        out.append(star[star[:, 0] != star[:, 1]])
    pairs = _bucket_pairs(band_keys(uniq, band, rows))
    if pairs.size:
        est = (uniq[pairs[:, 0]] == uniq[pairs[:, 1]]).mean(axis=1)
        pairs = pairs[est >= threshold]
        out.append(np.stack([first[pairs[:, 0]], first[pairs[:, 1]]], axis=1))
    out = [p for p in out if p.size]
    return np.concatenate(out) if out else np.empty((0, 2), dtype=np.int64)
