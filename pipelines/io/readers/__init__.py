"""Source readers: list the input shards of a source and stream each as bounded Arrow tables."""

from __future__ import annotations

from vila2_curate.pipelines.io.readers.base import InputShard, Reader, SourceFormatError
from vila2_curate.pipelines.io.readers.coyo import CoyoParquetReader
from vila2_curate.pipelines.io.readers.img2dataset import Img2DatasetReader
from vila2_curate.pipelines.io.readers.mmc4 import Mmc4Reader
from vila2_curate.pipelines.io.readers.vila_wds import VilaWdsReader
from vila2_curate.schemas.config import SourceConfig

_READERS: dict[str, type] = {
    "img2dataset": Img2DatasetReader,
    "coyo_parquet": CoyoParquetReader,
    "mmc4": Mmc4Reader,
    "vila_wds": VilaWdsReader,
}


def make_reader(source: SourceConfig) -> Reader:
    """The reader for ``source.kind``; construction checks the config, list_shards() touches storage."""
    try:
        cls = _READERS[source.kind]
    except KeyError:
        raise SourceFormatError(f"source {source.name!r}: no reader for kind {source.kind!r}") from None
    return cls(source)


__all__ = [
    "CoyoParquetReader",
    "Img2DatasetReader",
    "InputShard",
    "Mmc4Reader",
    "Reader",
    "SourceFormatError",
    "make_reader",
]
