"""Decision tables in their canonical form, and an in-process reference of a global stage's decide.

No engine decides through this module: every engine, the local one included, runs a global stage's
decide through ``pipelines.engine.runner.decide_segment`` and its own ``group_apply`` (the local engine
groups with a dict). The engines' decisions are written through ``normalize_decisions``. ``decide_local``
(the single-process decide, per ``group_by`` group) and ``decide_partitioned`` (the scale path,
schemas.stage.PartitionedDecide, in one process) hold every shard's signatures at once: they are the
reference the tests and benchmarks compare the engines' decisions with.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from vila2_curate.schemas.rows import DECISION_SCHEMA
from vila2_curate.schemas.stage import (
    NODE_COL,
    PARTITION_COL,
    SHARD_COL,
    ConfirmsPending,
    FitsOnSample,
    GlobalStage,
    PartitionedDecide,
    node_ids,
)


def empty_decisions() -> pa.Table:
    return DECISION_SCHEMA.empty_table()


def normalize_decisions(table: pa.Table | None) -> pa.Table:
    if table is None or table.num_rows == 0:
        return empty_decisions()
    return table.select(DECISION_SCHEMA.names).cast(DECISION_SCHEMA)


def decide_local(stage: GlobalStage, signatures: pa.Table) -> pa.Table:
    if signatures.num_rows == 0:
        return empty_decisions()
    if stage.group_by is None:
        return normalize_decisions(stage.decide(signatures))
    keys = signatures.column(stage.group_by)
    parts = []
    for value in sorted(pc.unique(keys).to_pylist(), key=lambda v: (v is None, str(v))):
        mask = pc.is_null(keys) if value is None else pc.equal(keys, pa.scalar(value, keys.type))
        parts.append(normalize_decisions(stage.decide(signatures.filter(mask))))
    return pa.concat_tables(parts) if parts else empty_decisions()


def with_shard(signatures: pa.Table, shard: str, index: int | None = None) -> pa.Table:
    """The shard's signatures with the ``shard`` column the partitioned decide needs, and with ``index``
    (the shard's position in the run's shard list) each row's integer ``node`` (both replaced if present)."""
    cols = {SHARD_COL: pa.array([shard] * signatures.num_rows, type=pa.string())}
    if index is not None:
        cols[NODE_COL] = pa.array(node_ids(index, signatures.num_rows), type=pa.int64())
    for name, col in cols.items():
        if name in signatures.column_names:
            signatures = signatures.set_column(signatures.column_names.index(name), name, col)
        else:
            signatures = signatures.append_column(name, col)
    return signatures


def split_by_partition(rows: pa.Table, partitions: int) -> list[tuple[int, pa.Table]]:
    """(p, rows with ``partition % partitions == p``) for every non-empty p: what one map task shuffles."""
    if rows.num_rows == 0:
        return []
    p = np.asarray(rows.column(PARTITION_COL).to_numpy(zero_copy_only=False), dtype=np.int64) % partitions
    order = np.argsort(p, kind="stable")
    sp = p[order]
    starts = np.flatnonzero(np.r_[True, sp[1:] != sp[:-1]])
    ends = np.r_[starts[1:], sp.size]
    return [(int(sp[s]), rows.take(pa.array(order[s:e]))) for s, e in zip(starts, ends, strict=True)]


def fit_sample(stage: object, shard_signatures: Iterable[pa.Table]) -> None:
    """Step 0 of the partitioned decide, for stages that have it (dedup's k-means centroids): every shard's
    ``sample()`` (bounded: the M smallest id hashes) streams into ``fit()``, which keeps the M smallest."""
    if isinstance(stage, FitsOnSample):
        stage.fit(stage.sample(sig) for sig in shard_signatures)


