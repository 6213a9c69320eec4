"""Dedup's combine step: duplicate groups from the confirmed edges of every partition, in one process.

The one step of the partitioned decide that sees the whole dataset's edges, so it is written to hold
nothing per node in Python: ids become integers (Arrow ``unique`` / ``index_in``), groups are scipy's
connected components (C), keepers and reasons come from numpy sorts over the members' attributes, and the
decision strings are joined by Arrow kernels. Memory: the edges (~250 bytes each as Arrow) plus a few
numeric arrays per node; no Python object per member (the earlier per-member dicts cost ~2 KB an edge).

The rules are ``DedupStage.decide``'s (the reference): documents keep their smallest id; images keep the
``keeper.keeper_sort_key`` minimum (``keeper_sort_columns``), images of dropped documents last; a member's reason names the first
image method (exact, phash, semantic) that connects it to its keeper, else the first method it has an edge
of; caption groups with at least ``boilerplate_min_images`` distinct images flag every member.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from vila2_curate.curation.dedup.keeper import keeper_sort_columns
from vila2_curate.schemas.config import DedupConfig
from vila2_curate.schemas.rows import DECISION_SCHEMA
from vila2_curate.schemas.stage import NODE_COL, SHARD_COL

BOILERPLATE_FLAG = "boilerplate_caption"
IMAGE_METHODS = ("exact", "phash", "semantic")  # also the priority of the reason given to a member
PENDING_METHOD = "phash_pending"  # a pHash candidate not yet confirmed (CombinesOnEngine step a)
# NODE_COL: the integer node the engine assigns per input shard (components.node_ids); null in the
# reference path, which names nodes by id
NODE_COLS = ("id", SHARD_COL, "sha256", "clip_score", "publishable", "pixels", NODE_COL)
EDGE_SCHEMA = pa.schema(
    [pa.field("method", pa.string())]
    + [pa.field(f"{end}_{c}", t) for end in ("a", "b") for c, t in (
        ("id", pa.string()), (SHARD_COL, pa.string()), ("sha256", pa.string()), ("clip_score", pa.float32()),
        ("publishable", pa.bool_()), ("pixels", pa.int64()), (NODE_COL, pa.int64()))]
)
COMBINED_SCHEMA = DECISION_SCHEMA.append(pa.field(SHARD_COL, pa.string()))

_NONE, _DOCUMENT, _IMAGE, _CAPTION = 0, 1, 2, 3  # what decided a node (a later kind overrides, captions don't)
_GROUP_PREFIX = {_DOCUMENT: "document:", _IMAGE: "image:", _CAPTION: "caption:"}


class _Graph:
    """Edges as integer node pairs, with per-method connected components."""

    def __init__(self, a: np.ndarray, b: np.ndarray, method: np.ndarray, n: int) -> None:
        self.a, self.b, self.method, self.n = a, b, method, n

    def components(self, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(component label per node, whether the node has an edge in ``mask``)."""
        from scipy.sparse import coo_matrix
        from scipy.sparse.csgraph import connected_components

        present = np.zeros(self.n, dtype=bool)
        present[self.a[mask]] = present[self.b[mask]] = True
        graph = coo_matrix((np.ones(int(mask.sum()), dtype=np.int8), (self.a[mask], self.b[mask])),
                           shape=(self.n, self.n))
        return connected_components(graph, directed=False)[1], present


def _first_per_group(labels: np.ndarray, members: np.ndarray, keys: list[np.ndarray]
                     ) -> tuple[np.ndarray, np.ndarray]:
    """For each member: the member of its group (``labels``) that sorts first by ``keys`` (most significant
    first), and the group's size."""
    order = members[np.lexsort([k[members] for k in reversed(keys)] + [labels[members]])]
    lab = labels[order]
    start = np.flatnonzero(np.r_[True, lab[1:] != lab[:-1]])
    sizes = np.diff(np.r_[start, len(order)])
    first = np.repeat(order[start], sizes)
    size = np.repeat(sizes, sizes)
    out_first = np.empty(len(order), dtype=np.int64)
    out_size = np.empty(len(order), dtype=np.int64)
    pos = np.searchsorted(members, order)
    out_first[pos], out_size[pos] = first, size
    return out_first, out_size


