"""Our own published dataset (VILA WebDataset + wids-meta.json) read back as pair rows: the input of
recaption round k is round k-1's output, with every earlier caption and its lineage restored from the
sample json. MMC4 pickles are never read back (inputs are never unpickled); interleaved data is not
recaptioned in VILA², so it stays where curation published it.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator
from typing import Any

from vila2_curate.pipelines.io import codec
from vila2_curate.pipelines.io.readers._common import (
    KeyRegistry,
    base_row,
    batched_tables,
    quarantine,
    to_url,
    url_to_fs,
)
from vila2_curate.pipelines.io.readers.base import InputShard, SourceFormatError
from vila2_curate.pipelines.io.readers.tarstream import TarTruncated, iter_members
from vila2_curate.pipelines.io.readers.text import loads_json
from vila2_curate.pipelines.io.values import short_error
from vila2_curate.schemas.config import SourceConfig
from vila2_curate.schemas.rows import PAIR_SCHEMA

WIDS_META = "wids-meta.json"


class VilaWdsReader:
    """Reads every tar listed in ``<path>/wids-meta.json`` (paths: dataset roots of earlier runs)."""

    row_kind = "pair"

    def __init__(self, source: SourceConfig) -> None:
        self.source = source

    def list_shards(self) -> list[InputShard]:
        shards = []
        for root in self.source.paths:
            fs, base = url_to_fs(root, self.source.storage_options)
            meta_path = posixpath.join(base.rstrip("/"), WIDS_META)
            if not fs.exists(meta_path):
                raise SourceFormatError(f"source {self.source.name!r}: {root} has no {WIDS_META}; "
                                        "point vila_wds sources at the root of a vila2-curate output")
            with fs.open(meta_path, "rb") as f:
                meta, bad = loads_json(f.read())
            entries = meta.get("shardlist") if isinstance(meta, dict) else None
            if bad is not None or not isinstance(entries, list) or not all(
                    isinstance(e, dict) and isinstance(e.get("url"), str) for e in entries):
                raise SourceFormatError(f"source {self.source.name!r}: {to_url(fs, meta_path)} is not a "
                                        "wids-meta.json with a shardlist of {url: ...} entries")
            for entry in entries:
                url = entry["url"]
                if not fs.exists(posixpath.join(base.rstrip("/"), url)):  # a missing shard: say which, early
                    raise SourceFormatError(f"source {self.source.name!r}: {to_url(fs, meta_path)} lists "
                                            f"shard {url!r}, which does not exist")
                folder, name = posixpath.split(url)
                # outputs keep the layout of the round they came from: <source folder>/<tar stem>
                source = folder.split("/")[0] if folder else self.source.name
                shards.append(InputShard(source=source, shard_id=name[: -len(".tar")], kind="vila_wds",
                                         path=to_url(fs, posixpath.join(base.rstrip("/"), url)),
                                         row_kind="pair"))
        return sorted(shards, key=lambda s: (s.source, s.shard_id))

    def read(self, shard: InputShard, batch_size: int) -> Iterator[Any]:
        yield from batched_tables(self._rows(shard), PAIR_SCHEMA, batch_size)

    def _rows(self, shard: InputShard) -> Iterator[dict[str, Any]]:
        fs, path = url_to_fs(shard.path, self.source.storage_options)
        keys = KeyRegistry()
        current: dict[str, Any] = {}
        current_key: str | None = None
        with fs.open(path, "rb") as f:
            try:
                for m in iter_members(f):
                    key, _, ext = m.name.partition(".")
                    if current_key is not None and key != current_key:
                        yield self._row(shard, keys, current_key, current)
                        current = {}
                    current_key = key
                    if m.data is not None:
                        current[ext] = m.data
            except TarTruncated as e:
                if current_key is not None:
                    row = self._row(shard, keys, current_key, current)
                    yield quarantine(row, f"tar_truncated: {short_error(e)}")
                    current_key = None
        if current_key is not None:
            yield self._row(shard, keys, current_key, current)

    def _row(self, shard: InputShard, keys: KeyRegistry, raw_key: str, files: dict[str, bytes]) -> dict[str, Any]:
        key, source_key, duplicate = keys.claim(raw_key)
        row = base_row(shard, key, source_key)
        fields, problem = codec.row_fields(files)
        row.update(fields)
        if problem:
            return quarantine(row, problem)
        if duplicate:
            return quarantine(row, "duplicate_key")
        return row

