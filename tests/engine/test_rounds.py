"""Recaption rounds end to end: lineage kept across rounds, sidecars in VILA's layout, resume, Ray job."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from tests.helpers.runs import ROOT, assert_same_stage_timings, output_files, write_config, write_round_config
from vila2_curate.pipelines.executors.local import run_local
from vila2_curate.pipelines.validate import read_vila_samples, validate_output
from vila2_curate.schemas.config import load_config

CURATE = [{"type": "normalize"}, {"type": "dedup", "methods": ["exact", "phash"]}]


def _round_config(sample: Path, root: Path, dest: Path, *, specialists: bool = True) -> Path:
    after = [{"type": "ocr"}, {"type": "grounding", "model": str(sample / "models" / "owlv2"),
                               "box_threshold": 0.0}, {"type": "spatial"}] if specialists else []
    return write_round_config(sample, root, dest, name="t", after=after)


@pytest.fixture(scope="module")
def models(sample_dir: Path) -> Path:
    return sample_dir / "models"  # the session fixture builds every demo model, as `vila2-curate sample` does


@pytest.fixture(scope="module")
def r0(sample_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small curated round 0: the two COYO sources only (keeps the model rounds fast)."""
    tmp = tmp_path_factory.mktemp("rounds")
    cfg = write_config(sample_dir, tmp / "r0", tmp / "r0.yaml", stages=CURATE, sources=["coyo_bytes", "coyo_paths"])
    run_local(load_config(cfg), progress=False)
    return tmp


def _captions(root: Path) -> dict[str, list[dict]]:
    return {s["__key__"]: s[".json"]["captions"] for s in read_vila_samples(str(root))}


def test_round_1_then_2_keep_lineage_and_write_sidecars(r0: Path, sample_dir: Path, models: Path):
    cfg = _round_config(sample_dir, r0, r0 / "round.yaml")
    s1 = run_local(load_config(cfg, round=1), progress=False)
    assert s1["balanced"] and s1["total"]["kept"] > 10
    assert validate_output(str(r0 / "r1")) == []
    caps1 = _captions(r0 / "r1")
    assert set(caps1) == set(_captions(r0 / "r0"))
    for key, caps in caps1.items():
        assert [c["round"] for c in caps] == [1], key
        c = caps[0]
        assert c["model"] == "demo-vlm" and "demo_model" in c["flags"]
        assert c["prompt_id"] and c["params_hash"] and c["created_at"].endswith("Z")

    # tars keep their names across rounds; sidecars mirror them and are keyed by each sample's url
    tars0 = sorted(p.relative_to(r0 / "r0") for p in (r0 / "r0").rglob("*.tar"))
    tars1 = sorted(p.relative_to(r0 / "r1") for p in (r0 / "r1").rglob("*.tar"))
    assert tars0 == tars1
    folders = sorted(p.name for p in (r0 / "r1" / "captions").iterdir())
    assert folders == ["r1-demo-vlm", "specialist_bbox_interleaved", "specialist_ocr", "specialist_spatial"]
    samples = {s[".json"]["url"]: s for s in read_vila_samples(str(r0 / "r1"))}
    side = json.loads((r0 / "r1" / "captions" / "r1-demo-vlm" / f"{tars1[0]}.json").read_text())
    assert side and set(side) <= set(samples)
    for url, entry in side.items():
        cap = samples[url][".json"]["captions"][-1]
        assert entry == {"output": cap["text"]} and not {"truncated", "refusal", "empty"} & set(cap["flags"])
    ocr = json.loads((r0 / "r1" / "captions" / "specialist_ocr" / f"{tars1[0]}.json").read_text())
    assert any("The text in the image reads" in e["output"] for e in ocr.values())

    # round 2 appends, never overwrites round 1
    cfg2 = _round_config(sample_dir, r0, r0 / "round2.yaml", specialists=False)
    run_local(load_config(cfg2, round=2), progress=False)
    caps2 = _captions(r0 / "r2")
    for key, caps in caps2.items():
        assert [c["round"] for c in caps] == [1, 2], key
        assert caps[0] == caps1[key][0]
    assert validate_output(str(r0 / "r2")) == []


