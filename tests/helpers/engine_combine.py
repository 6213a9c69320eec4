"""Dedup's decide with its combine on an engine, over signature shards in a temp run folder, as
``runner.decide_signatures`` runs it; each shard's decisions read back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa

from vila2_curate.pipelines.executors.local import decide_in_process


def engine_decisions(engine, stage, shards: list[tuple[str, pa.Table]], root: Path,
                     partitions: int) -> tuple[pa.Table, dict[str, Any]]:
    """(every shard's decisions, the summary's ``components`` part)."""
    per_shard, extra = decide_in_process(stage, shards, str(root), partitions=partitions, engine=engine)
    return pa.concat_tables(per_shard.values()), extra["components"]
