"""Local engine: in-process, shard by shard, segment by segment, with a progress bar.

The embedded default and the test engine. Resumable at shard granularity within each segment.
"""

from __future__ import annotations

import json
import logging
import posixpath
import time
from typing import Any

import fsspec
from tqdm import tqdm

from curation.decisions import index_decisions
from pipelines.aggregate import decide_local
from pipelines.plan import Plan, build_plan, set_run_started_at
from pipelines.progress import (
    finalize,
    is_done,
    load_marker,
    remove_stale_outputs,
    run_started_at,
    write_marker,
)
from pipelines.readers import make_reader
from pipelines.readers.base import InputShard, Reader
from pipelines.shard_task import merge_timings, run_shard_segment
from pipelines.workdir import read_decisions, read_done, read_signatures, seg_dir, write_decisions
from pipelines.writers.atomic import is_temp_name, write_json_atomic
from schemas.config import RunConfig

log = logging.getLogger(__name__)


class _Progress:
    """One bar per segment: shards done (for the ETA) plus rows/s and kept % in the postfix."""

    def __init__(self, total: int, desc: str, enabled: bool) -> None:
        self.bar = tqdm(total=total, unit="shard", desc=desc, disable=not enabled, dynamic_ncols=True)
        self.rows = self.kept = 0
        self.started = time.perf_counter()

    def on_batch(self, n: int, k: int) -> None:
        self.rows, self.kept = self.rows + n, self.kept + k
        rate = self.rows / max(time.perf_counter() - self.started, 1e-9)
        self.bar.set_postfix_str(f"{rate:,.0f} rows/s" + (f", kept {100 * self.kept / self.rows:.1f}%"
                                                          if self.kept else ""))


def list_work(config: RunConfig) -> list[tuple[Reader, InputShard]]:
    return [(reader, shard) for reader in (make_reader(s) for s in config.sources)
            for shard in reader.list_shards()]


def prepare_run(config: RunConfig, plan: Plan | None = None):
    """What every engine does first: open the output, build the plan, list the input shards, and fix
    the run's start time. Returns (fs, root, plan, work)."""
    fs, root = fsspec.core.url_to_fs(config.output.path, **config.output.storage_options)
    fs.makedirs(root, exist_ok=True)
    remove_temp_files(fs, root)
    plan = plan or build_plan(config)
    work = list_work(config)
    plan.set_inputs([shard.path for _, shard in work])
    set_run_started_at(plan, run_started_at(fs, root, plan.plan_hash))
    return fs, root, plan, work


def remove_temp_files(fs, root: str) -> int:
    """Delete temporary files a killed or failed run left (one run per output directory at a time)."""
    removed = 0
    for path in fs.find(root):
        if is_temp_name(path):
            fs.rm(path)
            removed += 1
    if removed:
        log.info("removed %d temporary files left by an interrupted run", removed)
    return removed


def run_local(config: RunConfig, *, progress: bool = True, max_shards: int | None = None,
              plan: Plan | None = None) -> dict[str, Any]:
    """Run every source through the plan; returns the merged stats.

    ``max_shards`` stops (InterruptedError) once that many shard-segments were processed: a test hook
    that simulates an interrupted run at a deterministic point. ``plan``: a prepared plan (default: the
    config's).
    """
    fs, root, plan, work = prepare_run(config, plan)
    budget = [max_shards]
    for segment in plan.segments:
        for stage in segment.stages:
            stage.setup()
    results = []
    for segment in plan.segments:
        prev = _previous_decisions(fs, root, plan, segment.index)
        if segment.decide is None:
            results = _final_segment(fs, root, plan, config, work, prev, progress, budget)
        else:
            _decision_segment(fs, root, plan, segment, config, work, prev, progress, budget)
    return finalize(fs, root, config.name, results, plan_summaries(fs, root, plan), run_info(plan, config))


def _spend(budget: list[int | None]) -> None:
    if budget[0] is not None:
        if budget[0] <= 0:
            raise InterruptedError("stopped by max_shards")
        budget[0] -= 1


