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


def write_config(sample: Path, out: Path, dest: Path, *, stages: list | None = None, **output) -> Path:
    """configs/quickstart.yaml re-pointed at ``sample`` and ``out`` (optionally other stages/output keys)."""
    import yaml

    raw = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    for src in raw["sources"]:
        src["paths"] = [p.replace("../sample", str(sample)) for p in src["paths"]]
        for k in ("image_root", "image_dir"):
            if k in src:
                src[k] = src[k].replace("../sample", str(sample))
    raw["output"]["path"] = str(out)
    raw["output"].update(output)
    if stages is not None:
        raw["stages"] = stages
    for stage in raw["stages"]:
        for k, v in list(stage.items()):
            if isinstance(v, str) and v.startswith("../sample"):
                stage[k] = v.replace("../sample", str(sample))
    dest.write_text(yaml.safe_dump(raw, sort_keys=False))
    return dest


def write_round_config(sample: Path, root: Path, dest: Path, *, name: str, seed: int = 0,
                       after: list | None = None) -> Path:
    """A recaption round over ``root/r{prev_round}`` -> ``root/r{round}`` with the demo VLM, then ``after``."""
    import yaml

    stages: list[dict] = [{
        "type": "recaption", "prompts": "self_augment",
        "captioner": {"model": str(sample / "models" / "vlm"), "model_tag": "demo-vlm",
                      "generation": {"max_new_tokens": 12, "seed": seed}, "runtime": {"batch_size": 8}},
    }, *(after or [])]
    raw = {"name": f"{name}-r{{round}}", "batch_size": 16,
           "sources": [{"name": "prev", "kind": "vila_wds", "paths": [str(root / "r{prev_round}")]}],
           "stages": stages, "output": {"path": str(root / "r{round}"), "shard_max_samples": 64}}
    dest.write_text(yaml.safe_dump(raw, sort_keys=False))
    return dest


def tiny_valid_output(tmp: Path, out: Path) -> None:
    """A 2-row COYO run: the smallest output that passes `vila2-curate validate`."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from vila2_curate.pipelines.executors.local import run_local
    from vila2_curate.schemas.config import load_config

    def jpeg(shade: int) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", (320, 240), (shade, 90, 200 - shade)).save(buf, format="JPEG")
        return buf.getvalue()

    (tmp / "coyo").mkdir()
    pq.write_table(pa.table({"id": [1, 2], "url": ["http://a/1.jpg", "http://a/2.jpg"],
                             "text": ["a cat", "a dog"], "image": [jpeg(10), jpeg(150)]}),
                   tmp / "coyo" / "part-0.parquet")
    cfg = tmp / "run.yaml"
    cfg.write_text(f"sources: [{{name: c, kind: coyo_parquet, paths: ['{tmp}/coyo/*.parquet'], "
                   f"image_column: image}}]\noutput: {{path: '{out}'}}\n")
    assert run_local(load_config(cfg), progress=False)["balanced"]


def output_files(root: Path) -> dict[str, bytes]:
    """The files a run publishes whose bytes must not depend on engine, interruption or batch size."""
    keep = (".tar", ".pkl", ".count")
    files = {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
             if p.is_file() and (p.suffix in keep or p.name in ("stats.json", "wids-meta.json"))
             and "_work" not in p.parts}
    return files


def assert_same_stage_timings(out: Path, ref: Path) -> None:
    """timings.json names the same steps, with the same row counts, whatever engine ran them."""
    import json

    mine, theirs = (json.loads((p / "timings.json").read_text())["stages"] for p in (out, ref))
    assert sorted(mine) == sorted(theirs)
    assert {k: v["rows"] for k, v in mine.items()} == {k: v["rows"] for k, v in theirs.items()}
    assert all(v["seconds"] > 0 for v in mine.values()), mine


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