def test_rerun_round_does_nothing_and_resume_is_identical(r0: Path, sample_dir: Path, models: Path,
                                                          tmp_path: Path):
    root = tmp_path / "rr"
    shutil.copytree(r0 / "r0", root / "r0")
    cfg = load_config(_round_config(sample_dir, root, tmp_path / "round.yaml", specialists=False), round=1)
    run_local(cfg, progress=False)
    clean = output_files(root / "r1")
    # keep only the run's recorded start time (what a killed run leaves behind), then interrupt and resume
    for p in (root / "r1").iterdir():
        if p.name != "_progress":
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    for p in (root / "r1" / "_progress").iterdir():
        if p.name != "run.json":
            shutil.rmtree(p)
    with pytest.raises(InterruptedError):
        run_local(cfg, progress=False, max_shards=1)
    run_local(cfg, progress=False)
    assert output_files(root / "r1") == clean
    before = {p: p.stat().st_mtime_ns for p in (root / "r1").rglob("*.tar")}
    run_local(cfg, progress=False, max_shards=0)  # raises if anything still had work
    assert before == {p: p.stat().st_mtime_ns for p in (root / "r1").rglob("*.tar")}


@pytest.mark.parametrize("engine", ["ray", "beam"])
def test_round_timings_name_every_stage_on_every_engine(r0: Path, sample_dir: Path, models: Path, tmp_path: Path,
                                                        engine: str, request):
    """A recaption round's timings.json: the same steps and row counts on Ray and Beam as locally."""
    if engine == "ray":
        request.getfixturevalue("ray_cluster")
    else:
        pytest.importorskip("apache_beam")
    from vila2_curate.pipelines.executors.beam import run_beam
    from vila2_curate.pipelines.executors.ray_data import run_ray

    runners = {"local": run_local, "ray": run_ray, "beam": run_beam}
    runs = {}
    for name in ("local", engine):
        root = tmp_path / name
        shutil.copytree(r0 / "r0", root / "r0")
        cfg = write_round_config(sample_dir, root, tmp_path / f"{name}.yaml", name="t", after=[{"type": "spatial"}])
        runners[name](load_config(cfg, {"engine": name}, round=1), progress=False)
        runs[name] = root / "r1"
    assert_same_stage_timings(runs[engine], runs["local"])
    stages = json.loads((runs[engine] / "timings.json").read_text())["stages"]
    assert {"read", "recaption_r1", "spatial", "write"} <= set(stages)


def test_round_needs_round_flag(r0: Path, sample_dir: Path, tmp_path: Path):
    from vila2_curate.schemas.config import ConfigError

    with pytest.raises(ConfigError, match="--round"):
        load_config(_round_config(sample_dir, r0, tmp_path / "x.yaml"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ray_job_submit_runs_a_round(r0: Path, sample_dir: Path, models: Path, tmp_path: Path):
    """`ray job submit --working-dir . -- python pipelines/recaption.py ...` against a real local cluster."""
    pytest.importorskip("ray")
    ray_bin = Path(sys.executable).with_name("ray")
    root = tmp_path / "job"
    shutil.copytree(r0 / "r0", root / "r0")
    cfg = _round_config(sample_dir, root, tmp_path / "round.yaml", specialists=False)
    # a throwaway loopback cluster: no token auth (Ray 2.5x+ enables it by default for `ray start`)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
           "PATH": f"{ray_bin.parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # `python` = this venv
    gcs, dash = _free_port(), _free_port()
    # every fixed default port moved: the test session's own cluster already holds them (agent 52365...)
    ports = [f"--{name}={_free_port()}" for name in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
        "ray-client-server-port", "runtime-env-agent-port", "node-manager-port", "object-manager-port")]
    temp = Path(os.environ.get("RAY_TMPDIR", tmp_path)) / "job-cluster"
    # --block keeps the head's processes in one process group that we end ourselves: `ray stop` would
    # stop every Ray process on the machine, including the test session's own cluster
    head = subprocess.Popen([str(ray_bin), "start", "--head", "--block", f"--port={gcs}", "--num-cpus=2",
                             "--include-dashboard=true", f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1",
                             f"--temp-dir={temp}", "--disable-usage-stats", *ports], env=env,
                            start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while True:  # the dashboard and its job agent come up a few seconds after the head starts
            job = subprocess.run(
                [str(ray_bin), "job", "submit", f"--address=http://127.0.0.1:{dash}", f"--working-dir={ROOT}",
                 "--", "python", "pipelines/recaption.py", "--config", str(cfg), "--round", "1", "--no-progress"],
                env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
            submitted = "submitted successfully" in job.stdout + job.stderr
            if job.returncode == 0 or submitted or time.time() > deadline:
                break
            time.sleep(3)
        assert job.returncode == 0, job.stdout[-6000:] + job.stderr[-3000:]
        assert '"balanced": true' in job.stdout
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
    assert validate_output(str(root / "r1")) == []
    caps = _captions(root / "r1")
    assert caps and all([c["round"] for c in v] == [1] for v in caps.values())
    with tarfile.open(next((root / "r1").rglob("*.tar"))) as tf:
        assert all(m.isreg() for m in tf.getmembers())
