"""Local engine: in-process, shard by shard, with a progress bar. The embedded default and test engine."""

from __future__ import annotations

import logging
import time
from typing import Any

import fsspec
from tqdm import tqdm

from pipelines.progress import finalize, is_done, load_marker, remove_stale_outputs, write_marker
from pipelines.readers import make_reader
from pipelines.shard_task import run_shard
from pipelines.stages import build_stages, stage_versions
from schemas.config import RunConfig

log = logging.getLogger(__name__)


def run_local(config: RunConfig, *, progress: bool = True, max_shards: int | None = None) -> dict[str, Any]:
    """Run every source through the configured stages; returns the merged stats.

    ``max_shards`` stops after that many shards were *processed* (used to simulate an interrupted run).
    """
    fs, root = fsspec.core.url_to_fs(config.output.path, **config.output.storage_options)
    fs.makedirs(root, exist_ok=True)
    stages = build_stages(config)
    for s in stages:
        s.setup()
    versions, chash = stage_versions(stages), config.config_hash()
    work = [(reader, shard) for reader in (make_reader(s) for s in config.sources)
            for shard in reader.list_shards()]

    results = []
    rows = kept = processed = 0
    started = time.perf_counter()
    bar = tqdm(total=len(work), unit="shard", disable=not progress, dynamic_ncols=True)

    def on_batch(n: int, k: int) -> None:
        nonlocal rows, kept
        rows, kept = rows + n, kept + k
        elapsed = max(time.perf_counter() - started, 1e-9)
        bar.set_postfix_str(f"{rows / elapsed:,.0f} rows/s, kept {100 * kept / max(rows, 1):.1f}%")

    for reader, shard in work:
        if is_done(fs, root, shard, chash, versions):
            results.append(load_marker(fs, root, shard))
            bar.update(1)
            continue
        if max_shards is not None and processed >= max_shards:
            bar.close()
            raise InterruptedError(f"stopped after {processed} shards (max_shards)")
        remove_stale_outputs(fs, root, shard)
        result = run_shard(reader, shard, stages, fs, root, config.output, config.batch_size, chash,
                           versions, on_batch=on_batch)
        write_marker(fs, root, result)
        results.append(result)
        processed += 1
        bar.update(1)
    bar.close()
    return finalize(fs, root, config.name, results)