def decide_partitioned(stage: GlobalStage, shard_signatures: Sequence[tuple[str, pa.Table]],
                       partitions: int) -> dict[str, pa.Table]:
    """The partitioned decide of ``stage`` run in this process: shard name -> that shard's decisions.

    Same steps as an engine runs them (schemas.stage.PartitionedDecide): fit on the samples, partition each
    shard, decide each of ``partitions`` groups, confirm pending edges shard by shard (ConfirmsPending),
    combine, hand each shard its own decisions. Engines run the steps on workers; this in-process version
    is the tests' and benchmarks' reference of that path (it holds every shard's signatures, so it is not
    the memory-bounded one). A stage without the partitioned hooks is decided by ``decide_local`` over all
    rows and its decisions split by shard.
    """
    tagged = [(name, with_shard(sig, name, i)) for i, (name, sig) in enumerate(shard_signatures)]
    if not isinstance(stage, PartitionedDecide):
        everything = pa.concat_tables([t for _, t in tagged]) if tagged else None
        decisions = decide_local(stage, everything) if everything is not None else empty_decisions()
        return _split_decisions_by_shard(decisions, tagged)
    fit_sample(stage, (t for _, t in tagged))
    buckets: dict[int, list[pa.Table]] = {}
    for _, sig in tagged:
        for p, rows in split_by_partition(stage.partition(sig), partitions):
            buckets.setdefault(p, []).append(rows)
    partials = [stage.decide_partition(pa.concat_tables(buckets[p])) for p in sorted(buckets)]
    if isinstance(stage, ConfirmsPending):
        partials = confirm_pending_local(stage, partials, tagged)
    combined = stage.combine(partials)
    per_shard = SHARD_COL in combined.column_names
    out: dict[str, pa.Table] = {}
    for name, sig in tagged:
        mine = combined.filter(pc.equal(combined.column(SHARD_COL), name)) if per_shard else combined
        out[name] = normalize_decisions(stage.shard_decisions(mine, sig))
    return out


def split_by_column(table: pa.Table, column: str) -> list[tuple[str, pa.Table]]:
    """(value, rows with that value) per distinct non-null value of a string column, values sorted."""
    if table.num_rows == 0:
        return []
    col = table.column(column)
    return [(v, table.filter(pc.equal(col, v))) for v in sorted(pc.unique(col).drop_null().to_pylist())]


def split_pending(stage: ConfirmsPending, partials: list[pa.Table]) -> tuple[list[pa.Table], pa.Table | None]:
    """Step 2b-a: the partials without pending edges, and all pending edges in one table (None if none)."""
    ready, pending = [], []
    for partial in partials:
        r, q = stage.split_pending(partial)
        ready.append(r)
        if q.num_rows:
            pending.append(q)
    return ready, (pa.concat_tables(pending) if pending else None)


def confirm_pending_local(stage: ConfirmsPending, partials: list[pa.Table],
                          tagged: Sequence[tuple[str, pa.Table]]) -> list[pa.Table]:
    """Step 2b (schemas.stage.ConfirmsPending) in this process, as ``components.ConfirmA``/``ConfirmB`` run
    it on an engine: ready edges, plus the pending ones each confirmed after attaching endpoint a's payload from
    a's shard, then endpoint b's from b's shard. ``tagged``: (shard name, that shard's signatures)."""
    ready, edges = split_pending(stage, partials)
    if edges is None:
        return ready
    sigs = dict(tagged)
    halves: dict[str, list[pa.Table]] = {}
    for name, mine in split_by_column(edges, f"a_{SHARD_COL}"):
        for b_name, half in split_by_column(stage.attach_pending(mine, sigs[name], "a"), f"b_{SHARD_COL}"):
            halves.setdefault(b_name, []).append(half)
    confirmed = [stage.confirm_pending(stage.attach_pending(pa.concat_tables(halves[name]), sigs[name], "b"))
                 for name in sorted(halves)]
    return ready + confirmed


def _split_decisions_by_shard(decisions: pa.Table, tagged: list[tuple[str, pa.Table]]) -> dict[str, pa.Table]:
    owner: dict[tuple[str, str], str] = {}
    for name, sig in tagged:
        for s, k in zip(sig.column("source").to_pylist(), sig.column("key").to_pylist(), strict=True):
            owner.setdefault((s, k), name)
    rows = decisions.to_pylist()
    out = {name: [] for name, _ in tagged}
    for r in rows:
        name = owner.get((r["source"], r["key"]))
        if name is not None:
            out[name].append(r)
    return {name: normalize_decisions(pa.Table.from_pylist(v, schema=DECISION_SCHEMA)) for name, v in out.items()}
