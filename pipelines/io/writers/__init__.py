"""Output writers: VILA WebDataset tars, MMC4 pkl/count pairs and the records beside them."""

from vila2_curate.pipelines.io.writers.atomic import (
    OutputFile,
    atomic_open,
    write_bytes_atomic,
    write_json_atomic,
    write_parquet_atomic,
)
from vila2_curate.pipelines.io.writers.mmc4 import Mmc4PklWriter, mark_imageless
from vila2_curate.pipelines.io.writers.records import (
    manifest_row,
    write_manifest,
    write_quarantine,
    write_rejects,
    write_wids_meta,
)
from vila2_curate.pipelines.io.writers.wds import WdsShardWriter

__all__ = [
    "Mmc4PklWriter",
    "OutputFile",
    "WdsShardWriter",
    "atomic_open",
    "manifest_row",
    "mark_imageless",
    "write_bytes_atomic",
    "write_json_atomic",
    "write_manifest",
    "write_parquet_atomic",
    "write_quarantine",
    "write_rejects",
    "write_wids_meta",
]
