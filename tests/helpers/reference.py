"""Dedup's single-process combine path: the reference that the combine on the engine is compared with.

The steps of ``runner.decide_signatures`` up to the partials (fit on the samples, partition, one
``decide_partition`` per step-2 group), then, in this one process, the pending pHash candidates confirmed
shard by shard (a's payload, then b's) and ``stage.combine`` over every edge
(``curation/dedup/combine.py``). Production never runs this path: dedup's combine runs on the engine
(``pipelines/engine/components.py``)."""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa
import pyarrow.compute as pc

from vila2_curate.pipelines.engine.aggregate import (
    normalize_decisions,
    split_by_column,
    split_by_partition,
    with_shard,
)
from vila2_curate.schemas.stage import SHARD_COL


def combine_reference(stage, shard_signatures: Sequence[tuple[str, pa.Table]],
                      partitions: int) -> dict[str, pa.Table]:
    """Shard name -> its decisions, by the single-process combine."""
    tagged = [(name, with_shard(sig, name, i)) for i, (name, sig) in enumerate(shard_signatures)]
    stage.fit(stage.sample(sig) for _, sig in tagged)
    buckets: dict[int, list[pa.Table]] = {}
    for _, sig in tagged:
        for p, rows in split_by_partition(stage.partition(sig), partitions):
            buckets.setdefault(p, []).append(rows)
    partials = [stage.decide_partition(pa.concat_tables(buckets[p])) for p in sorted(buckets)]
    combined = stage.combine(confirm_pending(stage, partials, dict(tagged)))
    return {name: normalize_decisions(stage.shard_decisions(
        combined.filter(pc.equal(combined.column(SHARD_COL), name)), sig)) for name, sig in tagged}


def confirm_pending(stage, partials: list[pa.Table], signatures: dict[str, pa.Table]) -> list[pa.Table]:
    """The partials' ready edges, plus their pending ones confirmed after attaching endpoint a's payload
    from a's shard, then endpoint b's from b's shard."""
    ready, pending = [], []
    for partial in partials:
        r, q = stage.split_pending(partial)
        ready.append(r)
        if q.num_rows:
            pending.append(q)
    if not pending:
        return ready
    halves: dict[str, list[pa.Table]] = {}
    for name, mine in split_by_column(pa.concat_tables(pending), f"a_{SHARD_COL}"):
        for b_name, half in split_by_column(stage.attach_pending(mine, signatures[name], "a"), f"b_{SHARD_COL}"):
            halves.setdefault(b_name, []).append(half)
    return ready + [stage.confirm_pending(stage.attach_pending(pa.concat_tables(halves[name]), signatures[name], "b"))
                    for name in sorted(halves)]
