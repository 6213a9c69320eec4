"""Records beside the shards: rejects, quarantine payloads, ``wids-meta.json`` and ``manifest.parquet``.

Every file goes through :mod:`pipelines.io.writers.atomic`. The manifest is the commit point of a run: write
it last, after every shard and record it lists is in place.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc

from vila2_curate.pipelines.io.writers.atomic import OutputFile, join, write_json_atomic, write_parquet_atomic
from vila2_curate.schemas.records import MANIFEST_SCHEMA, REJECTS_SCHEMA

WIDS_META = "wids-meta.json"
MANIFEST = "manifest.parquet"
WIDS_KIND = "VILA-WebDataset"
WIDS_VERSION = 1


def _safe_part(name: str, what: str) -> str:
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise ValueError(f"{what} {name!r} must be a single path component")
    return name


def _check_relpath(relpath: str) -> str:
    if not relpath or relpath.startswith("/") or "://" in relpath or ".." in relpath.split("/"):
        raise ValueError(f"{relpath!r} must be a path relative to the dataset root")
    return relpath


def rejects_relpath(source: str, shard_id: str) -> str:
    return f"rejects/{_safe_part(source, 'source')}/{_safe_part(shard_id, 'shard_id')}.parquet"


def quarantine_relpath(source: str, shard_id: str) -> str:
    return f"quarantine/{_safe_part(source, 'source')}/{_safe_part(shard_id, 'shard_id')}.parquet"


def _not_kept_mask(table: pa.Table) -> pa.ChunkedArray:
    quarantined = pc.fill_null(table.column("quarantined"), False)
    return pc.or_(pc.is_valid(table.column("drop_reason")), quarantined)


def write_rejects(
    fs: fsspec.AbstractFileSystem, root: str, source: str, shard_id: str, table: pa.Table | None
) -> str:
    """Write ``rejects/<source>/<shard_id>.parquet`` (REJECTS_SCHEMA) for the dropped + quarantined rows.

    ``table`` may hold kept rows too (pair or document rows, payload columns optional); they are filtered
    out. The file is written even when empty (or ``table`` is None), so every finished input shard has one.
    Returns its path relative to ``root``.
    """
    out = REJECTS_SCHEMA.empty_table() if table is None else _rejects_table(table)
    rel = rejects_relpath(source, shard_id)
    write_parquet_atomic(fs, join(fs._strip_protocol(root), rel), out)
    return rel


def _rejects_table(table: pa.Table) -> pa.Table:
    sel = table.filter(_not_kept_mask(table)) if table.num_rows else table
    n = sel.num_rows

    def col(name: str, default: Any = None) -> pa.Array | pa.ChunkedArray:
        if name in sel.column_names:
            return sel.column(name)
        return pa.array([default] * n, pa.string())

    return pa.Table.from_arrays(
        [
            col("key").cast(pa.string()),
            col("source").cast(pa.string()),
            col("shard").cast(pa.string()),
            col("source_key").cast(pa.string()),
            col("url").cast(pa.string()),
            col("drop_stage").cast(pa.string()),
            col("drop_reason").cast(pa.string()),
            (pc.fill_null(sel.column("quarantined"), False) if "quarantined" in sel.column_names
             else pa.array([False] * n)).cast(pa.bool_()),
        ],
        schema=REJECTS_SCHEMA,
    )


def write_quarantine(
    fs: fsspec.AbstractFileSystem, root: str, source: str, shard_id: str, table: pa.Table
) -> str | None:
    """Write ``quarantine/<source>/<shard_id>.parquet`` with the full quarantined rows, payload included.

    Kept in the rows' own schema (pair or document, with its version metadata) so they can be inspected or
    re-fed after a fix. Returns the relative path, or None when the shard had no quarantined rows.
    """
    if table.num_rows == 0:
        return None
    sel = table.filter(pc.fill_null(table.column("quarantined"), False))
    if sel.num_rows == 0:
        return None
    rel = quarantine_relpath(source, shard_id)
    write_parquet_atomic(fs, join(fs._strip_protocol(root), rel), sel)
    return rel


def write_wids_meta(fs: fsspec.AbstractFileSystem, root: str, name: str, files: Iterable[OutputFile]) -> str:
    """Write ``<root>/wids-meta.json`` as VILA's ``VILAWebDataset`` / wids ``ShardListDataset`` read it.

    Urls are relative to the folder holding the file (wids rebases them on that folder); entries are
    sorted by url as VILA's own ``prepare_wids_meta`` does.
    """
    entries = []
    seen: set[str] = set()
    for f in files:
        rel = _check_relpath(f.relpath)
        if not rel.endswith(".tar"):
            raise ValueError(f"wids-meta lists tar shards only, got {rel!r}")
        if rel in seen:
            raise ValueError(f"shard {rel!r} listed twice")
        seen.add(rel)
        entries.append({"url": rel, "nsamples": int(f.nsamples), "filesize": int(f.bytes)})
    entries.sort(key=lambda e: e["url"])
    meta = {"name": name, "__kind__": WIDS_KIND, "wids_version": WIDS_VERSION, "shardlist": entries}
    write_json_atomic(fs, join(fs._strip_protocol(root), WIDS_META), meta)
    return WIDS_META


def manifest_row(
    file: OutputFile,
    *,
    kind: str,
    source: str,
    input_shards: Iterable[str],
    config_hash: str,
    stage_versions: Mapping[str, str],
) -> dict[str, Any]:
    """One MANIFEST_SCHEMA row for a finished output file (``kind`` is "wds" or "mmc4")."""
    if kind not in ("wds", "mmc4"):
        raise ValueError(f"manifest kind must be 'wds' or 'mmc4', got {kind!r}")
    return {
        "shard": file.relpath,
        "kind": kind,
        "nsamples": file.nsamples,
        "bytes": file.bytes,
        "sha256": file.sha256,
        "source": source,
        "input_shards": sorted(input_shards),
        "config_hash": config_hash,
        "stage_versions": json.dumps(dict(stage_versions), sort_keys=True),
    }


def write_manifest(fs: fsspec.AbstractFileSystem, root: str, rows: list[dict[str, Any]]) -> str:
    """Write ``<root>/manifest.parquet`` (MANIFEST_SCHEMA, sorted by shard). Write it last: it commits."""
    norm = []
    seen: set[str] = set()
    for r in rows:
        r = dict(r)
        _check_relpath(r["shard"])
        if r["shard"] in seen:
            raise ValueError(f"shard {r['shard']!r} appears twice in the manifest")
        seen.add(r["shard"])
        if isinstance(r.get("stage_versions"), Mapping):
            r["stage_versions"] = json.dumps(dict(r["stage_versions"]), sort_keys=True)
        norm.append(r)
    norm.sort(key=lambda r: r["shard"])
    table = pa.Table.from_pylist(norm, schema=MANIFEST_SCHEMA)
    write_parquet_atomic(fs, join(fs._strip_protocol(root), MANIFEST), table)
    return MANIFEST

