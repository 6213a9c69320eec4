"""Dedup's combine split into bounded steps: connected components by rounds of group-bys, then keepers
and reasons per component.

``combine.combine_edges`` (the reference) holds every edge of the dataset in one process. Here no step
sees more than one group's rows:

* Nodes are integers assigned per input shard (``shard index << 32 | row in the shard's signatures``,
  ``schemas.stage.node_ids``), so no table of id strings exists anywhere; a node's attributes stay in its shard.
* Components: the large-star / small-star rounds of Kiveris et al. ("Connected Components in MapReduce
  and Beyond", SoCC 2014), as Spark dedup pipelines run them. Each round is one group-by over edges keyed
  by node (``star_round``); the rounds end when the graph is a forest of stars centred on each
  component's smallest node, which ``star_round`` detects on its input (``violations`` = 0). Chains
  converge in O(log n) rounds; a 100k-member star in one.
  One graph per *layer*: documents, captions, images (all image methods together) and each image method
  alone (the reason a member gets names the first method connecting it to its keeper, as in the
  reference), so one set of rounds computes every component the rules need.
* Keepers: per component, its members joined with their own attributes (``*_members``, built per shard)
  and the rules of ``combine_edges`` applied per group (``decide_*``).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from vila2_curate.curation.dedup.combine import BOILERPLATE_FLAG, IMAGE_METHODS
from vila2_curate.curation.dedup.keeper import keeper_sort_columns
from vila2_curate.curation.dedup.minhash import _fmix64
from vila2_curate.schemas.stage import NODE_SHARD_BITS

ROW_MASK = np.int64((1 << NODE_SHARD_BITS) - 1)
LAYERS = {"document": 0, "caption": 1, "image": 2, "exact": 3, "phash": 4, "semantic": 5}
METHOD_LAYERS = {"document": ("document",), "caption": ("caption",),
                 **{m: ("image", m) for m in IMAGE_METHODS}}
EDGE_LAYER_SCHEMA = pa.schema([pa.field("layer", pa.int8()), pa.field("u", pa.int64()), pa.field("v", pa.int64())])
LABEL_SCHEMA = pa.schema([pa.field("layer", pa.int8()), pa.field("node", pa.int64()), pa.field("root", pa.int64())])
# what a member's decision row carries until its shard writes it (the shard's own DECISION_SCHEMA rows)
MEMBER_DECISION_SCHEMA = pa.schema([
    pa.field("node", pa.int64()), pa.field("source", pa.string()), pa.field("key", pa.string()),
    pa.field("image_index", pa.int32()), pa.field("drop_reason", pa.string()), pa.field("flag", pa.string()),
    pa.field("group", pa.string()), pa.field("value", pa.float64()),
    pa.field("flag_only", pa.bool_()),  # a caption flag for a member an image/document rule decided
])


def shard_of(nodes: np.ndarray) -> np.ndarray:
    return nodes >> np.int64(NODE_SHARD_BITS)


def row_of(nodes: np.ndarray) -> np.ndarray:
    return nodes & ROW_MASK


def mix(*parts: np.ndarray) -> np.ndarray:
    """A well-spread uint64 of integer columns (group keys, bucket choice)."""
    h = np.zeros(len(parts[0]), dtype=np.uint64)
    for p in parts:
        h = _fmix64(h * np.uint64(0x9E3779B97F4A7C15) + p.astype(np.int64).view(np.uint64))
    return h


# ---- edges into layers -----------------------------------------------------------------------------------
def layer_edges(edges: pa.Table) -> pa.Table:
    """Confirmed edges (``combine.EDGE_SCHEMA`` with ``a_node``/``b_node``) as (layer, u, v), u > v, one row
    per layer an edge belongs to (an image edge: the image layer and its method's)."""
    if edges.num_rows == 0:
        return EDGE_LAYER_SCHEMA.empty_table()
    a = edges.column("a_node").to_numpy(zero_copy_only=False)
    b = edges.column("b_node").to_numpy(zero_copy_only=False)
    if np.isnan(a.astype(np.float64)).any() or np.isnan(b.astype(np.float64)).any():
        raise ValueError("edges without node ids: the signatures went through aggregate.with_shard without "
                         "a shard index")
    a, b = a.astype(np.int64), b.astype(np.int64)
    method = edges.column("method")
    parts = []
    for name, layers in METHOD_LAYERS.items():
        m = np.asarray(pc.equal(method, name).to_numpy(zero_copy_only=False), dtype=bool)
        if not m.any():
            continue
        u, v = np.maximum(a[m], b[m]), np.minimum(a[m], b[m])
        keep = u != v
        for layer in layers:
            parts.append(_edge_table(np.full(int(keep.sum()), LAYERS[layer], np.int8), u[keep], v[keep]))
    known = set(METHOD_LAYERS)
    unknown = set(pc.unique(method).to_pylist()) - known
    if unknown:
        raise ValueError(f"edges of unknown methods {sorted(unknown)} (confirm pending edges first)")
    return pa.concat_tables(parts) if parts else EDGE_LAYER_SCHEMA.empty_table()


def _edge_table(layer: np.ndarray, u: np.ndarray, v: np.ndarray) -> pa.Table:
    return pa.table({"layer": pa.array(layer, pa.int8()), "u": pa.array(u, pa.int64()),
                     "v": pa.array(v, pa.int64())}, schema=EDGE_LAYER_SCHEMA)


# ---- components: large-star / small-star --------------------------------------------------------------
def both_directions(edges: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(layer, key, other) with every edge once from each end: what a round groups by (layer, key)."""
    layer = edges.column("layer").to_numpy(zero_copy_only=False).astype(np.int8)
    u = edges.column("u").to_numpy(zero_copy_only=False)
    v = edges.column("v").to_numpy(zero_copy_only=False)
    return np.r_[layer, layer], np.r_[u, v], np.r_[v, u]


def star_round(layer: np.ndarray, key: np.ndarray, other: np.ndarray, large: bool
               ) -> tuple[pa.Table, int]:
    """One round over the neighbourhoods of some nodes (every row of a node's (layer, key) present):
    large-star (each neighbour above the node is linked to the node's neighbourhood minimum) or
    small-star (the node and its neighbours below it are linked to the minimum of those). Returns the
    new edges (u > v) and how many nodes of the *input* break the star-forest shape (a node with a
    neighbour on both sides, or with two below): 0 on every group means the rounds are done and the
    output equals the input."""
    if len(key) == 0:
        return EDGE_LAYER_SCHEMA.empty_table(), 0
    order = np.lexsort((other, key, layer))
    layer, key, other = layer[order], key[order], other[order]
    keep = np.r_[True, (layer[1:] != layer[:-1]) | (key[1:] != key[:-1]) | (other[1:] != other[:-1])]
    keep &= other != key
    layer, key, other = layer[keep], key[keep], other[keep]
    if len(key) == 0:
        return EDGE_LAYER_SCHEMA.empty_table(), 0
    start = np.flatnonzero(np.r_[True, (layer[1:] != layer[:-1]) | (key[1:] != key[:-1])])
    seg = np.repeat(np.arange(len(start)), np.diff(np.r_[start, len(key)]))
    below = other < key
    n_below = np.bincount(seg, weights=below, minlength=len(start))
    n_above = np.bincount(seg, weights=~below, minlength=len(start))
    violations = int(((n_below > 0) & (n_above > 0)).sum() + (n_below > 1).sum())
    first = other[start]  # the smallest neighbour of each node (rows sorted by other inside a node)
    if large:
        m = np.minimum(first, key[start])[seg]
        pick = ~below
        out = _edge_table(layer[pick], other[pick], m[pick])
    else:
        has_below = n_below > 0
        m = first[seg]  # the smallest neighbour, below the node wherever the node has one below
        pick = below & has_below[seg] & (other != m)
        nodes = np.flatnonzero(has_below)
        out = pa.concat_tables([
            _edge_table(layer[pick], other[pick], m[pick]),
            _edge_table(layer[start[nodes]], key[start[nodes]], first[nodes]),
        ])
    return out, violations


def star_labels(edges: pa.Table) -> pa.Table:
    """Labels (layer, node, root) from a star forest's edges (u a leaf, v its root): every leaf, and each
    root labelled with itself; one row per (layer, node)."""
    if edges.num_rows == 0:
        return LABEL_SCHEMA.empty_table()
    layer = edges.column("layer").to_numpy(zero_copy_only=False).astype(np.int8)
    u = edges.column("u").to_numpy(zero_copy_only=False)
    v = edges.column("v").to_numpy(zero_copy_only=False)
    return unique_labels(pa.table({"layer": pa.array(np.r_[layer, layer], pa.int8()),
                                   "node": pa.array(np.r_[u, v], pa.int64()),
                                   "root": pa.array(np.r_[v, v], pa.int64())}, schema=LABEL_SCHEMA))


def unique_labels(labels: pa.Table) -> pa.Table:
    """One row per (layer, node): a root is labelled by every bucket that held one of its leaves."""
    key = np.stack([labels.column("layer").to_numpy(zero_copy_only=False).astype(np.int64),
                    labels.column("node").to_numpy(zero_copy_only=False)], axis=1)
    _, first = np.unique(key, axis=0, return_index=True)
    return labels.take(pa.array(np.sort(first)))


# ---- members of components, per shard -----------------------------------------------------------------
def _ids(sig: pa.Table) -> pa.Array:
    text = sig.schema.field("source").type
    return pc.binary_join_element_wise(sig.column("source"), pc.cast(sig.column("key"), text),
                                       pc.cast(sig.column("image_index"), text), pa.scalar("/", text))


def _layer(labels: pa.Table, name: str) -> pa.Table:
    return labels.filter(pc.equal(labels.column("layer"), LAYERS[name]))


def _with_member_columns(labels: pa.Table, sig: pa.Table, columns: list[str]) -> pa.Table:
    """``labels`` (one layer, nodes of this shard) with the id parts and ``columns`` of each node's row."""
    rows = pa.array(row_of(labels.column("node").to_numpy(zero_copy_only=False)), pa.int64())
    picked = sig.select(["source", "key", "image_index", *columns]).take(rows)
    out = labels.select(["node", "root"])
    out = out.append_column("id", _ids(picked).cast(pa.string()))
    for c in ("source", "key", "image_index", *columns):
        out = out.append_column(c, picked.column(c))
    return out


def document_members(labels: pa.Table, sig: pa.Table) -> pa.Table | None:
    doc = _layer(labels, "document")
    return _with_member_columns(doc, sig, []) if doc.num_rows else None


def image_members(labels: pa.Table, sig: pa.Table, document_decisions: pa.Table | None) -> pa.Table | None:
    """Image-layer members of this shard with their keeper attributes, each method layer's root
    (``root_<method>``, null without an edge of that method) and whether the member's document was
    dropped as a duplicate (documents and their images share a shard)."""
    img = _layer(labels, "image")
    if img.num_rows == 0:
        return None
    out = _with_member_columns(img, sig, ["publishable", "pixels", "clip_score"])
    nodes = out.column("node")
    for m in IMAGE_METHODS:
        lab = _layer(labels, m)
        idx = pc.index_in(nodes, value_set=lab.column("node"))
        out = out.append_column(f"root_{m}", lab.column("root").take(idx))
    dropped = pa.array([], pa.string())
    if document_decisions is not None and document_decisions.num_rows:
        gone = document_decisions.filter(pc.is_valid(document_decisions.column("drop_reason")))
        dropped = pc.binary_join_element_wise(gone.column("source"), gone.column("key"), "/")
    document = pc.binary_join_element_wise(out.column("source"), out.column("key"), "/")
    return out.append_column("dropped_document", pc.is_in(document, value_set=dropped))


def caption_members(labels: pa.Table, sig: pa.Table, decided: pa.Table | None) -> pa.Table | None:
    """Caption-layer members of this shard: the image each shows (sha256, else the id) and whether an
    image or document rule already decided it (``decided``: this shard's decisions so far)."""
    cap = _layer(labels, "caption")
    if cap.num_rows == 0:
        return None
    out = _with_member_columns(cap, sig, ["sha256"])
    has_sha = pc.fill_null(pc.greater(pc.utf8_length(out.column("sha256")), 0), False)
    out = out.append_column("image", pc.if_else(has_sha, out.column("sha256"), out.column("id")))
    already = pa.array([], pa.int64()) if decided is None else decided.column("node")
    return out.append_column("decided", pc.is_in(out.column("node"), value_set=already))


# ---- keepers and reasons per component -----------------------------------------------------------------
def _by_component(members: pa.Table, sort_keys: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(member order, keeper position per ordered member, component size per ordered member): members
    sorted by component then ``sort_keys`` (most significant first); a component's first is its keeper."""
    root = members.column("root").to_numpy(zero_copy_only=False)
    order = np.lexsort([k for k in reversed(sort_keys)] + [root])
    r = root[order]
    start = np.flatnonzero(np.r_[True, r[1:] != r[:-1]])
    sizes = np.diff(np.r_[start, len(order)])
    return order, np.repeat(start, sizes), np.repeat(sizes, sizes)


def _id_rank(ids: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Each id's position in byte order (the reference ranks every id of the dataset the same way; only
    the order inside a component matters)."""
    order = pc.sort_indices(ids).to_numpy()
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order), dtype=np.int64)
    return rank


def _decisions(m: pa.Table, reason: pa.Array, group: pa.Array, value: np.ndarray,
               flag: pa.Array | None = None, flag_only: np.ndarray | None = None) -> pa.Table:
    n = m.num_rows
    return pa.table({
        "node": m.column("node"), "source": m.column("source").cast(pa.string()),
        "key": m.column("key").cast(pa.string()), "image_index": m.column("image_index").cast(pa.int32()),
        "drop_reason": reason, "flag": flag if flag is not None else pa.nulls(n, pa.string()), "group": group,
        "value": pa.array(value, pa.float64()),
        "flag_only": pa.array(flag_only if flag_only is not None else np.zeros(n, dtype=bool)),
    }, schema=MEMBER_DECISION_SCHEMA)


def _keeper_strings(m: pa.Table, keeper_id: pa.Array, is_keeper: np.ndarray, reason_name: pa.Array | str,
                    prefix: str) -> tuple[pa.Array, pa.Array]:
    """(drop_reason, group) strings: ``<reason>: of <keeper id>`` for non-keepers, ``<prefix><keeper id>``."""
    name = pa.scalar(reason_name) if isinstance(reason_name, str) else reason_name
    why = pc.binary_join_element_wise(name, pa.scalar(": of "), keeper_id, "")
    reason = pc.if_else(pa.array(is_keeper), pa.scalar(None, pa.string()), why)
    return reason, pc.binary_join_element_wise(pa.scalar(prefix), keeper_id, "")


def decide_documents(members: pa.Table) -> pa.Table:
    """Each document component keeps its smallest id."""
    ids = members.column("id")
    order, keeper, size = _by_component(members, [_id_rank(ids)])
    m = members.take(pa.array(order))
    keeper_id = m.column("id").take(pa.array(keeper))
    reason, group = _keeper_strings(m, keeper_id, np.arange(len(order)) == keeper, "duplicate_document",
                                    "document:")
    return _decisions(m, reason, group, size.astype(np.float64))


def decide_images(members: pa.Table) -> pa.Table:
    """Each image component keeps ``keeper.keeper_sort_key``'s minimum (images of dropped documents
    last); a dropped member's reason is the first method connecting it to its keeper, else the first
    method it has an edge of."""
    keys = [members.column("dropped_document").to_numpy(zero_copy_only=False),
            *keeper_sort_columns(members.column("publishable"), members.column("pixels"),
                                 members.column("clip_score"), _id_rank(members.column("id")))]
    order, keeper, size = _by_component(members, keys)
    m = members.take(pa.array(order))
    n = m.num_rows
    take = pa.array(keeper)
    found = np.full(n, -1, dtype=np.int8)
    has = {}
    for i, meth in enumerate(IMAGE_METHODS):
        mine = m.column(f"root_{meth}")
        has[i] = np.asarray(pc.is_valid(mine).to_numpy(zero_copy_only=False), dtype=bool)
        same = np.asarray(pc.fill_null(pc.equal(mine, mine.take(take)), False).to_numpy(zero_copy_only=False),
                          dtype=bool)
        found[(found < 0) & same] = i
    for i in range(len(IMAGE_METHODS)):
        found[(found < 0) & has[i]] = i
    names = pa.array([f"duplicate_{meth}" for meth in IMAGE_METHODS], pa.string()).take(
        pa.array(np.maximum(found, 0).astype(np.int64)))
    keeper_id = m.column("id").take(take)
    reason, group = _keeper_strings(m, keeper_id, np.arange(n) == keeper, names, "image:")
    return _decisions(m, reason, group, size.astype(np.float64))


def decide_captions(members: pa.Table, min_images: int) -> pa.Table:
    """Caption components showing at least ``min_images`` distinct images flag every member; members no
    other rule decided get a ``caption:<first id>`` group (first in source, key, image_index order)."""
    order, first, _size = _by_component(members, [
        _rank_table(members.select(["source", "key", "image_index"]))])
    m = members.take(pa.array(order))
    root = m.column("root").to_numpy(zero_copy_only=False)
    image_code = pc.dictionary_encode(m.column("image")).combine_chunks().indices.to_numpy()
    start = np.flatnonzero(np.r_[True, root[1:] != root[:-1]])
    comp = np.repeat(np.arange(len(start)), np.diff(np.r_[start, len(root)]))
    distinct_pairs = np.unique(np.stack([comp, image_code.astype(np.int64)], axis=1), axis=0)
    distinct = np.bincount(distinct_pairs[:, 0], minlength=len(start))[comp]
    flagged = np.flatnonzero(distinct >= min_images)
    if flagged.size == 0:
        return MEMBER_DECISION_SCHEMA.empty_table()
    m_f = m.take(pa.array(flagged))
    first_id = m.column("id").take(pa.array(first[flagged]))
    decided = np.asarray(m_f.column("decided").to_numpy(zero_copy_only=False), dtype=bool)
    group = pc.binary_join_element_wise(pa.scalar("caption:"), first_id, "")
    return _decisions(m_f, pa.nulls(len(flagged), pa.string()), group, distinct[flagged].astype(np.float64),
                      flag=pa.array([BOILERPLATE_FLAG] * len(flagged), pa.string()), flag_only=decided)


def _rank_table(tbl: pa.Table) -> np.ndarray:
    order = pc.sort_indices(tbl, sort_keys=[(c, "ascending") for c in tbl.column_names]).to_numpy()
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order), dtype=np.int64)
    return rank


def shard_decisions(parts: list[pa.Table]) -> pa.Table:
    """One shard's decision rows from its members' decisions of every phase: caption flags set on the
    rows an image or document rule made; columns as DECISION_SCHEMA's (plus ``node``)."""
    parts = [p for p in parts if p.num_rows]
    if not parts:
        return MEMBER_DECISION_SCHEMA.empty_table()
    rows = pa.concat_tables(parts)
    flag_only = rows.column("flag_only")
    flags = rows.filter(flag_only)
    rows = rows.filter(pc.invert(flag_only))
    if flags.num_rows:
        hit = pc.is_in(rows.column("node"), value_set=flags.column("node"))
        rows = rows.set_column(rows.schema.get_field_index("flag"), "flag",
                               pc.if_else(hit, pa.scalar(BOILERPLATE_FLAG), rows.column("flag")))
    return rows
