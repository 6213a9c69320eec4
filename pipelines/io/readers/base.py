"""Reader interface: list the input shards of a source, stream one shard as bounded Arrow batches.

An input shard is the unit of work, of resume and of accounting. A reader yields *every* row it finds,
including rows the source already marks failed (``drop_stage="read"``) and rows it cannot parse
(``quarantined=True`` with a reason), so that rows in = kept + dropped + quarantined holds per shard.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import pyarrow as pa


@dataclass(frozen=True)
class InputShard:
    source: str  # source name from the config
    shard_id: str  # path-safe, unique within the source (e.g. "00000", "part-00001")
    path: str  # fsspec URL of the shard's main file
    kind: str  # "img2dataset" | "coyo_parquet" | "mmc4"
    row_kind: str  # "pair" | "document"


class Reader(Protocol):
    row_kind: str

    def list_shards(self) -> list[InputShard]:
        """All input shards of the source, sorted by shard_id (deterministic)."""

    def read(self, shard: InputShard, batch_size: int) -> Iterator[pa.Table]:
        """Stream the shard as tables in PAIR_SCHEMA / DOCUMENT_SCHEMA of at most batch_size rows."""


class SourceFormatError(ValueError):
    """The source as a whole cannot be read (e.g. a required column is missing): a clear, early error."""
