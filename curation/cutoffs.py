"""Per-subset cut-offs (clip_filter top p%, DeltaLoss top K) on the partitioned decide (PartitionedDecide).

Two methods, chosen in the stage's config:

* ``exact``: every subset is one group (``partition`` = a hash of the subset name) holding only the
  projection the ranking needs (scores, ids, shard: about 100 bytes a row); ``decide_partition`` runs the
  stage's own single-process ``decide`` on it, so decisions are identical to the reference. Memory: the
  largest subset on its worker, and the drop decisions (one ~150-byte row per dropped row) in the combine
  step, which hands each shard its own.
* ``sketch``: each input shard sends one Apache DataSketches KLL sketch per subset (``partition``), the
  group merges them (``decide_partition``, ``combine``: one sketch per subset, a few KiB), and each shard
  applies the cut to its own rows (``shard_decisions``). Memory is bounded by the number of subsets, not
  rows. The cut is the KLL quantile at the keep rank: with k = 200 the normalised rank error is about
  1.3% (``RANK_ERROR``), i.e. a row within that rank distance of the cut may land on either side, and
  ties at the cut are all kept. Below 200 rows per subset the sketch holds every value and is exact.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from vila2_curate.schemas.rows import DECISION_SCHEMA
from vila2_curate.schemas.stage import PARTITION_COL, SHARD_COL

SKETCH_K = 200  # DataSketches' default: ~1.3% normalised rank error (99% confidence)
COMBINED_EXACT_SCHEMA = DECISION_SCHEMA.append(pa.field(SHARD_COL, pa.string()))
SKETCH_SCHEMA = pa.schema([pa.field(PARTITION_COL, pa.int64()), pa.field("group", pa.string()),
                           pa.field("rows", pa.int64()), pa.field("sketch", pa.binary())])


def rank_error(k: int = SKETCH_K) -> float:
    from datasketches import kll_doubles_sketch

    return float(kll_doubles_sketch.get_normalized_rank_error(k, False))


def require_datasketches() -> None:
    try:
        import datasketches  # noqa: F401
    except ImportError as e:  # pragma: no cover - a dependency; guards a broken install with a clear message
        raise ImportError("method 'sketch' needs Apache DataSketches: pip install datasketches") from e


def group_partition(groups: list[str]) -> np.ndarray:
    """Non-negative int64 partition key of each subset name (blake2b: stable across processes)."""
    return np.fromiter((int.from_bytes(hashlib.blake2b(g.encode(), digest_size=8).digest(), "little") >> 1
                        for g in groups), dtype=np.int64, count=len(groups))


# ---- exact ------------------------------------------------------------------------------------------------
def exact_partition(signatures: pa.Table, group_col: str) -> pa.Table:
    keys = group_partition(signatures.column(group_col).to_pylist())
    return signatures.append_column(PARTITION_COL, pa.array(keys, type=pa.int64()))


def exact_decide_partition(rows: pa.Table, decide: Callable[[pa.Table], pa.Table],
                           group_col: str) -> pa.Table:
    """The reference ``decide`` per subset of this group, each decision with the shard of its row."""
    out = []
    groups = rows.column(group_col)
    for g in sorted(set(groups.to_pylist()), key=lambda v: (v is None, str(v))):
        sub = rows.filter(pc.is_null(groups) if g is None else pc.equal(groups, g))
        decided = decide(sub.drop_columns([PARTITION_COL]))
        if decided.num_rows == 0:
            continue
        shard = {(s, k, i): sh for s, k, i, sh in zip(*(sub.column(c).to_pylist() for c in (
            "source", "key", "image_index", SHARD_COL)), strict=True)}
        owners = [shard[(s, k, -1 if i is None else i)] for s, k, i in zip(*(decided.column(c).to_pylist() for c in (
            "source", "key", "image_index")), strict=True)]
        out.append(decided.select(DECISION_SCHEMA.names).cast(DECISION_SCHEMA)
                   .append_column(SHARD_COL, pa.array(owners, type=pa.string())))
    return pa.concat_tables(out) if out else COMBINED_EXACT_SCHEMA.empty_table()


def concat_partials(partials: list[pa.Table], schema: pa.Schema) -> pa.Table:
    partials = [p.select(schema.names).cast(schema) for p in partials if p.num_rows]
    return pa.concat_tables(partials) if partials else schema.empty_table()


# ---- the stage's side, shared by clip_filter and deltaloss ----------------------------------------------------
class CutoffDecide:
    """Mixin: a stage's ``decide_partition`` and ``combine`` for both methods. The stage's ``group_by`` is
    its subset column; it has ``cfg.method`` and the single-process ``decide``."""

    group_by: str | None
    cfg: Any
    decide: Callable[[pa.Table], pa.Table]

    def decide_partition(self, rows: pa.Table) -> pa.Table:
        """The reference ``decide`` per subset (exact) or the merged sketches."""
        if self.cfg.method == "exact":
            return exact_decide_partition(rows, self.decide, str(self.group_by))
        return merge_sketches([rows])

    def combine(self, partials: list[pa.Table]) -> pa.Table:
        """Every group's drop decisions (exact) or one merged sketch a subset."""
        if self.cfg.method == "exact":
            return concat_partials(partials, COMBINED_EXACT_SCHEMA)
        return merge_sketches([p for p in partials if p.num_rows])


