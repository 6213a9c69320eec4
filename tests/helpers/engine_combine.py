"""Run the partitioned decide with step 3 on an engine (pipelines.engine.components) over signature shards
written to a temp work folder, as ``runner.decide_segment`` does, and read back each shard's decisions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa

from vila2_curate.pipelines.engine.components import combine_on_engine
from vila2_curate.pipelines.engine.runner import (
    LoadSignatures,
    RunContext,
    ShardSignatures,
    WorkItem,
    fit_on_samples,
)
from vila2_curate.pipelines.engine.workdir import read_all_decisions, write_signatures
from vila2_curate.pipelines.io.readers.base import InputShard
from vila2_curate.schemas.config import BeamOptions, RayOptions, RunConfig


def work_items(shards: list[tuple[str, pa.Table]], root: Path) -> tuple[Any, list[WorkItem]]:
    fs = fsspec.filesystem("file")
    items = []
    for i, (name, sig) in enumerate(shards):
        source, shard_id = name.split("/", 1)
        it = WorkItem(i, None, InputShard(source, shard_id, f"in/{i}", "coyo_parquet", "pair"))
        write_signatures(fs, str(root), 0, it.shard, [sig])
        items.append(it)
    return fs, items


def context(fs, root: Path, items: list[WorkItem]) -> RunContext:
    """What the engines' group and per-shard steps read of a run: its folder, shards and engine options."""
    return RunContext(fs, str(root), None, RunConfig.model_construct(beam=BeamOptions(), ray=RayOptions()), items)


def engine_decisions(engine, stage, shards: list[tuple[str, pa.Table]], root: Path,
                     partitions: int) -> tuple[pa.Table, dict[str, Any]]:
    """(every shard's decisions, the summary's ``components`` part)."""
    fs, items = work_items(shards, root)
    ctx = context(fs, root, items)
    if hasattr(stage, "fit"):
        fit_on_samples(engine, ctx, 0, stage)
    _, summary = combine_on_engine(engine, ctx, 0, "h", stage, partitions, ShardSignatures(fs, str(root), 0),
                                   LoadSignatures(fs, str(root), 0, stage, partitions))
    return read_all_decisions(fs, str(root), 0, [it.shard for it in items]), summary["components"]
