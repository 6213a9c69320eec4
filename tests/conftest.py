"""Quiet, offline defaults for every test; shared fixtures."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Offline and quiet before any library reads its settings (see DEVELOPERS.md: hub lookups stall offline).
_TMP = Path(tempfile.mkdtemp(prefix="vila2-tests-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HOME", str(_TMP / "hf"))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TMPDIR", str(_TMP / "ray"))
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
os.environ.setdefault("AIRFLOW_HOME", str(_TMP / "airflow"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The realistic offline sample (`vila2-curate sample`), written once per test session."""
    from vila2_curate.pipelines.demo.detector import build_demo_detector
    from vila2_curate.pipelines.demo.models import build_demo_models
    from vila2_curate.pipelines.demo.sample import write_sample
    from vila2_curate.pipelines.demo.vlm import build_demo_vlm

    out = tmp_path_factory.mktemp("sample")
    write_sample(str(out), seed=0)
    # what `vila2-curate sample` also writes: every demo model the quickstart configs use
    build_demo_models(str(out / "models"), seed=0)
    build_demo_vlm(str(out / "models" / "vlm"), seed=0)
    build_demo_detector(str(out / "models" / "owlv2"), seed=0)
    return out


@pytest.fixture(scope="session")
def curated_sample(sample_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """``curated_sample(stages) -> output folder``: the sample curated on the local engine with those
    stages, run once per stage list for the whole session and shared by every test file that reads it.
    Read-only: a test that changes an output works on a copy."""
    import json

    from tests.helpers.runs import write_config
    from vila2_curate.pipelines.executors.local import run_local
    from vila2_curate.schemas.config import load_config

    runs: dict[str, Path] = {}

    def curated(stages: list[dict]) -> Path:
        key = json.dumps(stages, sort_keys=True)
        if key not in runs:
            tmp = tmp_path_factory.mktemp("curated")
            assert run_local(load_config(write_config(sample_dir, tmp / "out", tmp / "run.yaml", stages=stages)),
                             progress=False)["balanced"]
            runs[key] = tmp / "out"
        return runs[key]

    return curated


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory):
    """One local Ray cluster for the whole test session (starting one costs ~10 s). Four logical CPUs on
    the 2-core machine: the placement check wants a segment's reader, model pools and CPU stages to fit
    together (a recaption round with a CPU specialist needs 3)."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=4, include_dashboard=False, object_store_memory=400 * 1024**2,
             ignore_reinit_error=True, log_to_driver=False)
    yield ray
    ray.shutdown()
