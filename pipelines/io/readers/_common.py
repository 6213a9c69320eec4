"""Helpers shared by the source readers: path expansion through fsspec, shard ids, key bookkeeping,
image-format sniffing and bounded row batching (value coercion and the JSON meta: ``pipelines/io/values.py``).

Everything here is I/O-light and deterministic so that the same input lists the same shards and emits the
same keys on every engine.
"""

from __future__ import annotations

import hashlib
import posixpath
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import fsspec
import pyarrow as pa
from fsspec.spec import AbstractFileSystem

from vila2_curate.pipelines.io.readers.base import InputShard, SourceFormatError
from vila2_curate.pipelines.io.readers.text import scrub_row
from vila2_curate.pipelines.io.values import as_str, short_error, to_meta_json
from vila2_curate.schemas.config import SourceConfig
from vila2_curate.schemas.keys import safe_key
from vila2_curate.schemas.rows import PAIR_SCHEMA, make_table

READ_STAGE = "read"
_GLOB_CHARS = "*?["


def url_to_fs(url: str, storage_options: Mapping[str, Any]) -> tuple[AbstractFileSystem, str]:
    """fsspec's own split of a URL into (filesystem, path), with the source's storage options."""
    return fsspec.core.url_to_fs(url, **dict(storage_options))


def to_url(fs: AbstractFileSystem, path: str) -> str:
    """A URL that ``url_to_fs`` maps back to ``path`` on ``fs`` (plain path for local files)."""
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    if "file" in protocols or "local" in protocols:
        return path
    return fs.unstrip_protocol(path)


def strip_extensions(name: str) -> str:
    """File name without any extension: ``docs_shard_0_v3.jsonl.gz`` -> ``docs_shard_0_v3``."""
    return name.split(".", 1)[0] or name


def expand_paths(
    source: SourceConfig, suffixes: tuple[str, ...]
) -> list[tuple[AbstractFileSystem, str]]:
    """Expand the source's paths (files, folders, globs) into sorted (fs, path) pairs.

    Globs and folders keep only names ending in one of ``suffixes`` (so ``dir/*`` next to img2dataset's
    ``.parquet`` / ``_stats.json`` still yields only tars); an explicit file path is taken as given. A
    pattern that matches nothing is an error: an empty source is far more often a typo than intended.
    """
    found: dict[str, tuple[AbstractFileSystem, str]] = {}
    for pattern in source.paths:
        fs, path = url_to_fs(pattern, source.storage_options)
        if any(c in path for c in _GLOB_CHARS):
            matches = [p for p in fs.glob(path) if p.lower().endswith(suffixes) and fs.isfile(p)]
        elif fs.isdir(path):
            matches = [p for p in fs.find(path) if p.lower().endswith(suffixes)]
        elif fs.exists(path):
            matches = [path]
        else:
            matches = []
        if not matches:
            raise SourceFormatError(
                f"source {source.name!r}: path {pattern!r} matched no {'/'.join(suffixes)} files"
            )
        for p in matches:
            found.setdefault(to_url(fs, p), (fs, p))
    return [found[u] for u in sorted(found)]


def make_shards(
    source: SourceConfig, files: list[tuple[AbstractFileSystem, str]], row_kind: str
) -> list[InputShard]:
    """One InputShard per file; shard_id = file stem without extensions, made path-safe and unique.

    Two files with the same stem in different folders get a short hash of their URL appended, so the
    id stays stable for a given path.
    """
    urls = [to_url(fs, p) for fs, p in files]
    stems = [safe_key(strip_extensions(posixpath.basename(p))) for _, p in files]
    counts: dict[str, int] = {}
    for s in stems:
        counts[s] = counts.get(s, 0) + 1
    shards = []
    for url, stem in zip(urls, stems, strict=True):
        sid = stem
        if counts[stem] > 1:
            sid = safe_key(f"{stem[:60]}-{hashlib.sha1(url.encode()).hexdigest()[:8]}")
        shards.append(InputShard(source=source.name, shard_id=sid, path=url, kind=source.kind,
                                 row_kind=row_kind))
    return sorted(shards, key=lambda s: s.shard_id)


