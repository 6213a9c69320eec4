"""Run a stage on a batch so that one bad sample cannot fail the batch, the shard or the run.

If the stage raises on a batch, the batch is split in halves and retried until the failing rows are
isolated; those rows are quarantined with the exception as the reason and the rest go on.
"""

from __future__ import annotations

import logging

import pyarrow as pa

from vila2_curate.schemas.stage import Stage
from vila2_curate.schemas.table_ops import replace_columns

log = logging.getLogger(__name__)


def apply_guarded(stage: Stage, batch: pa.Table) -> pa.Table:
    try:
        out = stage(batch)
    except Exception as e:  # noqa: BLE001 - any stage failure is isolated to the rows that cause it
        if batch.num_rows <= 1:
            return _quarantine(batch, stage.name, e)
        mid = batch.num_rows // 2
        return pa.concat_tables([apply_guarded(stage, batch.slice(0, mid)),
                                 apply_guarded(stage, batch.slice(mid))])
    if out.num_rows != batch.num_rows:
        raise RuntimeError(f"stage {stage.name} changed the row count ({batch.num_rows} -> {out.num_rows})")
    return out


def _quarantine(row: pa.Table, stage: str, exc: Exception) -> pa.Table:
    log.warning("stage %s failed on key %s: %r", stage, row.column("key")[0].as_py(), exc)
    if row.column("drop_reason")[0].as_py() is not None:
        return row
    return replace_columns(row, {
        "drop_reason": [f"stage_error: {type(exc).__name__}: {str(exc)[:200]}"],
        "drop_stage": [stage],
        "quarantined": [True],
    })
