"""Completion markers and the dataset-level files built from them.

Each finished input shard leaves ``_progress/<source>/<shard_id>.json`` (written last, atomically):
its stats, output files, config hash and stage versions. A rerun skips shards whose marker matches the
current config; the dataset files (manifest.parquet, stats.json, wids-meta.json, timings.json) are
always rebuilt from all markers, so a run killed at any point and rerun produces the same files.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from vila2_curate.pipelines.engine.health import add_source_health
from vila2_curate.pipelines.io.readers.base import InputShard
from vila2_curate.pipelines.io.writers.atomic import OutputFile, write_json_atomic
from vila2_curate.pipelines.io.writers.records import write_manifest, write_wids_meta
from vila2_curate.recaption.saturation import summarize_rounds
from vila2_curate.schemas.records import ShardStats, merge_stats

PROGRESS_DIR = "_progress"



Timings = dict[str, dict[str, float]]  # step -> {rows, seconds, gpu_seconds}


def add_timing(timings: Timings, name: str, rows: int, seconds: float, gpus: float = 0.0) -> None:
    """Add one step's rows and seconds (and GPU-seconds at ``gpus`` GPUs) to ``timings``."""
    acc = timings.setdefault(name, {"rows": 0, "seconds": 0.0, "gpu_seconds": 0.0})
    acc["rows"] += rows
    acc["seconds"] += seconds
    acc["gpu_seconds"] = acc.get("gpu_seconds", 0.0) + seconds * gpus


def merge_timings(parts: Iterable[dict[str, Any] | None]) -> Timings:
    """The step-by-step sum of several timings (shards, segments, parts)."""
    total: Timings = {}
    for p in parts:
        for k, v in (p or {}).items():
            add_timing(total, k, int(v.get("rows", 0)), float(v.get("seconds", 0.0)))
            total[k]["gpu_seconds"] += float(v.get("gpu_seconds", 0.0))
    return total

