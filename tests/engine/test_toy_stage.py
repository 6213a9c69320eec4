"""Adding a stage touches its config class, its stage class and one registry line: this file does exactly
that (nothing else in the project knows the toy stage) and runs it on every engine."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from tests.helpers.runs import output_files, write_config
from vila2_curate.pipelines.executors.local import run_local
from vila2_curate.schemas.config import _Strict, load_config
from vila2_curate.schemas.registry import register_stage
from vila2_curate.schemas.stage import StageBase
from vila2_curate.schemas.table_ops import replace_columns


class ToyConfig(_Strict):  # 1. the config class
    type: Literal["toy_every_n"] = "toy_every_n"
    every: int = 3


class ToyStage(StageBase):  # 2. the stage class: drops the alive rows whose key hashes to 0 mod `every`
    name = "toy"
    version = "1"

    def __init__(self, cfg: ToyConfig) -> None:
        self.cfg = cfg

    def __call__(self, batch: pa.Table) -> pa.Table:
        drop, stage = batch.column("drop_reason").to_pylist(), batch.column("drop_stage").to_pylist()
        for i, key in enumerate(batch.column("key").to_pylist()):
            if drop[i] is None and hashlib.sha256(key.encode()).digest()[0] % self.cfg.every == 0:
                drop[i], stage[i] = f"toy_every_{self.cfg.every}", self.name
        return replace_columns(batch, {"drop_reason": drop, "drop_stage": stage})


register_stage(ToyConfig, ToyStage)  # 3. the registry line

STAGES = [{"type": "normalize"}, {"type": "toy_every_n", "every": 3}]


def _config(sample_dir: Path, tmp: Path, engine: str) -> Path:
    """The quickstart sources cut to the img2dataset and MMC4 ones (small and fast), with the toy stage."""
    path = write_config(sample_dir, tmp / "out", tmp / "run.yaml", stages=STAGES, sources=["img2dataset", "mmc4"])
    raw = yaml.safe_load(path.read_text())
    raw["engine"] = engine
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _published_keys(out: Path) -> set[str]:
    import tarfile

    keys = set()
    for t in out.rglob("*.tar"):
        with tarfile.open(t) as tf:
            keys |= {m.name.split(".")[0] for m in tf.getmembers()}
    return keys


@pytest.fixture(scope="module")
def local_out(sample_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("toy_local")
    run_local(load_config(_config(sample_dir, tmp, "local")), progress=False)
    return tmp / "out"


def test_toy_stage_runs_locally_and_its_drops_are_accounted(local_out: Path):
    rejects = pa.concat_tables([pq.read_table(p) for p in sorted((local_out / "rejects").rglob("*.parquet"))])
    toy = [r for r in rejects.to_pylist() if r["stage"] == "toy"]
    assert toy and {r["reason"] for r in toy} == {"toy_every_3"}
    for r in toy:
        assert hashlib.sha256(r["key"].encode()).digest()[0] % 3 == 0
    img2dataset = {r["key"] for r in toy if r["source"] == "img2dataset"}
    published = _published_keys(local_out)
    assert img2dataset and not img2dataset & published  # dropped rows are not in the shards
    assert any(hashlib.sha256(k.encode()).digest()[0] % 3 for k in published)
    stats = json.loads((local_out / "stats.json").read_text())
    manifest = json.dumps(pq.read_table(local_out / "manifest.parquet").to_pylist(), default=str)
    assert "toy" in manifest  # the stage version goes to the manifest like a built-in's
    assert "toy" in json.dumps(stats)


def test_toy_stage_on_ray_matches_local(ray_cluster, local_out: Path, sample_dir: Path, tmp_path: Path):
    from vila2_curate.pipelines.executors.ray_data import run_ray

    ray_cluster.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    run_ray(load_config(_config(sample_dir, tmp_path, "ray")), progress=False)
    assert output_files(tmp_path / "out") == output_files(local_out)


def test_toy_stage_on_beam_matches_local(local_out: Path, sample_dir: Path, tmp_path: Path):
    from vila2_curate.pipelines.executors.beam import run_beam

    run_beam(load_config(_config(sample_dir, tmp_path, "beam")), progress=False)
    assert output_files(tmp_path / "out") == output_files(local_out)
