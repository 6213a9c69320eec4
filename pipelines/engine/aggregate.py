"""Decision tables in their canonical form, the table splits every engine's grouping uses, and the
single-process reference decide.

Every engine, the local one included, runs a global stage's decide through
``pipelines.engine.runner.decide_signatures`` and its own ``group_apply``; ``executors.local.decide_in_process``
runs those same steps in this process over given signature tables. ``decide_local`` is the oracle they
are compared with: the stage's own ``decide`` over all rows of each ``group_by`` group.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from vila2_curate.schemas.rows import DECISION_SCHEMA
from vila2_curate.schemas.stage import NODE_COL, PARTITION_COL, SHARD_COL, GlobalStage, node_ids


def empty_decisions() -> pa.Table:
    return DECISION_SCHEMA.empty_table()


def normalize_decisions(table: pa.Table | None) -> pa.Table:
    if table is None or table.num_rows == 0:
        return empty_decisions()
    return table.select(DECISION_SCHEMA.names).cast(DECISION_SCHEMA)


def group_order(values: Iterable[Any]) -> list[Any]:
    """Group values in the one order every engine hands groups out in (nulls last)."""
    return sorted(values, key=lambda v: (v is None, str(v)))


def split_by_key(table: pa.Table, key: str | None) -> list[tuple[Any, pa.Table]]:
    """(value, rows) per distinct value of ``key`` (nulls are one group, last), values in a fixed order;
    one group when key is None."""
    if key is None:
        return [(None, table)]
    keys = table.column(key)
    if pa.types.is_integer(keys.type) and keys.null_count == 0:  # one sort, not one pass per value: the
        parts = dict(split_by_values(table, keys.to_numpy()))  # step-2 group count grows with the data
        return [(v, parts[v]) for v in group_order(parts)]
    out = []
    for value in group_order(pc.unique(keys).to_pylist()):
        mask = pc.is_null(keys) if value is None else pc.equal(keys, pa.scalar(value, keys.type))
        out.append((value, table.filter(mask)))
    return out


def decide_local(stage: GlobalStage, signatures: pa.Table) -> pa.Table:
    """The reference: ``stage.decide`` over every row of each ``group_by`` group, in this process."""
    if signatures.num_rows == 0:
        return empty_decisions()
    parts = [normalize_decisions(stage.decide(group)) for _, group in split_by_key(signatures, stage.group_by)]
    return pa.concat_tables(parts) if parts else empty_decisions()


def shard_label(shard: Any) -> str:
    """An input shard's label in the signatures' shard column and in reports: ``<source>/<shard_id>``."""
    return f"{shard.source}/{shard.shard_id}"


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


def split_by_values(table: pa.Table, values: np.ndarray) -> list[tuple[int, pa.Table]]:
    """(v, the rows whose ``values`` entry is v, in table order) for every distinct integer v, ascending:
    one stable sort and one take per value."""
    if table.num_rows == 0:
        return []
    order = np.argsort(values, kind="stable")
    sv = values[order]
    starts = np.flatnonzero(np.r_[True, sv[1:] != sv[:-1]])
    ends = np.r_[starts[1:], sv.size]
    return [(int(sv[s]), table.take(pa.array(order[s:e]))) for s, e in zip(starts, ends, strict=True)]


def split_by_partition(rows: pa.Table, partitions: int) -> list[tuple[int, pa.Table]]:
    """(p, rows with ``partition % partitions == p``) for every non-empty p: what one map task shuffles."""
    if rows.num_rows == 0:
        return []
    p = np.asarray(rows.column(PARTITION_COL).to_numpy(zero_copy_only=False), dtype=np.int64) % partitions
    return split_by_values(rows, p)


def split_by_column(table: pa.Table, column: str) -> list[tuple[str, pa.Table]]:
    """(value, rows with that value) per distinct non-null value of a string column, values sorted."""
    if table.num_rows == 0:
        return []
    col = table.column(column)
    return [(v, table.filter(pc.equal(col, v))) for v in sorted(pc.unique(col).drop_null().to_pylist())]