def _rank(values: pa.Array | pa.Table, sort_keys: list[tuple[str, str]] | None = None) -> np.ndarray:
    """Position of every row in ascending order (strings in byte order = Python's code-point order)."""
    order = (pc.sort_indices(values) if sort_keys is None else pc.sort_indices(values, sort_keys=sort_keys))
    rank = np.empty(len(order), dtype=np.int64)
    rank[order.to_numpy()] = np.arange(len(order), dtype=np.int64)
    return rank


def combine_edges(partials: list[pa.Table], cfg: DedupConfig) -> pa.Table:
    """COMBINED_SCHEMA decisions (one row per group member, keepers with a null reason) from edge tables."""
    partials = [p for p in partials if p.num_rows]
    if not partials:
        return COMBINED_SCHEMA.empty_table()
    edges = pa.concat_tables(partials)
    if pc.any(pc.equal(edges.column("method"), PENDING_METHOD)).as_py():
        raise ValueError("combine() got unconfirmed pHash candidates: confirm them first "
                         "(split_pending / attach_pending / confirm_pending)")
    ends = [edges.select([f"{e}_{c}" for c in NODE_COLS]).rename_columns(list(NODE_COLS)) for e in "ab"]
    both = pa.concat_tables(ends)
    ids = pc.unique(both.column("id"))
    n = len(ids)
    node = both.take(pc.index_in(ids, value_set=both.column("id"))).combine_chunks()  # attributes of first edge
    codes = pc.dictionary_encode(edges.column("method")).combine_chunks()
    names = codes.dictionary.to_pylist()
    graph = _Graph(pc.index_in(edges.column("a_id"), value_set=ids).to_numpy(),
                   pc.index_in(edges.column("b_id"), value_set=ids).to_numpy(),
                   codes.indices.to_numpy(), n)
    del both, ends, edges, codes

    def mask(*methods: str) -> np.ndarray:
        return np.isin(graph.method, [names.index(m) for m in methods if m in names])

    parts = pc.split_pattern(ids, "/", max_splits=1)  # canonical_key: source / key / image_index
    source = pc.list_element(parts, 0)
    key_index = pc.split_pattern(pc.list_element(parts, 1), "/", max_splits=1, reverse=True)
    key, index = pc.list_element(key_index, 0), pc.cast(pc.list_element(key_index, 1), pa.int32())
    del parts, key_index
    id_rank = _rank(ids)

    kind = np.zeros(n, dtype=np.int8)
    group_of = np.full(n, -1, dtype=np.int64)  # the node whose id names the group
    reason = np.full(n, -1, dtype=np.int8)  # index into reason_names; -1: no reason (keeper)
    value = np.zeros(n, dtype=np.float64)
    flag = np.zeros(n, dtype=bool)
    reason_names = ["duplicate_document", *(f"duplicate_{m}" for m in IMAGE_METHODS)]

    dropped_doc_image = np.zeros(n, dtype=bool)  # image rows of documents dropped as duplicates
    doc = mask("document")
    if doc.any():
        labels, present = graph.components(doc)
        members = np.flatnonzero(present)
        keeper, size = _first_per_group(labels, members, [id_rank])
        kind[members], group_of[members], value[members] = _DOCUMENT, keeper, size
        dropped = members[keeper != members]
        reason[dropped] = 0
        prefix = pc.replace_substring_regex(ids, r"/[^/]*$", "")  # the document of an id (drop its index)
        dropped_doc_image = pc.is_in(prefix, value_set=prefix.take(pa.array(dropped))).to_numpy(
            zero_copy_only=False)
    image = mask(*IMAGE_METHODS)
    if image.any():
        per_method = [(i, graph.components(mask(m))) for i, m in enumerate(IMAGE_METHODS) if m in names]
        labels, present = graph.components(image)
        members = np.flatnonzero(present)
        keys = [dropped_doc_image, *keeper_sort_columns(node.column("publishable"), node.column("pixels"),
                                                        node.column("clip_score"), id_rank)]
        keeper, size = _first_per_group(labels, members, keys)
        kind[members], group_of[members], value[members] = _IMAGE, keeper, size
        reason[members] = -1
        drop = keeper != members
        g, k = members[drop], keeper[drop]
        found = np.full(len(g), -1, dtype=np.int8)
        for i, (lab, pres) in per_method:  # the first method connecting the member to its keeper
            hit = (found < 0) & pres[g] & pres[k] & (lab[g] == lab[k])
            found[hit] = i
        for i, (_lab, pres) in per_method:  # else the first method the member has an edge of
            found[(found < 0) & pres[g]] = i
        reason[g] = found + 1
    caption = mask("caption")
    if caption.any():
        labels, present = graph.components(caption)
        members = np.flatnonzero(present)
        sha = node.column("sha256")
        image_key = pc.if_else(pc.fill_null(pc.greater(pc.utf8_length(sha), 0), False), sha, ids)
        image_code = pc.dictionary_encode(image_key).combine_chunks().indices.to_numpy()
        pairs = np.unique(np.stack([labels[members], image_code[members]], axis=1), axis=0)
        group_labels, distinct = np.unique(pairs[:, 0], return_counts=True)
        images = np.zeros(labels.max() + 1, dtype=np.int64)
        images[group_labels] = distinct
        members = members[images[labels[members]] >= cfg.boilerplate_min_images]
        if members.size:
            canonical = _rank(pa.table({"s": source, "k": key, "i": index}),
                              [("s", "ascending"), ("k", "ascending"), ("i", "ascending")])
            first, _size = _first_per_group(labels, members, [canonical])
            is_fresh = kind[members] == _NONE  # not already an image or document decision: a caption one
            fresh = members[is_fresh]
            kind[fresh], group_of[fresh], value[fresh] = _CAPTION, first[is_fresh], images[labels[fresh]]
            flag[members] = True
    return _decision_table(np.flatnonzero(kind != _NONE), ids, id_rank, source, key, index, node, kind,
                           group_of, reason, reason_names, value, flag)


