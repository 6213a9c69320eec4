"""Union-find (disjoint sets) over hashable ids, with deterministic group listing.

Hand-written: it is twenty lines, and scipy's connected_components needs dense integer ids and a sparse
matrix, while decide() joins groups from several methods over string and integer ids incrementally.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from typing import Any


class UnionFind:
    """Disjoint sets with path compression and union by size; ``groups()`` is order-independent."""

    def __init__(self, items: Iterable[Hashable] = ()) -> None:
        self._parent: dict[Hashable, Hashable] = {}
        self._size: dict[Hashable, int] = {}
        for item in items:
            self.add(item)

    def add(self, item: Hashable) -> None:
        if item not in self._parent:
            self._parent[item] = item
            self._size[item] = 1

    def find(self, item: Hashable) -> Hashable:
        """Root of ``item``'s set (adds ``item`` as a singleton if unseen)."""
        self.add(item)
        root = item
        while self._parent[root] != root:
            root = self._parent[root]
        while self._parent[item] != root:  # path compression: point the whole path at the root
            self._parent[item], item = root, self._parent[item]
        return root

    def union(self, a: Hashable, b: Hashable) -> Hashable:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        if self._size[ra] < self._size[rb]:
            ra, rb = rb, ra
        self._parent[rb] = ra
        self._size[ra] += self._size[rb]
        return ra

    def union_pairs(self, pairs: Iterable[tuple[Any, Any]]) -> None:
        for a, b in pairs:
            self.union(a, b)

    def connected(self, a: Hashable, b: Hashable) -> bool:
        return self.find(a) == self.find(b)

    def __contains__(self, item: Hashable) -> bool:
        return item in self._parent

    def __len__(self) -> int:
        return len(self._parent)

    def groups(self, min_size: int = 2) -> list[list[Any]]:
        """Sets with at least ``min_size`` members, each sorted, listed by their smallest member.

        Ids must be mutually comparable (all str or all int): sorting makes the listing independent of
        the order in which items and unions arrived.
        """
        by_root: dict[Hashable, list[Any]] = {}
        for item in self._parent:
            by_root.setdefault(self.find(item), []).append(item)
        out = [sorted(members) for members in by_root.values() if len(members) >= min_size]
        out.sort(key=lambda g: g[0])
        return out
