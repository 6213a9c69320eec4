"""Local, Ray Data and Beam run the same plan to the same bytes: shards, stats, kept keys, reasons."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import output_files, write_config

from pipelines.executors.local import run_local
from pipelines.validate import validate_output
from schemas.config import load_config


def _reasons(out: Path) -> dict[tuple[str, str], str]:
    rows = {}
    for p in sorted((out / "rejects").rglob("*.parquet")):
        for r in pq.read_table(p).to_pylist():
            rows[(r["source"], r["key"])] = r["reason"]
    return rows


@pytest.fixture(scope="module")
def local_out(sample_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("engines_local")
    run_local(load_config(write_config(sample_dir, tmp / "out", tmp / "run.yaml")), progress=False)
    return tmp / "out"


def test_ray_engine_matches_local(ray_cluster, local_out: Path, sample_dir: Path, tmp_path: Path):
    from pipelines.executors.ray_data import run_ray

    cfg = load_config(write_config(sample_dir, tmp_path / "out", tmp_path / "run.yaml"), {"engine": "ray"})
    stats = run_ray(cfg, progress=False)
    assert stats["balanced"]
    assert output_files(tmp_path / "out") == output_files(local_out)
    assert _reasons(tmp_path / "out") == _reasons(local_out)
    assert validate_output(str(tmp_path / "out")) == []


def test_beam_engine_matches_local(local_out: Path, sample_dir: Path, tmp_path: Path):
    pytest.importorskip("apache_beam")
    from pipelines.executors.beam import run_beam

    cfg = load_config(write_config(sample_dir, tmp_path / "out", tmp_path / "run.yaml"), {"engine": "beam"})
    stats = run_beam(cfg, progress=False)
    assert stats["balanced"]
    assert output_files(tmp_path / "out") == output_files(local_out)
    assert _reasons(tmp_path / "out") == _reasons(local_out)
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["total"]["rows_in"] == 151