def _decision_table(decided: np.ndarray, ids: pa.Array, id_rank: np.ndarray, source: pa.Array, key: pa.Array,
                    index: pa.Array, node: pa.Table, kind: np.ndarray, group_of: np.ndarray, reason: np.ndarray,
                    reason_names: list[str], value: np.ndarray, flag: np.ndarray) -> pa.Table:
    """The decided nodes in id order, their strings joined by Arrow (no Python object per row)."""
    decided = decided[np.argsort(id_rank[decided], kind="stable")]
    take = pa.array(decided, type=pa.int64())
    named_by = ids.take(pa.array(group_of[decided], type=pa.int64()))
    prefixes = pa.array([None, *(_GROUP_PREFIX[k] for k in (_DOCUMENT, _IMAGE, _CAPTION))], pa.string())
    group = pc.binary_join_element_wise(prefixes.take(pa.array(kind[decided].astype(np.int64))), named_by, "")
    r = reason[decided].astype(np.int64)
    why = pa.array([f"{name}: of " for name in reason_names], pa.string()).take(
        pa.array(np.where(r < 0, 0, r), mask=r < 0))
    return pa.table({
        "source": source.take(take), "key": key.take(take), "image_index": index.take(take),
        "drop_reason": pc.binary_join_element_wise(why, named_by, ""),
        "flag": pa.array([None, BOILERPLATE_FLAG], pa.string()).take(pa.array(flag[decided].astype(np.int64))),
        "group": group, "value": pa.array(value[decided], pa.float64()),
        SHARD_COL: node.column(SHARD_COL).take(take),
    }, schema=COMBINED_SCHEMA)
