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


def exact_groups(sha256: Sequence[str | None]) -> list[list[int]]:
    """Index groups (size >= 2) of equal sha256, each sorted, listed by smallest index."""
    groups: dict[str, list[int]] = {}
    for i, h in enumerate(sha256):
        if h:
            groups.setdefault(h, []).append(i)
    return sorted((g for g in groups.values() if len(g) > 1), key=lambda g: g[0])
