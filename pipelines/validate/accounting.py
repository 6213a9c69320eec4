"""The run's books: manifest.parquet must list every shard with its true size, sha256, kind and count, and
stats.json must balance (rows_in = kept + dropped + quarantined) overall, per source and per shard."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import fsspec

from vila2_curate.pipelines.io.parquet_read import read_parquet
from vila2_curate.pipelines.io.writers.records import MANIFEST
from vila2_curate.schemas.records import MANIFEST_SCHEMA

_COUNT_KEYS = ("rows_in", "kept", "dropped", "quarantined")


def _file_sha256(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks so a large shard never sits in memory whole."""
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_manifest(
    fs: fsspec.AbstractFileSystem, base: str, files: dict[str, int], shards: dict[str, str],
    counts: dict[str, int | None], problems: list[str],
) -> None:
    """Every manifest row matches its file and every shard (relpath -> kind in ``shards``) has a row."""
    if MANIFEST not in files:
        if shards:
            problems.append(f"{MANIFEST} is missing")
        return
    try:
        table = read_parquet(fs, f"{base}/{MANIFEST}")
    except Exception as e:  # noqa: BLE001
        problems.append(f"{MANIFEST}: unreadable ({type(e).__name__}: {e})")
        return
    missing_cols = set(MANIFEST_SCHEMA.names) - set(table.column_names)
    if missing_cols:
        problems.append(f"{MANIFEST}: missing columns {sorted(missing_cols)}")
        return
    listed: set[str] = set()
    for r in table.to_pylist():
        rel = r["shard"]
        if rel in listed:
            problems.append(f"{MANIFEST}: {rel} listed twice")
        listed.add(rel)
        if rel not in files:
            problems.append(f"{MANIFEST}: {rel} does not exist")
            continue
        if r["bytes"] != files[rel]:
            problems.append(f"{MANIFEST}: {rel} bytes {r['bytes']} but the file has {files[rel]}")
        if r["sha256"] != _file_sha256(fs, f"{base}/{rel}"):
            problems.append(f"{MANIFEST}: {rel} sha256 does not match the file")
        if rel in shards and r["kind"] != shards[rel]:
            problems.append(f"{MANIFEST}: {rel} kind {r['kind']!r}, expected {shards[rel]!r}")
        actual = counts.get(rel)
        if actual is not None and r["nsamples"] != actual:
            problems.append(f"{MANIFEST}: {rel} nsamples {r['nsamples']} but the file holds {actual}")
    for rel in sorted(set(shards) - listed):
        problems.append(f"{rel}: not listed in {MANIFEST}")


def check_stats(fs: fsspec.AbstractFileSystem, base: str, files: dict[str, int], problems: list[str]) -> None:
    """stats.json exists and every count record in it balances."""
    if "stats.json" not in files:
        problems.append("stats.json is missing")
        return
    try:
        with fs.open(f"{base}/stats.json", "rb") as fh:
            stats = json.load(fh)
    except ValueError as e:
        problems.append(f"stats.json: not valid JSON ({e})")
        return

    def balanced(what: str, rec: Any) -> None:
        if not isinstance(rec, dict) or any(not isinstance(rec.get(k), int) for k in _COUNT_KEYS):
            problems.append(f"stats.json: {what} lacks integer {list(_COUNT_KEYS)}")
            return
        if rec["rows_in"] != rec["kept"] + rec["dropped"] + rec["quarantined"]:
            problems.append(
                f"stats.json: {what} unbalanced: rows_in {rec['rows_in']} != kept {rec['kept']} + dropped "
                f"{rec['dropped']} + quarantined {rec['quarantined']}"
            )

    balanced("total", stats.get("total"))
    for name, rec in sorted((stats.get("sources") or {}).items()):
        balanced(f"source {name}", rec)
    for rec in stats.get("shards") or []:
        label = f"shard {rec.get('source')}/{rec.get('shard')}" if isinstance(rec, dict) else "shard"
        balanced(label, rec)
    if stats.get("balanced") is False:
        problems.append("stats.json: says balanced: false")
