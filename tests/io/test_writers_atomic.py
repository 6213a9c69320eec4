"""Atomic writes: atomic_open leaves either the whole new file or nothing, never a temp file."""

from __future__ import annotations

from pathlib import Path

import fsspec
import pytest

from tests.helpers.writers import all_files
from vila2_curate.pipelines.io.writers.atomic import atomic_open, is_temp_name, write_json_atomic

# ---------------------------------------------------------------- atomic writes


def test_atomic_open_removes_temp_on_exception(tmp_path: Path) -> None:
    fs = fsspec.filesystem("file")
    target = str(tmp_path / "sub" / "x.json")
    with pytest.raises(RuntimeError), atomic_open(fs, target) as f:
        f.write(b"partial")
        assert any(is_temp_name(p) for p in all_files(tmp_path))
        raise RuntimeError("killed")
    assert all_files(tmp_path) == []
    write_json_atomic(fs, target, {"b": 1, "a": [1, 2]})
    assert all_files(tmp_path) == ["sub/x.json"]
    assert (tmp_path / "sub/x.json").read_text() == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1\n}\n'


def test_atomic_open_replaces_existing_file(tmp_path: Path) -> None:
    fs = fsspec.filesystem("file")
    target = str(tmp_path / "x.bin")
    for payload in (b"one", b"two"):
        with atomic_open(fs, target) as f:
            f.write(payload)
    assert (tmp_path / "x.bin").read_bytes() == b"two"
    assert all_files(tmp_path) == ["x.bin"]
