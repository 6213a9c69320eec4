"""Source values coerced to what the row schema holds (ints, floats, strings, the JSON ``meta`` object) and
short error texts: shared by the readers and the row <-> sample JSON codec."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any


def _json_default(v: Any) -> Any:
    if isinstance(v, bytes | bytearray | memoryview):
        return {"__bytes__": len(v)}  # never inline payloads in meta; record that a blob was there
    if hasattr(v, "isoformat"):
        return v.isoformat()
    if hasattr(v, "tolist"):
        return v.tolist()
    if hasattr(v, "item"):
        return v.item()
    if isinstance(v, set | frozenset):
        return sorted(v, key=str)
    return str(v)


def _clean_floats(v: Any) -> Any:
    """NaN / inf are not JSON; map them to null so every meta string parses with any JSON reader."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {str(k): _clean_floats(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_clean_floats(x) for x in v]
    return v


def to_meta_json(fields: Mapping[str, Any]) -> str | None:
    """Source fields passed through as a sorted JSON object (None when there is nothing to keep)."""
    if not fields:
        return None
    return json.dumps(_clean_floats(dict(fields)), sort_keys=True, ensure_ascii=False, default=_json_default)


def as_int(v: Any) -> int | None:
    """An int32-safe integer or None (bools and floats with a fraction are not integers here)."""
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, float):
        if not math.isfinite(v) or v != int(v):
            return None
        v = int(v)
    if isinstance(v, int) and -(2**31) <= v < 2**31:
        return v
    return None


def as_float(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    f = float(v)
    return f if math.isfinite(f) else None


def as_str(v: Any) -> str | None:
    if v is None:
        return None
    return v if isinstance(v, str) else str(v)


def short_error(e: BaseException, limit: int = 160) -> str:
    msg = f"{type(e).__name__}: {e}"
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."