@dataclass
class ShardResult:
    shard: InputShard
    stats: ShardStats
    files: list[OutputFile]
    config_hash: str
    stage_versions: dict[str, str]
    timings: dict[str, dict[str, float]] = field(default_factory=dict)  # stage -> {rows, seconds}
    plan_hash: str = ""  # config + stage versions + the set of input shards (global decisions depend on it)

    def to_json(self) -> dict[str, Any]:
        return {
            "shard": {"source": self.shard.source, "shard_id": self.shard.shard_id, "path": self.shard.path,
                      "kind": self.shard.kind, "row_kind": self.shard.row_kind},
            "stats": self.stats.model_dump(),
            "files": [f.__dict__ for f in self.files],
            "config_hash": self.config_hash,
            "stage_versions": self.stage_versions,
            "timings": self.timings,
            "plan_hash": self.plan_hash,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> ShardResult:
        return cls(shard=InputShard(**obj["shard"]), stats=ShardStats(**obj["stats"]),
                   files=[OutputFile(**f) for f in obj["files"]], config_hash=obj["config_hash"],
                   stage_versions=obj["stage_versions"], timings=obj.get("timings", {}),
                   plan_hash=obj.get("plan_hash", ""))


def run_started_at(fs, root: str, plan_hash: str) -> str:
    """The run's start time, recorded once per plan: a resumed run reuses it, so timestamps in caption
    lineage (and with them the shards) come out identical to an uninterrupted run."""
    import datetime

    path = posixpath.join(root, PROGRESS_DIR, "run.json")
    if fs.exists(path):
        try:
            with fs.open(path, "rb") as f:
                rec = json.load(f)
            if rec.get("plan_hash") == plan_hash:
                return rec["started_at"]
        except (ValueError, KeyError):
            pass
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    write_json_atomic(fs, path, {"plan_hash": plan_hash, "started_at": now})
    return now


def marker_path(root: str, shard: InputShard) -> str:
    return posixpath.join(root, PROGRESS_DIR, shard.source, f"{shard.shard_id}.json")


def load_marker(fs, root: str, shard: InputShard) -> ShardResult | None:
    path = marker_path(root, shard)
    if not fs.exists(path):
        return None
    try:
        with fs.open(path, "rb") as f:
            return ShardResult.from_json(json.load(f))
    except (ValueError, KeyError, TypeError):
        return None  # an unreadable marker means "not finished": the shard is redone


def is_done(fs, root: str, shard: InputShard, plan_hash: str) -> bool:
    res = load_marker(fs, root, shard)
    return bool(res and res.plan_hash == plan_hash and res.shard.path == shard.path)


def remove_stale_outputs(fs, root: str, shard: InputShard) -> None:
    """Before redoing a shard under a new config, remove the files its old marker listed."""
    res = load_marker(fs, root, shard)
    if res is None:
        return
    for f in res.files:
        for path in _file_and_companions(root, f.relpath):
            if fs.exists(path):
                fs.rm(path)
    fs.rm(marker_path(root, shard))


def _file_and_companions(root: str, relpath: str) -> list[str]:
    path = posixpath.join(root, relpath)
    return [path, path[: -len(".pkl")] + ".count"] if relpath.endswith(".pkl") else [path]


def write_marker(fs, root: str, result: ShardResult) -> None:
    write_json_atomic(fs, marker_path(root, result.shard), result.to_json())


def finalize(fs, root: str, name: str, results: list[ShardResult],
             summaries: dict[str, Any] | None = None, run_info: dict[str, Any] | None = None,
             run_timings: dict[str, dict[str, float]] | None = None) -> dict[str, Any]:
    """Write manifest.parquet, stats.json, timings.json, summaries.json and wids-meta.json."""
    results = sorted(results, key=lambda r: (r.shard.source, r.shard.shard_id))
    manifest_rows = []
    wds_files: list[OutputFile] = []
    for r in results:
        for f in r.files:
            kind = ("mmc4" if f.relpath.endswith(".pkl") else "sidecar" if f.relpath.endswith(".json")
                    else "wds")
            if kind == "wds":
                wds_files.append(f)
            manifest_rows.append({
                "shard": f.relpath, "kind": kind, "nsamples": f.nsamples, "bytes": f.bytes,
                "sha256": f.sha256, "source": r.shard.source, "input_shards": [r.shard.path],
                "config_hash": r.config_hash, "stage_versions": json.dumps(r.stage_versions, sort_keys=True),
            })
    stats = add_source_health(merge_stats([r.stats for r in results]))  # flags sources whose references fail
    if wds_files:
        write_wids_meta(fs, root, name, wds_files)
    by_source: dict[str, list[OutputFile]] = {}
    for f in wds_files:
        by_source.setdefault(f.relpath.split("/", 1)[0], []).append(f)
    for source, files in by_source.items():
        # one wids-meta per source too, so each source can be its own entry in VILA's dataset mixture
        local = [OutputFile(**{**f.__dict__, "relpath": f.relpath.split("/", 1)[1]}) for f in files]
        write_wids_meta(fs, posixpath.join(root, source), f"{name}-{source}", local)
    write_json_atomic(fs, posixpath.join(root, "stats.json"), stats)
    write_json_atomic(fs, posixpath.join(root, "timings.json"),
                      {**_merge_timings([r.timings for r in results] + [run_timings or {}]), **(run_info or {})})
    rounds = summarize_rounds([r.stats.round_sums for r in results])  # how much each recaption round changed
    summaries = {**(summaries or {}), **({"rounds": rounds} if rounds else {})}
    write_json_atomic(fs, posixpath.join(root, "summaries.json"), summaries)
    write_manifest(fs, root, manifest_rows)  # last: the manifest is the commit point of a run
    return stats


def _merge_timings(timings: list[Timings]) -> dict[str, Any]:
    stages = merge_timings(timings)
    for t in stages.values():
        t["seconds_per_1k"] = round(1000 * t["seconds"] / t["rows"], 4) if t["rows"] else None
    # what a distributed engine spends moving rows between its map side and the shard assembly is no
    # stage's cost: kept apart, so "stages" has the same keys on every engine
    exchange = {k: stages.pop(k) for k in sorted(stages) if k.startswith("exchange_")}
    return {"stages": stages, **({"exchange": exchange} if exchange else {})}
