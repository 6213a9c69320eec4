"""Exact duplicates: items whose sha256 of the image bytes is equal."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def exact_pairs(sha256: Sequence[str | None]) -> np.ndarray:
    """(m, 2) int64 index pairs (first member of each equal-hash run, other member); None never matches.

    A star per group is enough: decide() joins pairs with union-find, so every member lands in the group.
    """
    idx = np.array([i for i, h in enumerate(sha256) if h], dtype=np.int64)
    if idx.size < 2:
        return np.empty((0, 2), dtype=np.int64)
    keys = np.array([sha256[i] for i in idx])
    order = np.argsort(keys, kind="stable")
    keys, idx = keys[order], idx[order]
    new_run = np.ones(keys.size, dtype=bool)
    new_run[1:] = keys[1:] != keys[:-1]
    run_first = np.maximum.accumulate(np.where(new_run, np.arange(keys.size), 0))
    members = ~new_run
    return np.stack([idx[run_first[members]], idx[members]], axis=1)


def equal_key_pairs(keys: np.ndarray, all_pairs_max: int, window: int) -> np.ndarray:
    """(m, 2) int64 pairs i < j of rows with equal ``keys`` (LSH buckets, identical hashes): every pair
    within a run of up to ``all_pairs_max`` rows, in a longer one each row with the next ``window`` rows,
    so a huge run (10k blank images, a boilerplate text) costs linear work, not quadratic."""
    order = np.argsort(keys, kind="stable")
    sk = keys[order]
    starts = np.flatnonzero(np.r_[True, sk[1:] != sk[:-1]])
    sizes = np.diff(np.r_[starts, sk.size])
    out = []
    big = sizes > 1
    for s, m in zip(starts[big], sizes[big], strict=True):
        members = order[s:s + m]  # ascending: the sort is stable, so members[a] < members[b] for a < b
        if m <= all_pairs_max:
            a, b = np.triu_indices(m, 1)
        else:
            a = np.repeat(np.arange(m), window)
            b = a + np.tile(np.arange(1, window + 1), m)
            a, b = a[b < m], b[b < m]
        out.append(np.stack([members[a], members[b]], axis=1))
    return np.concatenate(out) if out else np.empty((0, 2), dtype=np.int64)


def exact_groups(sha256: Sequence[str | None]) -> list[list[int]]:
    """Index groups (size >= 2) of equal sha256, each sorted, listed by smallest index."""
    groups: dict[str, list[int]] = {}
    for i, h in enumerate(sha256):
        if h:
            groups.setdefault(h, []).append(i)
    return sorted((g for g in groups.values() if len(g) > 1), key=lambda g: g[0])
