"""The local engine's aggregation for global stages: group signatures with a dict, decide per group.

Ray and Beam do the same grouping with their own primitives; all three call the stage's ``decide`` on
the same groups, and ``decide`` is order-independent, so all engines reach the same decisions.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from schemas.rows import DECISION_SCHEMA
from schemas.stage import GlobalStage


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