def _previous_decisions(fs, root: str, plan: Plan, index: int):
    if index == 0:
        return None
    table = read_decisions(fs, root, index - 1, plan.segment_hash(index - 1))
    if table is None:
        raise RuntimeError(f"decisions of segment {index - 1} are missing")
    return index_decisions(table)


def _decision_segment(fs, root: str, plan: Plan, segment, config: RunConfig, work, prev, progress: bool,
                      budget: list[int | None]) -> None:
    """Map every shard, then aggregate the signatures and write the segment's decisions."""
    seg_hash = plan.segment_hash(segment.index)
    if read_decisions(fs, root, segment.index, seg_hash) is not None:
        return
    bar = _Progress(len(work), f"segment {segment.index} -> {segment.decide.name}", progress)
    for reader, shard in work:
        done = read_done(fs, root, segment.index, shard)
        if not (done and done.get("segment_hash") == seg_hash):
            _spend(budget)
            run_shard_segment(fs, root, plan, segment, reader, shard, config.output, config.batch_size, prev,
                              on_batch=bar.on_batch)
        bar.bar.update(1)
    bar.bar.close()
    signatures = read_signatures(fs, root, segment.index, [s for _, s in work])
    t = time.perf_counter()
    decisions = decide_local(segment.decide, signatures)
    log.info("%s decided over %d signatures in %.2fs", segment.decide.name, signatures.num_rows,
             time.perf_counter() - t)
    write_segment_summary(fs, root, segment, decisions, signatures)
    write_decisions(fs, root, segment.index, decisions, seg_hash)


def write_segment_summary(fs, root: str, segment, decisions, signatures) -> None:
    summarize = getattr(segment.decide, "summarize", None)
    summary = summarize(decisions, signatures) if summarize else {}
    summary = {"stage": segment.decide.name, "signatures": signatures.num_rows,
               "decisions": decisions.num_rows, **summary}
    write_json_atomic(fs, posixpath.join(seg_dir(root, segment.index), "summary.json"), summary)


def run_info(plan: Plan, config: RunConfig) -> dict[str, Any]:
    """What the report needs beside the timings: stage order, each stage's declared resources."""
    stages = [{"name": s.name, "version": s.version, "segment": seg.index,
               "global": s is seg.decide, "cpus": s.resources.cpus, "gpus": s.resources.gpus}
              for seg in plan.segments for s in seg.stages]
    return {"run": {"name": config.name, "engine": config.engine, "config_hash": plan.config_hash,
                    "plan_hash": plan.plan_hash, "stages": stages}}


def plan_summaries(fs, root: str, plan: Plan) -> dict[str, Any]:
    out = {}
    for segment in plan.segments:
        path = posixpath.join(seg_dir(root, segment.index), "summary.json")
        if segment.decide is not None and fs.exists(path):
            with fs.open(path, "rb") as f:
                out[segment.decide.name] = json.load(f)
    return out


def _final_segment(fs, root: str, plan: Plan, config: RunConfig, work, prev, progress: bool,
                   budget: list[int | None]) -> list:
    segment = plan.segments[-1]
    bar = _Progress(len(work), "write", progress)
    results = []
    for reader, shard in work:
        if is_done(fs, root, shard, plan.plan_hash):
            results.append(load_marker(fs, root, shard))
            bar.bar.update(1)
            continue
        _spend(budget)
        remove_stale_outputs(fs, root, shard)
        result = run_shard_segment(fs, root, plan, segment, reader, shard, config.output, config.batch_size,
                                   prev, on_batch=bar.on_batch)
        earlier = [(read_done(fs, root, s.index, shard) or {}).get("timings") for s in plan.segments[:-1]]
        result.timings = merge_timings([*earlier, result.timings])
        result.plan_hash = plan.plan_hash
        write_marker(fs, root, result)
        results.append(result)
        bar.bar.update(1)
    bar.bar.close()
    return results
