"""Versioned Arrow schemas of the rows that flow between stages.

A *pair* row is one image with its caption (COYO parquet, img2dataset shards). A *document* row is one
MMC4 document: sentences plus images placed among them, each image carrying its own normalize / dedup /
score columns. Both schemas carry their version in the schema metadata; readers of intermediate files
call :func:`check_schema_version` and refuse a major version they do not know.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import pyarrow as pa

SCHEMA_VERSION = "1.3"
VERSION_KEY = b"vila2.schema_version"
KIND_KEY = b"vila2.kind"


class SchemaVersionError(ValueError):
    """An intermediate file was written by an incompatible (unknown major) schema version."""


# One caption with its lineage: which round, model, prompt and generation parameters produced it.
CAPTION_TYPE = pa.struct(
    [
        pa.field("round", pa.int32()),  # 0 = original alt-text, k >= 1 = recaption round k
        pa.field("model", pa.string()),  # model tag, e.g. "nvila-8b-hf" or "original"
        pa.field("prompt_id", pa.string()),  # content hash of the prompt (empty for round 0)
        pa.field("params_hash", pa.string()),  # hash of generation params + seed
        pa.field("text", pa.string()),
        pa.field("created_at", pa.string()),  # ISO-8601 UTC
        pa.field("flags", pa.list_(pa.string())),  # e.g. "truncated", "refusal", "empty", "demo_model"
    ]
)

BOX_TYPE = pa.list_(pa.float32(), 4)  # normalised [xmin, ymin, xmax, ymax] in [0, 1]

OCR_LINE_TYPE = pa.struct(
    [pa.field("text", pa.string()), pa.field("box", BOX_TYPE), pa.field("score", pa.float32())]
)
DETECTION_TYPE = pa.struct(
    [pa.field("label", pa.string()), pa.field("box", BOX_TYPE), pa.field("score", pa.float32())]
)

SPECIALISTS_TYPE = pa.struct(
    [
        pa.field("ocr", pa.list_(OCR_LINE_TYPE)),
        pa.field("ocr_text", pa.string()),
        pa.field("grounding", pa.list_(DETECTION_TYPE)),
        pa.field("grounding_text", pa.string()),
        pa.field("spatial", pa.list_(pa.string())),
        pa.field("spatial_text", pa.string()),
        pa.field("models", pa.string()),  # JSON: specialist name -> model tag / version
    ]
)

# Columns every row kind shares: identity, accounting and the curation decision.
_COMMON_HEAD = [
    pa.field("key", pa.string(), nullable=False),  # unique, dot-free, <= 80 chars
    pa.field("source", pa.string(), nullable=False),  # source name from the config
    pa.field("shard", pa.string(), nullable=False),  # input shard id (unit of work and of accounting)
    pa.field("source_key", pa.string()),  # the key as the source spelled it, if it was rewritten
    pa.field("url", pa.string()),
]
_COMMON_TAIL = [
    pa.field("delta_loss", pa.float32()),  # logp_large - logp_small (NVILA DeltaLoss)
    pa.field("logp_small", pa.float32()),
    pa.field("logp_large", pa.float32()),
    pa.field("flags", pa.list_(pa.string())),  # non-dropping marks, e.g. "boilerplate_caption"
    pa.field("drop_reason", pa.string()),  # null = kept so far
    pa.field("drop_stage", pa.string()),
    pa.field("quarantined", pa.bool_()),  # true: bad input (not a curation decision)
    pa.field("meta", pa.string()),  # JSON object of source columns passed through
    # JSON object of this run's per-row measurements for stats.json / summaries.json (schemas/run_metrics.py):
    # carried between segments, read by the sink, never written to shards nor read back by a later round
    pa.field("run_metrics", pa.string()),
]

# Per-image columns produced by normalize / dedup / clipscore; shared by pair rows and MMC4 images.
_IMAGE_FIELDS = [
    pa.field("image", pa.binary()),  # encoded bytes (jpg / png / webp)
    pa.field("image_format", pa.string()),  # "jpg" | "png" | "webp" (the shard member extension)
    pa.field("sha256", pa.string()),  # hex sha256 of the image bytes as read
    pa.field("phash", pa.uint64()),  # 64-bit pHash, same bits as imagehash.phash
    # dedup's thumbnail signature (curation/dedup/thumbnails.py) from normalize's own decode, when a dedup
    # of the same segment confirms with thumbnails: working state, never published nor kept between segments
    pa.field("thumb", pa.binary()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("clip_score", pa.float32()),  # CLIP-S = 2.5 * max(cos, 0)
    pa.field("clip_cosine", pa.float32()),
    pa.field("clip_model", pa.string()),
    pa.field("embedding", pa.list_(pa.float32())),  # L2-normalised CLIP image embedding (semantic dedup)
]

PAIR_SCHEMA = pa.schema(
    _COMMON_HEAD
    + _IMAGE_FIELDS
    + [
        pa.field("text", pa.string()),  # original caption (alt-text)
        pa.field("captions", pa.list_(CAPTION_TYPE)),
        pa.field("specialists", SPECIALISTS_TYPE),
    ]
    + _COMMON_TAIL,
    metadata={VERSION_KEY: SCHEMA_VERSION.encode(), KIND_KEY: b"pair"},
)

DOC_IMAGE_TYPE = pa.struct(
    [
        pa.field("image_name", pa.string()),
        pa.field("raw_url", pa.string()),
        pa.field("matched_text_index", pa.int32()),
        pa.field("matched_sim", pa.float32()),
        *_IMAGE_FIELDS,
        pa.field("drop_reason", pa.string()),  # the image is removed from its document
        pa.field("drop_stage", pa.string()),
        pa.field("meta", pa.string()),  # JSON: face_detections and other per-image source fields
    ]
)

DOCUMENT_SCHEMA = pa.schema(
    _COMMON_HEAD
    + [
        pa.field("text_list", pa.list_(pa.string())),
        pa.field("image_info", pa.list_(DOC_IMAGE_TYPE)),
        pa.field("similarity_matrix", pa.list_(pa.list_(pa.float32()))),  # images x sentences
        pa.field("could_have_url_duplicate", pa.int32()),
    ]
    + _COMMON_TAIL,
    metadata={VERSION_KEY: SCHEMA_VERSION.encode(), KIND_KEY: b"document"},
)

def check_schema_version(schema: pa.Schema) -> str:
    """Refuse rows written by an unknown major schema version; return the version found."""
    meta = schema.metadata or {}
    raw = meta.get(VERSION_KEY)
    if raw is None:
        raise SchemaVersionError("schema carries no vila2.schema_version metadata; not a vila2-curate file")
    found = raw.decode()
    if found.split(".")[0] != SCHEMA_VERSION.split(".")[0]:
        raise SchemaVersionError(
            f"schema version {found} is not readable by this vila2-curate (knows {SCHEMA_VERSION}); "
            "re-run the earlier stages with a matching version"
        )
    return found


def empty_table(schema: pa.Schema) -> pa.Table:
    return schema.empty_table()


def make_table(rows: Iterable[Mapping[str, Any]], schema: pa.Schema) -> pa.Table:
    """Build a table from row dicts; columns a row leaves out are null."""
    rows = list(rows)
    columns = {f.name: [r.get(f.name) for r in rows] for f in schema}
    return pa.Table.from_pydict(columns, schema=schema)


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Add missing columns as nulls, order and cast columns to ``schema`` (keeps its metadata)."""
    arrays = []
    for f in schema:
        if f.name in table.column_names:
            col = table.column(f.name)
            arrays.append(col if col.type == f.type else col.cast(f.type))
        else:
            arrays.append(pa.nulls(table.num_rows, type=f.type))
    return pa.Table.from_arrays(arrays, schema=schema)


# Whole-dataset decisions (dedup groups, thresholds, top-K) come back as rows of this table and are
# applied to the data rows by (source, key, image_index) in a second map pass.
DECISION_SCHEMA = pa.schema(
    [
        pa.field("source", pa.string()),
        pa.field("key", pa.string()),
        pa.field("image_index", pa.int32()),  # -1: the row itself; i >= 0: image i of an MMC4 document
        pa.field("drop_reason", pa.string()),  # null: keep
        pa.field("flag", pa.string()),  # a non-dropping mark to add to the row's flags (e.g. "boilerplate_caption")
        pa.field("group", pa.string()),  # duplicate-group id or subset name, for summaries
        pa.field("value", pa.float64()),  # e.g. the threshold applied or the score ranked
    ]
)
