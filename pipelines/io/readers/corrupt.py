"""Damaged parquet files: a corrupt page costs its row group, not the shard or the run.

pyarrow raises (OSError "Couldn't deserialize thrift", ArrowInvalid) from ``iter_batches`` at the first bad
page and the iterator is dead after that. Reading row group by row group keeps every row group before and
after a bad one; the unreadable part becomes one quarantined ``parquet_corrupt`` row that records how many
rows the footer says were lost (like ``tar_truncated`` / ``jsonl_truncated`` for a cut stream). One row, not
one per lost row: a hostile footer could claim any row count.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

CORRUPT_REASON = "parquet_corrupt"


@dataclass(frozen=True)
class LostRows:
    """Marker yielded in place of the unreadable rest of a row group."""

    row_group: int
    rows_read: int  # rows of this row group read before the damage
    rows_lost: int  # what the footer says was left in it
    error: str


def parquet_batches(pf: pq.ParquetFile, batch_size: int) -> Iterator[pa.RecordBatch | LostRows]:
    """``pf.iter_batches`` row group by row group, with a LostRows marker where a row group breaks."""
    for rg in range(pf.num_row_groups):
        expected = pf.metadata.row_group(rg).num_rows
        read = 0
        batches = pf.iter_batches(batch_size=batch_size, row_groups=[rg])
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                break
            except (OSError, pa.ArrowException, ValueError) as e:  # ValueError: undecodable metadata
                msg = f"{type(e).__name__}: {' '.join(str(e).split())}"[:200]
                yield LostRows(rg, read, max(expected - read, 0), msg)
                break
            read += batch.num_rows
            yield batch


def lost_rows_row(shard: Any, keys: Any, lost: LostRows) -> dict[str, Any]:
    """The quarantined row that stands for a LostRows marker (``keys``: the reader's KeyRegistry)."""
    key, source_key, _ = keys.claim(f"{shard.shard_id}_rg{lost.row_group:05d}_corrupt")
    meta = {"row_group": lost.row_group, "rows_read": lost.rows_read, "rows_lost": lost.rows_lost,
            "error": lost.error}
    return {"key": key, "source": shard.source, "shard": shard.shard_id, "source_key": source_key,
            "meta": json.dumps(meta, sort_keys=True), "drop_reason": CORRUPT_REASON, "drop_stage": "read",
            "quarantined": True}
