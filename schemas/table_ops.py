"""Small Arrow helpers every stage uses to read and set columns without touching other columns."""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa


def replace_columns(table: pa.Table, columns: dict[str, list[Any] | pa.Array]) -> pa.Table:
    """Return ``table`` with the named columns replaced (types taken from the table's schema)."""
    for name, values in columns.items():
        idx = table.schema.get_field_index(name)
        if idx < 0:
            raise KeyError(f"column {name!r} is not in the schema")
        field = table.schema.field(idx)
        arr = values if isinstance(values, pa.Array | pa.ChunkedArray) else pa.array(values, type=field.type)
        table = table.set_column(idx, field, arr)
    return table


def alive(table: pa.Table) -> list[bool]:
    """Per row: True while no stage has dropped or quarantined it."""
    return [r is None for r in table.column("drop_reason").to_pylist()]


def reason_class(reason: str | None) -> str | None:
    """The category of a drop reason (the part before the first ':'), used for counting."""
    return None if reason is None else reason.split(":", 1)[0].strip()


def json_object(raw: str | None) -> dict[str, Any]:
    """A JSON-object column value (run_metrics, specialists.models) as a dict; {} when empty or not an object."""
    if not raw:
        return {}
    try:
        val = json.loads(raw)
    except ValueError:
        return {}
    return val if isinstance(val, dict) else {}
