"""What the reader tests share: small images of each format and `read_all`, which checks every table a
reader yields (schema, batch bound, unique safe keys, quarantine fields) and returns its rows.

Every reader test checks the accounting identity: one output row per input row (sample, failed parquet row,
unusable tar member, jsonl line), whatever state the input is in.
"""

from __future__ import annotations

import io
import json
from typing import Any

import pyarrow as pa
from PIL import Image

from vila2_curate.schemas.keys import is_safe_key
from vila2_curate.schemas.rows import DOCUMENT_SCHEMA, PAIR_SCHEMA


def image_bytes(fmt: str = "JPEG", color: tuple[int, int, int] = (200, 30, 30), size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format=fmt)
    return buf.getvalue()


JPG = image_bytes()
PNG = image_bytes("PNG", (10, 200, 10))
WEBP = image_bytes("WEBP", (10, 10, 200))


def read_all(reader: Any, batch_size: int = 256) -> tuple[list[pa.Table], list[dict[str, Any]]]:
    tables, rows = [], []
    schema = PAIR_SCHEMA if reader.row_kind == "pair" else DOCUMENT_SCHEMA
    for shard in reader.list_shards():
        for t in reader.read(shard, batch_size):
            assert t.schema.equals(schema, check_metadata=True)
            assert 0 < t.num_rows <= batch_size
            tables.append(t)
            rows.extend(t.to_pylist())
    keys = [(r["shard"], r["key"]) for r in rows]
    assert len(keys) == len(set(keys)), "keys must be unique within a shard"
    assert all(is_safe_key(r["key"]) for r in rows)
    for r in rows:
        if r["quarantined"]:
            assert r["drop_reason"] and r["drop_stage"] == "read"
        if r["meta"] is not None:
            json.loads(r["meta"])
    return tables, rows


def by_reason(rows: list[dict[str, Any]]) -> dict[str | None, int]:
    out: dict[str | None, int] = {}
    for r in rows:
        out[r["drop_reason"]] = out.get(r["drop_reason"], 0) + 1
    return out
