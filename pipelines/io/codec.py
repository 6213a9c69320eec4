"""One pair row <-> one published sample: the ``<key>.json`` member of a VILA WebDataset tar, both ways.

The writer (``writers/wds.py``) encodes kept rows into it; the ``vila_wds`` reader decodes our own
published output back into pair rows, so recaption round k starts from round k-1's captions, lineage,
specialists and scores. Both directions read :data:`FIELDS`, so adding a field to the published json is
one table entry here.

What does not round-trip, by design: ``key``, ``source`` and ``shard`` are written for people and tools
reading the json, but a read-back row takes them from the tar (member names, shard) instead; floats
come back as float32 values; ``flags`` and ``captions`` None come back as ``[]``, ``meta`` as its sorted
JSON text (None for ``{}``), specialists' ``models`` as sorted JSON text; ``None`` captions are not
written.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

# The reader helpers live in the readers package, whose __init__ imports vila_wds, which imports this
# module: import the module (not its names) so either side may be imported first.
from vila2_curate.pipelines.io import values
from vila2_curate.schemas.images import IMAGE_EXTENSIONS, VILA_IMAGE_FORMATS

CAPTION_FIELDS = ("round", "model", "prompt_id", "params_hash", "text", "created_at", "flags")
SPECIALIST_LIST_FIELDS = ("ocr", "grounding", "spatial")
_SCORED_SPECIALISTS = ("ocr", "grounding")  # lists of {..., "box": [4 floats], "score": float}


def _same(v: Any) -> Any:
    return v


def _f32(x: float | None) -> float | None:
    """Shortest decimal that round-trips the float32 (no 0.30000001192092896 noise); NaN/inf -> None."""
    if x is None or not math.isfinite(x):
        return None
    return float(str(np.float32(x)))


def _phash_hex(v: int | None) -> str | None:
    return None if v is None else f"{int(v):016x}"


def _phash_int(v: Any) -> int | None:
    """Raises ValueError for text that is not hex: the reader quarantines the sample."""
    return int(str(v), 16) if v else None


def _meta_dict(meta: str | None) -> dict[str, Any]:
    """The row's meta JSON text as an object in the sample json (``{"raw": ...}`` when it is not one)."""
    if not meta:
        return {}
    try:
        parsed = json.loads(meta)
    except ValueError:
        return {"raw": meta}
    return parsed if isinstance(parsed, dict) else {"raw": parsed}


def _meta_text(v: dict[str, Any] | None) -> str | None:
    return values.to_meta_json(v or {})


def _captions_out(captions: list[dict[str, Any] | None] | None) -> list[dict[str, Any]]:
    return [dict(c) for c in (captions or []) if c is not None]