# --------------------------------------------------------------------------------------------- values


# --------------------------------------------------------------------------------------------- keys


class KeyRegistry:
    """Turns raw source keys into unique safe keys within one shard and spots duplicates.

    Only keys are kept (a few bytes per row), never payloads, so memory stays bounded by the batch.
    """

    def __init__(self) -> None:
        self._used: set[str] = set()

    def __contains__(self, key: str) -> bool:
        return key in self._used

    def claim(self, raw: str) -> tuple[str, str | None, bool]:
        """Return (key, source_key, duplicate). A duplicate gets a distinct, deterministic key."""
        key = safe_key(raw)
        source_key = raw if key != raw else None
        if key not in self._used:
            self._used.add(key)
            return key, source_key, False
        n = 1
        while True:
            alt = safe_key(f"{raw}#dup{n}")
            if alt not in self._used:
                self._used.add(alt)
                return alt, raw, True
            n += 1

    def reserve(self, key: str) -> None:
        self._used.add(key)


def quarantine(row: dict[str, Any], reason: str) -> dict[str, Any]:
    """Mark a row as bad input (not a curation decision); keeps whatever payload it has."""
    row["drop_reason"] = reason
    row["drop_stage"] = READ_STAGE
    row["quarantined"] = True
    return row


def base_row(shard: InputShard, key: str, source_key: str | None) -> dict[str, Any]:
    return {"key": key, "source": shard.source, "shard": shard.shard_id, "source_key": source_key,
            "quarantined": False}


def batched_tables(rows: Iterable[dict[str, Any]], schema: pa.Schema, batch_size: int) -> Iterator[pa.Table]:
    """Group row dicts into tables of at most ``batch_size`` rows (the reader's memory bound)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    buf: list[dict[str, Any]] = []
    for row in rows:
        buf.append(scrub_row(row))  # lone surrogates would fail the whole batch in Arrow
        if len(buf) >= batch_size:
            yield _table_row_by_row_on_error(buf, schema)
            buf = []
    if buf:
        yield _table_row_by_row_on_error(buf, schema)


def _table_row_by_row_on_error(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    """make_table; a value Arrow refuses (a wrongly typed field from hostile input) quarantines its row
    with ``invalid_value`` instead of failing the batch, the shard and the run."""
    try:
        return make_table(rows, schema)
    except (pa.ArrowException, TypeError, ValueError, OverflowError):
        pass
    fixed = []
    for row in rows:
        try:
            make_table([row], schema)
            fixed.append(row)
        except (pa.ArrowException, TypeError, ValueError, OverflowError) as e:
            bare = {k: as_str(row.get(k)) for k in ("key", "source", "shard", "source_key")}
            bare["meta"] = to_meta_json({"error": short_error(e)})
            fixed.append(quarantine(bare, "invalid_value"))
    return make_table(fixed, schema)


class StreamingReader:
    """The shared shape of the file readers: each file matching ``suffixes`` is one input shard, and
    ``_rows(shard)`` streams row dicts that are grouped into ``schema`` tables of ``batch_size`` rows."""

    row_kind = "pair"
    suffixes: tuple[str, ...] = ()
    schema: pa.Schema = PAIR_SCHEMA

    def __init__(self, source: SourceConfig) -> None:
        self.source = source

    def list_shards(self) -> list[InputShard]:
        return make_shards(self.source, expand_paths(self.source, self.suffixes), self.row_kind)

    def read(self, shard: InputShard, batch_size: int) -> Iterator[pa.Table]:
        yield from batched_tables(self._rows(shard), self.schema, batch_size)

    def _rows(self, shard: InputShard) -> Iterator[dict[str, Any]]:
        raise NotImplementedError
