"""How many step-2 groups a partitioned decide forms: never fewer than the engine's own count, and enough
that one group's partition rows stay near a byte target.

A group's memory is its partition rows, and their size per input row differs by stage and by method: a
caption becomes 14 LSH band rows of 128 MinHash values each (~9 KB of partition rows per caption), an
image under exact + pHash about 0.5 KB. A count chosen for one is several times too few for the other,
so the count follows the bytes, measured on the partition rows of a few shards' first rows.
"""

from __future__ import annotations

import math
from typing import Any

import pyarrow as pa

from vila2_curate.pipelines.engine import aggregate
from vila2_curate.pipelines.engine.workdir import signatures_path
from vila2_curate.pipelines.io.parquet_read import open_parquet
from vila2_curate.schemas.config import DEFAULT_DECIDE_GROUP_MB

SAMPLE_SHARDS = 8
SAMPLE_ROWS = 2_048


def partition_bytes(fs, root: str, seg: int, stage: Any, items: list) -> dict[str, float]:
    """Estimated signature rows of the segment and partition bytes per signature row, from the first
    ``SAMPLE_ROWS`` rows of up to ``SAMPLE_SHARDS`` shards spread over the list (a fixed cost whatever the
    dataset's size; the row count is their mean times the shard count)."""
    step = max(1, len(items) // SAMPLE_SHARDS)
    rows = sampled = part_bytes = 0
    shards_seen = 0
    for item in items[::step][:SAMPLE_SHARDS]:
        path = signatures_path(root, seg, item.shard)
        if not fs.exists(path):
            continue
        with open_parquet(fs, path) as pf:
            shards_seen += 1
            rows += pf.metadata.num_rows
            if pf.metadata.num_rows == 0 or pf.metadata.num_columns == 0:
                continue
            head = pa.Table.from_batches([next(pf.iter_batches(batch_size=SAMPLE_ROWS, use_threads=False))])
        part_bytes += stage.partition(aggregate.with_shard(head, aggregate.shard_label(item.shard), item.index)).nbytes
        sampled += head.num_rows
    est_rows = rows / shards_seen * len(items) if shards_seen else 0.0
    return {"signature_rows": round(est_rows), "bytes_per_row": part_bytes / sampled if sampled else 0.0}


def decide_group_count(minimum: int, estimate: dict[str, float], group_mb: float = DEFAULT_DECIDE_GROUP_MB) -> int:
    """At least ``minimum`` groups, more when the estimated partition bytes exceed ``group_mb`` a group."""
    total = estimate["signature_rows"] * estimate["bytes_per_row"]
    return max(1, int(minimum), math.ceil(total / (group_mb * 2**20)))