def sketch_groups(combined: pa.Table) -> dict[str, tuple[int, bytes]]:
    """Subset -> (rows counted, merged sketch) of a sketch ``combine`` result, for ``shard_decisions``."""
    return {g: (n, blob) for g, n, blob in zip(*(combined.column(c).to_pylist()
                                                 for c in ("group", "rows", "sketch")), strict=True)}


def method_summary(method: str) -> dict[str, Any]:
    """The method block of a stage's summary (the sketch and its rank error when ``method`` is sketch)."""
    out: dict[str, Any] = {"method": method}
    if method == "sketch":
        out.update({"sketch": "datasketches KLL", "sketch_k": SKETCH_K,
                    "normalized_rank_error": round(rank_error(), 5)})
    return out


# ---- sketch -----------------------------------------------------------------------------------------------
def sketch_partition(groups: list[str], values: list[float | None]) -> pa.Table:
    """One row per subset of this shard: rows counted (``n`` of the rule) and a KLL sketch of the values
    that are ranked (None: counted but not ranked, e.g. below the floor)."""
    from datasketches import kll_doubles_sketch

    per: dict[str, tuple[int, list[float]]] = {}
    for g, v in zip(groups, values, strict=True):
        n, vals = per.setdefault(g, (0, []))
        if v is not None:
            vals.append(v)
        per[g] = (n + 1, vals)
    rows = []
    for g in sorted(per):
        n, vals = per[g]
        sk = kll_doubles_sketch(SKETCH_K)
        if vals:
            sk.update(np.asarray(vals, dtype=np.float64))
        rows.append({"group": g, "rows": n, "sketch": sk.serialize()})
    keys = group_partition([r["group"] for r in rows])
    for r, k in zip(rows, keys, strict=True):
        r[PARTITION_COL] = int(k)
    return pa.Table.from_pylist(rows, schema=SKETCH_SCHEMA)


def merge_sketches(tables: list[pa.Table]) -> pa.Table:
    """Subset -> merged (rows, sketch); used per group and again in combine (merging is associative)."""
    from datasketches import kll_doubles_sketch

    merged: dict[str, tuple[int, Any]] = {}
    for t in tables:
        for g, n, blob, p in zip(*(t.column(c).to_pylist() for c in ("group", "rows", "sketch", PARTITION_COL)),
                                 strict=True):
            sk = kll_doubles_sketch.deserialize(blob)
            if g in merged:
                m, acc, _ = merged[g]
                acc.merge(sk)
                merged[g] = (m + n, acc, p)
            else:
                merged[g] = (n, sk, p)
    rows = [{PARTITION_COL: p, "group": g, "rows": n, "sketch": sk.serialize()}
            for g, (n, sk, p) in sorted(merged.items())]
    return pa.Table.from_pylist(rows, schema=SKETCH_SCHEMA)


def top_k_cut(blob: bytes, k: int) -> float | None:
    """The k-th largest ranked value by the sketch (None: k covers every ranked value, nothing is cut)."""
    from datasketches import kll_doubles_sketch

    sk = kll_doubles_sketch.deserialize(blob)
    m = sk.n
    if k >= m or m == 0:
        return None
    if k <= 0:
        return float("inf")
    return float(sk.get_quantile((m - k + 1) / m, True))
