"""Text decoding for untrusted input: one bad string quarantines its row, never ends the run.

Three ways invalid text reaches a reader, and where each is caught:

- Arrow ``string`` columns holding invalid UTF-8 (a broken parquet writer; pyarrow does not validate on
  read, and ``to_pylist`` then raises ``UnicodeDecodeError`` for the whole batch): ``arrow_records``
  converts the batch row by row only when the fast path fails, and names the bad columns per row.
- Bytes decoded by a reader (jsonl lines, tar ``.txt`` / ``.json`` members): ``decode_utf8`` /
  ``loads_json`` return a reason instead of raising.
- Lone surrogates: valid JSON (``"\\ud800"``) and tar names decoded with ``surrogateescape`` yield Python
  strings that Arrow cannot encode, which would crash the batch far from the reader. ``scrub_row`` runs on
  every row at the one place all readers build their tables (``batched_tables``): it replaces such strings
  with an escaped form and quarantines the row with ``invalid_utf8: <field>``.

Reasons all start with ``invalid_utf8`` so stats count them as one class; the part after ``:`` names the
column or field.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pyarrow as pa

INVALID_UTF8 = "invalid_utf8"


def invalid_utf8_reason(fields: list[str] | str) -> str:
    names = [fields] if isinstance(fields, str) else fields
    return f"{INVALID_UTF8}: {', '.join(names)}"


def decode_utf8(data: bytes) -> str | None:
    """Strict UTF-8 (a leading BOM removed), or None when the bytes are not UTF-8."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return None


def lossy_text(value: Any) -> Any:
    """Bytes (also nested in lists / dicts) decoded with U+FFFD for invalid sequences, for quarantine."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, list):
        return [lossy_text(v) for v in value]
    if isinstance(value, dict):
        return {lossy_text(k): lossy_text(v) for k, v in value.items()}
    if isinstance(value, str):
        return escape_surrogates(value)
    return value


def escape_surrogates(s: str) -> str:
    """``s`` with lone surrogates written as ``\\udcff`` escapes (Arrow and JSON writers reject them)."""
    return s.encode("utf-8", "backslashreplace").decode("utf-8")


def has_surrogates(s: str) -> bool:
    if s.isascii():
        return False
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def loads_json(data: bytes) -> tuple[Any, str | None]:
    """(parsed value, None) or (None, problem) where problem is ``"invalid_utf8"`` or ``"invalid_json"``.

    ``json.loads`` would accept the bytes in UTF-16/32 too and report bad UTF-8 as a generic ValueError;
    decoding first keeps the two problems apart.
    """
    text = decode_utf8(data)
    if text is None:
        return None, INVALID_UTF8
    try:
        return json.loads(text), None
    except (ValueError, RecursionError):  # RecursionError: deeply nested arrays in hostile input
        return None, "invalid_json"


# --------------------------------------------------------------------------------------------- arrow


def _binary_type(t: pa.DataType) -> pa.DataType:
    """``t`` with every string type replaced by its binary twin (a cast that never validates UTF-8)."""
    if pa.types.is_string(t):
        return pa.binary()
    if pa.types.is_large_string(t):
        return pa.large_binary()
    if pa.types.is_large_list(t):
        return pa.large_list(_binary_type(t.value_type))
    if pa.types.is_list(t):
        return pa.list_(_binary_type(t.value_type))
    if pa.types.is_struct(t):
        return pa.struct([pa.field(f.name, _binary_type(f.type), f.nullable) for f in t])
    if pa.types.is_map(t):
        return pa.map_(_binary_type(t.key_type), _binary_type(t.item_type))
    if pa.types.is_dictionary(t):  # a parquet written from a categorical column reads back as this
        return pa.dictionary(t.index_type, _binary_type(t.value_type), t.ordered)
    if pa.types.is_fixed_size_list(t):
        return pa.list_(_binary_type(t.value_type), t.list_size)
    return t


def _as_binary(cell: pa.Array) -> pa.Array:
    """The cell with its text as bytes; a dictionary is decoded first (a cast keeps its indices)."""
    if pa.types.is_dictionary(cell.type):
        cell = cell.dictionary_decode()
    return cell.cast(_binary_type(cell.type))


def _has_text(t: pa.DataType) -> bool:
    return _binary_type(t) != t


def arrow_records(batch: pa.RecordBatch | pa.Table) -> Iterator[tuple[dict[str, Any], list[str]]]:
    """Yield (record, bad_columns) per row; a bad column's value is its text decoded with U+FFFD.

    Fast path: ``to_pylist`` on the whole batch. Only a batch that fails it is converted row by row, and
    only its text columns cell by cell, so valid data pays nothing.
    """
    try:
        rows = batch.to_pylist()
    except UnicodeDecodeError:
        pass
    else:
        for rec in rows:
            yield rec, []
        return
    names = batch.schema.names
    text_cols = {n for n, f in zip(names, batch.schema, strict=True) if _has_text(f.type)}
    columns = [batch.column(i) for i in range(batch.num_columns)]
    for i in range(batch.num_rows):
        rec: dict[str, Any] = {}
        bad: list[str] = []
        for name, col in zip(names, columns, strict=True):
            cell = col.slice(i, 1)
            try:
                rec[name] = cell.to_pylist()[0]
            except UnicodeDecodeError:
                if name not in text_cols:
                    raise
                rec[name] = lossy_text(_as_binary(cell).to_pylist()[0])
                bad.append(name)
        yield rec, bad


# ----------------------------------------------------------------------------------------------- rows


def scrub_row(row: dict[str, Any]) -> dict[str, Any]:
    """Escape lone surrogates in any string of ``row``; quarantine the row naming the fields, if any.

    Payload columns are bytes and are not touched. A row already quarantined keeps its first reason.
    """
    bad: list[str] = []
    for field, value in row.items():
        if isinstance(value, str):
            if has_surrogates(value):
                row[field] = escape_surrogates(value)
                bad.append(field)
        elif isinstance(value, list | dict) and _nested_surrogates(value):
            row[field] = _escape_nested(value)
            bad.append(field)
    if bad and not row.get("quarantined"):
        row["drop_reason"] = invalid_utf8_reason(bad)
        row["drop_stage"] = "read"
        row["quarantined"] = True
    return row


def _nested_surrogates(value: Any) -> bool:
    if isinstance(value, str):
        return has_surrogates(value)
    if isinstance(value, list):
        return any(_nested_surrogates(v) for v in value)
    if isinstance(value, dict):
        return any(_nested_surrogates(k) or _nested_surrogates(v) for k, v in value.items())
    return False


def _escape_nested(value: Any) -> Any:
    """Strings escaped, everything else (image bytes included) as it is."""
    if isinstance(value, str):
        return escape_surrogates(value)
    if isinstance(value, list):
        return [_escape_nested(v) for v in value]
    if isinstance(value, dict):
        return {_escape_nested(k): _escape_nested(v) for k, v in value.items()}
    return value
