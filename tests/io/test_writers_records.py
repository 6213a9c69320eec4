"""Record writers: rejects, quarantine, wids-meta.json and manifest.parquet."""

from __future__ import annotations

import json
from pathlib import Path

import fsspec
import pyarrow.parquet as pq
import pytest

from tests.helpers.rows import doc_row, pair_row, pairs
from tests.helpers.writers import write_pairs
from vila2_curate.pipelines.io.writers.records import (
    manifest_row,
    write_manifest,
    write_quarantine,
    write_rejects,
    write_wids_meta,
)
from vila2_curate.schemas.records import MANIFEST_SCHEMA, REJECTS_SCHEMA
from vila2_curate.schemas.rows import DOCUMENT_SCHEMA, PAIR_SCHEMA, make_table

# ---------------------------------------------------------------- records


def test_rejects_and_quarantine(tmp_path: Path) -> None:
    fs = fsspec.filesystem("file")
    rows = [pair_row(0), pair_row(1, drop_reason="too_small", drop_stage="normalize"),
            pair_row(2, quarantined=True, drop_reason="undecodable", drop_stage="read")]
    table = make_table(rows, PAIR_SCHEMA)
    rel = write_rejects(fs, str(tmp_path), "coyo", "00000", table)
    assert rel == "rejects/coyo/00000.parquet"
    rej = pq.read_table(tmp_path / rel)
    assert rej.schema.equals(REJECTS_SCHEMA)
    assert rej.to_pylist() == [
        {"key": "k00001", "source": "coyo", "shard": "00000", "source_key": "1", "url": rows[1]["url"],
         "stage": "normalize", "reason": "too_small", "quarantined": False},
        {"key": "k00002", "source": "coyo", "shard": "00000", "source_key": "2", "url": rows[2]["url"],
         "stage": "read", "reason": "undecodable", "quarantined": True}]
    qrel = write_quarantine(fs, str(tmp_path), "coyo", "00000", table)
    q = pq.read_table(tmp_path / qrel)
    assert q.column("key").to_pylist() == ["k00002"] and q.column("image")[0].as_py() == rows[2]["image"]
    assert write_quarantine(fs, str(tmp_path), "coyo", "00001", pairs(2)) is None
    # empty rejects still written (a finished shard always has one); document rows work too
    docs = make_table([doc_row(0, 1, drop_reason="dup_doc", drop_stage="dedup")], DOCUMENT_SCHEMA)
    assert pq.read_table(tmp_path / write_rejects(fs, str(tmp_path), "mmc4", "x", docs)).num_rows == 1
    assert pq.read_table(tmp_path / write_rejects(fs, str(tmp_path), "coyo", "00002", pairs(1))).num_rows == 0
    none = write_rejects(fs, str(tmp_path), "coyo", "00003", None)
    assert pq.read_table(tmp_path / none).schema.equals(REJECTS_SCHEMA)
    slim = table.drop_columns(["image"])  # payload columns are optional
    assert pq.read_table(tmp_path / write_rejects(fs, str(tmp_path), "coyo", "00004", slim)).num_rows == 2
    with pytest.raises(ValueError):
        write_rejects(fs, str(tmp_path), "coyo", "../up", table)


def test_wids_meta_and_manifest(tmp_path: Path) -> None:
    fs = fsspec.filesystem("file")
    files = write_pairs(tmp_path, pairs(15), batch=15, max_samples=10)
    write_wids_meta(fs, str(tmp_path), "coyo-curated", list(reversed(files)))
    meta = json.loads((tmp_path / "wids-meta.json").read_text())
    assert meta == {"name": "coyo-curated", "__kind__": "VILA-WebDataset", "wids_version": 1, "shardlist": [
        {"url": f.relpath, "nsamples": f.nsamples, "filesize": f.bytes} for f in files]}
    rows = [manifest_row(f, kind="wds", source="coyo", input_shards=["00000"], config_hash="abc",
                         stage_versions={"normalize": "1"}) for f in reversed(files)]
    write_manifest(fs, str(tmp_path), rows)
    man = pq.read_table(tmp_path / "manifest.parquet")
    assert man.schema.equals(MANIFEST_SCHEMA)
    assert man.column("shard").to_pylist() == [f.relpath for f in files]
    assert man.column("sha256").to_pylist() == [f.sha256 for f in files]
    assert json.loads(man.column("stage_versions")[0].as_py()) == {"normalize": "1"}
