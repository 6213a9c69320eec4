"""Writer helpers the writer tests share: the "latest" caption policy, a WdsShardWriter run, a file listing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa

from vila2_curate.pipelines.io.writers.wds import WdsShardWriter
from vila2_curate.schemas.config import CaptionPolicy

LATEST = CaptionPolicy(mode="latest")


def write_pairs(root: Path, table: pa.Table, batch: int, **kw: Any) -> list:
    fs = fsspec.filesystem("file")
    kw.setdefault("max_samples", 10)
    kw.setdefault("max_bytes", None)
    kw.setdefault("caption_policy", LATEST)
    w = WdsShardWriter(fs, str(root), "coyo/00000", **kw)
    refused = []
    for off in range(0, table.num_rows, batch):
        refused += [(off + i, why) for i, why in w.write(table.slice(off, batch))]
    files = w.close()
    if refused:  # the sink turns these into rejects; tests see them as the error they are
        raise ValueError("; ".join(why for _, why in refused))
    return files


def all_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