def _captions_in(captions: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    return [{k: c.get(k) for k in CAPTION_FIELDS} for c in captions or []]


def _specialists_out(spec: dict[str, Any] | None) -> dict[str, Any] | None:
    """Boxes and scores as float32 decimals; ``models`` (JSON text in the row) as an object."""
    if spec is None:
        return None
    out = dict(spec)
    for name in _SCORED_SPECIALISTS:
        items = out.get(name)
        if items:
            out[name] = [
                {**it, "score": _f32(it.get("score")),
                 "box": [_f32(v) for v in it["box"]] if it.get("box") is not None else None}
                for it in items
            ]
    if isinstance(out.get("models"), str):
        with contextlib.suppress(ValueError):
            out["models"] = json.loads(out["models"])
    return out


def _specialists_in(spec: dict[str, Any] | None) -> dict[str, Any] | None:
    if not spec:
        return None
    out = dict(spec)
    if isinstance(out.get("models"), dict):
        out["models"] = json.dumps(out["models"], sort_keys=True)
    for name in SPECIALIST_LIST_FIELDS:
        out.setdefault(name, None)
    return out


def _flags(v: list[str] | None) -> list[str]:
    return list(v or [])


def _is_list(v: Any) -> bool:
    return isinstance(v or [], list)


def _is_dict(v: Any) -> bool:
    return isinstance(v or {}, dict)


def _is_caption_list(v: Any) -> bool:
    return isinstance(v or [], list) and all(isinstance(c, dict) for c in v or [])


@dataclass(frozen=True)
class Field:
    """One row column as it appears in the sample json.

    ``decode`` None: written only (the reader takes the value from the tar). ``shape``: what a decoder
    needs of the json value (an edited round input may break it); ``problem`` names it in the
    ``json_invalid: ...`` reason.
    """

    name: str
    encode: Callable[[Any], Any] = _same
    decode: Callable[[Any], Any] | None = _same
    shape: Callable[[Any], bool] | None = None
    problem: str = ""


# Shape checks run in this order (the first failure is the reason), so captions, specialists and meta
# come before flags; the json itself is written with sorted keys, so the order does not reach the bytes.
FIELDS: tuple[Field, ...] = (
    Field("url"),
    Field("key", decode=None),
    Field("source", decode=None),
    Field("shard", decode=None),
    Field("source_key"),
    Field("text"),
    Field("captions", _captions_out, _captions_in, _is_caption_list, "captions"),
    Field("specialists", _specialists_out, _specialists_in, _is_dict, "specialists/meta"),
    Field("meta", _meta_dict, _meta_text, _is_dict, "specialists/meta"),
    Field("clip_score", _f32),
    Field("clip_cosine", _f32),
    Field("clip_model"),
    Field("delta_loss", _f32),
    Field("logp_small", _f32),
    Field("logp_large", _f32),
    Field("width", decode=values.as_int),
    Field("height", decode=values.as_int),
    Field("sha256"),
    Field("phash", _phash_hex, _phash_int),
    Field("flags", _flags, _flags, _is_list, "flags"),
)


# PAIR_SCHEMA columns the sample json leaves out: the image is its own member; the rest are this run's
# working state (a published row is kept, so it has no drop reason) or too large to publish.
FROM_MEMBERS = frozenset({"image", "image_format"})
NOT_PUBLISHED = frozenset({"embedding", "thumb", "drop_reason", "drop_stage", "quarantined", "run_metrics"})


def txt_source_json(txt_source: Mapping[str, Any] | None) -> dict[str, Any]:
    """Lineage of the caption in ``<key>.txt`` (written only: the row keeps every caption anyway)."""
    if txt_source is None:
        return {"round": 0, "model": "original"}
    return {"round": txt_source.get("round"), "model": txt_source.get("model"),
            "prompt_id": txt_source.get("prompt_id"), "params_hash": txt_source.get("params_hash")}


def sample_json(row: Mapping[str, Any], txt_source: Mapping[str, Any] | None) -> dict[str, Any]:
    """The ``<key>.json`` member: url (what sidecars are keyed by), lineage, scores and source metadata."""
    out = {f.name: f.encode(row.get(f.name)) for f in FIELDS}
    out["txt_source"] = txt_source_json(txt_source)
    return out


def sample_bytes(row: Mapping[str, Any], txt_source: Mapping[str, Any] | None) -> bytes:
    """``sample_json`` serialised as written to the tar: sorted keys, UTF-8, no NaN."""
    return json.dumps(sample_json(row, txt_source), sort_keys=True, ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def image_member(files: Mapping[str, bytes]) -> str | None:
    """The extension of the sample's image member (the first one VILA reads), or None."""
    return next((e for e in files if IMAGE_EXTENSIONS.get(e) in VILA_IMAGE_FORMATS), None)


def row_fields(files: Mapping[str, bytes]) -> tuple[dict[str, Any], str | None]:
    """Pair-row fields from one sample's members (extension -> bytes), and why it is unusable, if it is.

    The problem is a quarantine reason. Shape and image problems come with no fields; a value that
    fails to decode (a pHash that is not hex) comes with every other field, as the row to quarantine.
    """
    try:
        info = json.loads(files.get("json", b"{}"))
    except ValueError as e:
        return {}, f"json_invalid: {values.short_error(e)}"
    # our own output, but a round's input may have been edited: check the shapes the decoders need
    if not isinstance(info, dict):
        return {}, "json_invalid: not an object"
    for f in FIELDS:
        if f.shape is not None and not f.shape(info.get(f.name)):
            return {}, f"json_invalid: {f.problem}"
    ext = image_member(files)
    if ext is None:
        return {}, "missing_image"
    fields: dict[str, Any] = {"image": files[ext], "image_format": ext}
    problem = None
    for f in FIELDS:
        if f.decode is None:
            continue
        try:
            fields[f.name] = f.decode(info.get(f.name))
        except ValueError:
            problem = problem or f"json_invalid: {f.name}"
    return fields, problem
