"""A real 2-node Ray cluster, the way a user runs one: `ray start --head` + `ray start --address`, jobs through
`ray job submit`, input and output on an S3-compatible server (moto on 127.0.0.1, s3fs through each
config's ``storage_options``). The curation and then recaption round 1 (reading round 0 back from S3) must
validate and equal the same two runs on the local engine on local disk. And a Ray-engine run killed with
SIGKILL mid-run, then rerun, must give the bytes of an uninterrupted run.

One cluster serves the module (starting one costs ~30 s on 2 cores); it runs with ports of its own and is
ended by killing its process groups, never with `ray stop` (that would stop every Ray cluster on the machine).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from tests.helpers.cluster import AWS_ENV, RayCluster, S3Server, job_result, s3_config
from tests.helpers.runs import ROOT, output_files, write_config, write_round_config
from vila2_curate.pipelines.executors.local import run_local
from vila2_curate.pipelines.validate import read_vila_samples, validate_output
from vila2_curate.schemas.config import load_config

pytestmark = pytest.mark.slow

# Ray Data's and the Ray engine's task names: the ones that do the pipeline's work
PIPELINE_TASKS = ("MapBatches", "MapWorker(MapBatches", "HashShuffle", "assemble", "_call")
# model-free curation (its shards must be byte-identical on every engine and filesystem), every source kind
CURATE = [{"type": "normalize"}, {"type": "caption_hygiene"},
          {"type": "dedup", "methods": ["exact", "phash", "minhash_captions", "minhash_documents"]}]


# ------------------------------------------------------------------ comparisons


def _reason(reason: str) -> str:
    """A reason without the text of the exception that caused it: that names the file as its filesystem
    does (``[Errno 2] No such file or directory: '/tmp/...'`` on disk, ``bucket/key`` on S3)."""
    head, _, detail = reason.partition(": ")
    m = re.match(r"(\w+(?:Error|Exception))\b", detail)
    return f"{head}: {m.group(1)}" if m else reason


def _reasons(out: Path) -> dict[tuple[str, str], tuple[str, str]]:
    """(source, key) -> (stage, reason) for every dropped or quarantined row."""
    return {(r["source"], r["key"]): (r["stage"], _reason(r["reason"]))
            for p in sorted((out / "rejects").rglob("*.parquet")) for r in pq.read_table(p).to_pylist()}


def _kept(out: Path) -> dict[str, list[str]]:
    """Published keys per tar (pairs), in order; MMC4 documents by their pkl/count files (compared as bytes)."""
    kept: dict[str, list[str]] = {}
    for s in read_vila_samples(str(out)):
        kept.setdefault(s["__shard__"], []).append(s["__key__"])
    return kept


def _decisions(out: Path) -> dict[str, list[dict]]:
    cols = ["source", "key", "image_index", "drop_reason", "flag"]
    return {str(p.relative_to(out)): pq.read_table(p).select(cols).to_pylist()
            for p in sorted((out / "_work").glob("seg*/*.decisions.parquet"))}


def _captions(out: Path) -> dict[str, list[tuple]]:
    """Each published sample's caption lineage without the model's text and timestamps."""
    return {s["__key__"]: [(c["round"], c["model"], c["prompt_id"], c["params_hash"]) for c in s[".json"]["captions"]]
            for s in read_vila_samples(str(out))}


def _without_model_text(out: Path) -> dict[str, Any]:
    """A round's published samples with what the model wrote set aside (``texts``): every member's bytes
    (images, and each .json without its captions' text, flags and timestamp) must match across engines."""
    members: dict[str, Any] = {}
    texts = []
    for s in read_vila_samples(str(out)):
        for ext, value in s.items():
            if ext == ".json":
                value = {**value, "captions": [{k: v for k, v in c.items() if k not in ("text", "flags", "created_at")}
                                               for c in value["captions"]]}
                texts.extend(c["text"] for c in s[".json"]["captions"])
            elif ext == ".txt":
                texts.append(value)
                continue
            members[f"{s['__shard__']}/{s['__key__']}{ext}"] = value
    return {"members": members, "texts": texts}


def _assert_same_decisions(out: Path, ref: Path) -> None:
    assert _kept(out) == _kept(ref)
    assert _reasons(out) == _reasons(ref)
    assert _decisions(out) == _decisions(ref)


def _stats(out: Path) -> dict[str, Any]:
    return json.loads((out / "stats.json").read_text())


def _accounting(stats: dict[str, Any]) -> list[dict]:
    """Per input shard: rows in, kept, dropped, quarantined, reasons (not the counters of caption texts)."""
    return [{k: v for k, v in shard.items() if k != "counters"} for shard in stats["shards"]]


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    """Two nodes of one CPU each on 127.0.0.1; every node (so every worker and job) gets the AWS settings."""
    pytest.importorskip("ray")
    temp_root = Path(os.environ.get("RAY_TMPDIR") or tmp_path_factory.mktemp("ray"))
    with RayCluster(temp_root, nodes=2, cpus=1, env=AWS_ENV) as c:
        yield c


@pytest.fixture(scope="module")
def local_ref(sample_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: the curation (r0) and recaption round 1 (r1) on the local engine, on local disk."""
    root = tmp_path_factory.mktemp("cluster-local")
    assert run_local(load_config(write_config(sample_dir, root / "r0", root / "r0.yaml", stages=CURATE)),
                     progress=False)["balanced"]
    cfg = write_round_config(sample_dir, root, root / "round.yaml", name="t")
    assert run_local(load_config(cfg, round=1), progress=False)["balanced"]
    return root


# ------------------------------------------------------------------ 2 nodes, S3, ray job submit


def test_two_node_cluster_on_s3_matches_local_disk(cluster: RayCluster, local_ref: Path, sample_dir: Path,
                                                   tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The sample on S3; `ray job submit -- python pipelines/recaption.py` runs the curation (r0, S3 -> S3) and
    round 1 (r0 read back from S3 -> r1) on 2 nodes. Both validate on S3, both nodes did pipeline work, and
    they equal the local engine's runs on local disk: r0 byte for byte (tars, MMC4 pkl/count, wids-meta,
    stats.json) and in kept keys, reasons and per-shard decisions; r1 (a model stage) in kept keys, reasons,
    accounting, lineage, sidecar files and every member but the model's text."""
    pytest.importorskip("moto")
    pytest.importorskip("s3fs")
    for k, v in AWS_ENV.items():
        monkeypatch.setenv(k, v)
    assert len(cluster.alive_nodes()) == 2
    placeholder = tmp_path / "on-s3"  # local configs are written for this folder, then moved to s3://
    with S3Server() as s3:
        fs = s3.fs()
        fs.mkdir("vila2-in")
        fs.mkdir("vila2-out")
        for sub in ("img2dataset", "coyo", "mmc4"):  # the data; the demo models stay local checkpoints
            fs.put(str(sample_dir / sub), f"vila2-in/sample/{sub}", recursive=True)
        n_local = sum(1 for sub in ("img2dataset", "coyo", "mmc4") for p in (sample_dir / sub).rglob("*") if p.is_file())
        assert len(fs.find("vila2-in/sample")) == n_local
        moves = {str(sample_dir): "s3://vila2-in/sample", str(placeholder): "s3://vila2-out/run"}
        so = s3.storage_options
        cfg0 = s3_config(write_config(sample_dir, placeholder / "r0", tmp_path / "r0-local.yaml", stages=CURATE),
                         tmp_path / "r0.yaml", moves, so)
        cfg1 = s3_config(write_round_config(sample_dir, placeholder, tmp_path / "round-local.yaml", name="t"),
                         tmp_path / "round.yaml", moves, so)
        runtime_env = {"env_vars": AWS_ENV}
        results = {}
        timings = {}
        for name, args in (("r0", ["--config", str(cfg0)]), ("r1", ["--config", str(cfg1), "--round", "1"])):
            t = time.perf_counter()
            job = cluster.submit(["python", "pipelines/recaption.py", *args, "--no-progress"], working_dir=ROOT,
                                 runtime_env=runtime_env)
            timings[name] = round(time.perf_counter() - t, 1)
            results[name] = job_result(job.stdout)
        print(f"\nray job submit on 2 nodes, S3 in and out: {timings} s")
        for name in ("r0", "r1"):
            assert results[name]["balanced"] is True, results[name]
            assert results[name]["output"] == f"s3://vila2-out/run/{name}"
            # the validator reads s3:// itself, as VILA's loaders would read the published dataset
            assert validate_output(f"s3://vila2-out/run/{name}", so) == [], name
        # both nodes ran the pipeline's work (reader actors, stage and part-writing tasks, shard assembly)
        nodes = cluster.tasks_by_node()
        work = {node[:8]: sum(n for name, n in names.items() if name.startswith(PIPELINE_TASKS))
                for node, names in nodes.items()}
        print(f"pipeline tasks per node: {work}")
        assert len(work) == 2 and all(work.values()), nodes
        fs.get("vila2-out/run/", str(tmp_path / "got"), recursive=True)
    got = tmp_path / "got"
    ref_stats = {name: _stats(local_ref / name) for name in ("r0", "r1")}
    for name in ("r0", "r1"):
        total = ref_stats[name]["total"]
        assert {k: results[name][k] for k in ("rows_in", "kept", "dropped", "quarantined")} == {
            k: total[k] for k in ("rows_in", "kept", "dropped", "quarantined")}, name

    # round 0 (no model stage): same bytes (tars, MMC4 pkl/count, wids-meta, stats.json) and decisions
    assert output_files(got / "r0") == output_files(local_ref / "r0")
    _assert_same_decisions(got / "r0", local_ref / "r0")
    # round 1 read round 0 back from S3; model stages: same samples in the same tars, reasons, lineage
    _assert_same_decisions(got / "r1", local_ref / "r1")
    assert _captions(got / "r1") == _captions(local_ref / "r1")
    assert all([c[0] for c in caps] == [1] for caps in _captions(got / "r1").values())
    assert sorted(p.relative_to(got / "r1") for p in (got / "r1" / "captions").rglob("*.json")) == sorted(
        p.relative_to(local_ref / "r1") for p in (local_ref / "r1" / "captions").rglob("*.json"))
    assert _accounting(_stats(got / "r1")) == _accounting(ref_stats["r1"])
    mine, theirs = _without_model_text(got / "r1"), _without_model_text(local_ref / "r1")
    assert mine["members"] == theirs["members"] and len(mine["texts"]) == len(theirs["texts"])
    changed = sum(a != b for a, b in zip(mine["texts"], theirs["texts"], strict=True))
    print(f"round 1: {changed} of {len(mine['texts'])} captions differ from the local engine's "
          f"(model output; Ray Data forms other batches)")
    assert not placeholder.exists()  # nothing went to local disk


# ------------------------------------------------------------------ kill -9 on the Ray engine


def _temp_files(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if ".tmp-" in p.name)


def _published_markers(out: Path) -> list[Path]:
    """The last segment's per-input-shard markers: each written once that shard is published."""
    return [p for p in (out / "_progress").glob("*/*.json") if ".tmp-" not in p.name]


def test_ray_run_killed_mid_run_reruns_to_identical_output(cluster: RayCluster, local_ref: Path, sample_dir: Path,
                                                           tmp_path: Path):
    """`vila2-curate run --engine ray` on the cluster, SIGKILLed (the driver's whole process group) as soon as
    the first input shard is published: segment 0 decided, some shards written, others mid-exchange (parts,
    work markers). The rerun resumes and must give byte-identical shards and stats.json to an uninterrupted
    run (the local engine's, which the Ray engine equals without model stages: the test above), exact
    accounting, the same decisions, a valid output and no temporary file left."""
    out = tmp_path / "out"
    cfg = write_config(sample_dir, out, tmp_path / "run.yaml", stages=CURATE)
    cmd = [sys.executable, "-m", "vila2_curate.pipelines.cli", "run", str(cfg), "--engine", "ray", "--no-progress"]
    env = {**cluster.env, "RAY_ADDRESS": cluster.address}
    log = tmp_path / "killed.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True, stdout=f, stderr=subprocess.STDOUT)
    t0 = time.perf_counter()
    try:
        while proc.poll() is None and not _published_markers(out) and time.perf_counter() - t0 < 300:
            time.sleep(0.01)
        running = proc.poll() is None
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed_at = time.perf_counter() - t0
    n_shards = len(_stats(local_ref / "r0")["shards"])
    markers = len(_published_markers(out))
    assert running and 0 < markers < n_shards, (
        f"not killed mid-run: {markers} of {n_shards} shards published (rc {proc.returncode}):\n"
        f"{log.read_text()[-4000:]}")
    assert not (out / "stats.json").exists()
    state = {"tars": len([p for p in out.rglob("*.tar") if ".tmp-" not in p.name]), "markers": markers,
             "parts": len(list((out / "_work").glob("seg*/parts/*/*"))), "temps": len(_temp_files(out))}
    # the dead driver's tasks and actors give their CPUs back before the rerun starts
    t = time.perf_counter()
    cluster.wait_idle()
    idle_s = time.perf_counter() - t
    t = time.perf_counter()
    rerun = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    print(f"\nkilled at {killed_at:.1f}s with {state} on disk; cluster idle after {idle_s:.1f}s; "
          f"rerun {time.perf_counter() - t:.1f}s")
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-5000:]
    assert output_files(out) == output_files(local_ref / "r0"), "shards or stats.json differ from a clean run"
    stats = _stats(out)
    assert stats == _stats(local_ref / "r0") and stats["balanced"]
    for shard in stats["shards"]:
        assert shard["rows_in"] == shard["kept"] + shard["dropped"] + shard["quarantined"], shard
    _assert_same_decisions(out, local_ref / "r0")
    assert _temp_files(out) == []
    assert validate_output(str(out)) == []
