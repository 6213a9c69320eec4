"""Process one input shard end to end: read -> stages -> sink -> result. Engine-independent."""

from __future__ import annotations

import time
from collections.abc import Callable

from pipelines.guard import apply_guarded
from pipelines.progress import ShardResult
from pipelines.readers.base import InputShard, Reader
from pipelines.sink import ShardSink
from schemas.config import OutputConfig
from schemas.stage import Stage


def run_shard(reader: Reader, shard: InputShard, stages: list[Stage], fs, root: str, out: OutputConfig,
              batch_size: int, config_hash: str, versions: dict[str, str],
              on_batch: Callable[[int, int], None] | None = None) -> ShardResult:
    """Stream one shard through the stages into its sink; ``on_batch(rows, kept)`` reports progress."""
    sink = ShardSink(fs, root, out, shard)
    timings: dict[str, dict[str, float]] = {s.name: {"rows": 0, "seconds": 0.0} for s in stages}
    timings["read"] = {"rows": 0, "seconds": 0.0}
    timings["write"] = {"rows": 0, "seconds": 0.0}
    t0 = time.perf_counter()
    for batch in reader.read(shard, batch_size):
        t1 = time.perf_counter()
        _add(timings["read"], batch.num_rows, t1 - t0)
        for stage in stages:
            t = time.perf_counter()
            batch = apply_guarded(stage, batch)
            _add(timings[stage.name], batch.num_rows, time.perf_counter() - t)
        t = time.perf_counter()
        kept_before = sink.stats.kept
        sink.write(batch)
        _add(timings["write"], batch.num_rows, time.perf_counter() - t)
        if on_batch:
            on_batch(batch.num_rows, sink.stats.kept - kept_before)
        t0 = time.perf_counter()
    t = time.perf_counter()
    stats, files = sink.close()
    _add(timings["write"], 0, time.perf_counter() - t)
    return ShardResult(shard=shard, stats=stats, files=files, config_hash=config_hash,
                       stage_versions=versions, timings=timings)


def _add(acc: dict[str, float], rows: int, seconds: float) -> None:
    acc["rows"] += rows
    acc["seconds"] += seconds
