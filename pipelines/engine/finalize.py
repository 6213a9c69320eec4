"""The dataset-level files, built from every shard's final marker (``markers.ShardResult``).

manifest.parquet, stats.json, wids-meta.json (one for the run, one per source), timings.json and
summaries.json are always rebuilt from all markers, so a run killed at any point and rerun produces the
same files.
"""

from __future__ import annotations

import json
import posixpath
from typing import Any

from vila2_curate.pipelines.engine.health import add_source_health
from vila2_curate.pipelines.engine.markers import ShardResult, Timings, merge_timings
from vila2_curate.pipelines.io.writers.atomic import OutputFile, write_json_atomic
from vila2_curate.pipelines.io.writers.records import write_manifest, write_wids_meta
from vila2_curate.recaption.saturation import summarize_rounds
from vila2_curate.schemas.records import merge_stats


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
                      {**_timings_json([r.timings for r in results] + [run_timings or {}]), **(run_info or {})})
    rounds = summarize_rounds([r.stats.round_sums for r in results])  # how much each recaption round changed
    summaries = {**(summaries or {}), **({"rounds": rounds} if rounds else {})}
    write_json_atomic(fs, posixpath.join(root, "summaries.json"), summaries)
    write_manifest(fs, root, manifest_rows)  # last: the manifest is the commit point of a run
    return stats


def _timings_json(timings: list[Timings]) -> dict[str, Any]:
    """timings.json's body: every shard's and the decides' timings summed per step, with seconds per 1k rows."""
    stages = merge_timings(timings)
    for t in stages.values():
        t["seconds_per_1k"] = round(1000 * t["seconds"] / t["rows"], 4) if t["rows"] else None
    # what a distributed engine spends moving rows between its map side and the shard assembly is no
    # stage's cost: kept apart, so "stages" has the same keys on every engine
    exchange = {k: stages.pop(k) for k in sorted(stages) if k.startswith("exchange_")}
    return {"stages": stages, **({"exchange": exchange} if exchange else {})}
