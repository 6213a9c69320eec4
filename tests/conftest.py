"""Quiet, offline defaults for every test; shared fixtures."""

from __future__ import annotations

import os
import sys
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

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The realistic offline sample (`vila2-curate sample`), written once per test session."""
    from pipelines.sample import write_sample

    out = tmp_path_factory.mktemp("sample")
    write_sample(str(out), seed=0)
    return out
