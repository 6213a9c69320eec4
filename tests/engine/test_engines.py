"""Local, Ray Data and Beam run the same plan to the same bytes: shards, stats, kept keys, reasons."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.helpers.runs import assert_same_stage_timings, output_files, write_config
from vila2_curate.pipelines.executors.local import run_local
from vila2_curate.pipelines.validate import validate_output
from vila2_curate.schemas.config import load_config

# Every curation stage, with the demo models the sample fixture builds (scores are random but the
# decisions must still be identical on every engine).
CURATION = [
    {"type": "normalize"},
    {"type": "dedup", "methods": ["exact", "phash", "minhash_captions", "minhash_documents"]},
    {"type": "clipscore", "model": "../sample/models/clip", "runtime": {"batch_size": 16}},
    {"type": "dedup", "methods": ["semantic"], "semantic_eps": 0.002},
    {"type": "clip_filter", "top_percent": 90},
    {"type": "deltaloss", "small_model": "../sample/models/lm-small", "large_model": "../sample/models/lm-large",
     "keep_fraction": 0.8, "runtime": {"batch_size": 8}},
]


def _reasons(out: Path) -> dict[tuple[str, str], str]:
    """Drop reasons per row; reasons that quote a model score keep only their class (see below)."""
    rows = {}
    for p in sorted((out / "rejects").rglob("*.parquet")):
        for r in pq.read_table(p).to_pylist():
            reason = r["reason"]
            if r["stage"] in ("clip_filter", "deltaloss"):
                reason = reason.split(":")[0]
            rows[(r["source"], r["key"])] = reason
    return rows


SCORES = ("clip_score", "clip_cosine", "delta_loss", "logp_small", "logp_large")


def _samples(out: Path) -> dict[str, dict]:
    """Every published sample's member, by shard and name; jsons parsed (scores compared separately).

    Model stages run in whatever batches an engine forms (Ray Data re-blocks rows), and CPU/GPU matrix
    kernels differ in the last float bits with the batch shape; decisions and everything else must match
    exactly, scores to float32 noise.
    """
    import tarfile

    out_samples = {}
    for t in sorted(out.rglob("*.tar")):
        with tarfile.open(t) as tf:
            for m in tf.getmembers():
                data = tf.extractfile(m).read()
                if m.name.endswith(".json"):
                    out_samples[f"{t.relative_to(out)}/{m.name}"] = json.loads(data)
                else:
                    out_samples[f"{t.relative_to(out)}/{m.name}"] = data
    return out_samples


def _assert_same_result(out: Path, ref: Path) -> None:
    mine, theirs = _samples(out), _samples(ref)
    assert mine.keys() == theirs.keys()
    for name, obj in mine.items():
        if not name.endswith(".json"):
            assert obj == theirs[name], name
            continue
        other = theirs[name]
        for k in SCORES:
            a, b = obj.pop(k, None), other.pop(k, None)
            assert (a is None) == (b is None) and (a is None or math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-5)), (
                name, k, a, b)
        assert obj == other, name
    assert _reasons(out) == _reasons(ref)
    a, b = (json.loads((p / "stats.json").read_text()) for p in (out, ref))
    assert a == b
    decisions = sorted((ref / "_work").glob("seg*/*.decisions.parquet"))
    assert decisions
    for d in decisions:
        mine = pq.read_table(out / d.relative_to(ref))
        theirs = pq.read_table(d)
        assert mine.select(["source", "key", "image_index", "flag"]).equals(
            theirs.select(["source", "key", "image_index", "flag"]))


@pytest.fixture(scope="module")
def local_out(sample_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("engines_local")
    cfg = write_config(sample_dir, tmp / "out", tmp / "run.yaml", stages=CURATION)
    stats = run_local(load_config(cfg), progress=False)
    reasons = stats["total"]["reasons"]
    for stage in ("dedup", "dedup_2", "clip_filter", "deltaloss"):  # every decision stage decided something
        assert any(r.startswith(stage + ":") for r in reasons), (stage, reasons)
    return tmp / "out"


@pytest.fixture(scope="module")
def plain_local_out(curated_sample) -> Path:
    return curated_sample([{"type": "normalize"}, CURATION[1]])


def _decide_modes(out: Path) -> dict[str, str]:
    summaries = json.loads((out / "summaries.json").read_text())
    return {name: s["decide"] for name, s in summaries.items() if isinstance(s, dict) and "decide" in s}


def _assert_same_decisions(out: Path, ref: Path) -> None:
    """Per input shard: the same decision rows (keys, image, reason, flag)."""
    files = sorted(p.relative_to(ref) for p in (ref / "_work").glob("seg*/*.decisions.parquet"))
    assert files and files == sorted(p.relative_to(out) for p in (out / "_work").glob("seg*/*.decisions.parquet"))
    cols = ["source", "key", "image_index", "drop_reason", "flag"]
    for f in files:
        assert pq.read_table(out / f).select(cols).equals(pq.read_table(ref / f).select(cols)), f


def test_single_process_decide_matches_partitioned_locally(local_out: Path, sample_dir: Path, tmp_path: Path):
    """``decide: single`` (one decide over all signatures, the reference) and the partitioned decide the
    engine runs by default: same shards, kept keys, reasons and per-shard decisions on every stage."""
    assert _decide_modes(local_out)["dedup"] == "partitioned"
    cfg = load_config(write_config(sample_dir, tmp_path / "out", tmp_path / "run.yaml", stages=CURATION),
                      {"decide": "single"})
    run_local(cfg, progress=False)
    assert set(_decide_modes(tmp_path / "out").values()) == {"single"}
    _assert_same_result(tmp_path / "out", local_out)
    _assert_same_decisions(tmp_path / "out", local_out)


def test_decide_forms_more_groups_when_a_group_would_exceed_its_byte_target(plain_local_out: Path, sample_dir: Path,
                                                                           tmp_path: Path):
    """``decide_group_mb`` sizes step 2 from the measured partition bytes: a tiny target means many more
    groups than the engine's 16, and the decisions cannot change with the count."""
    cfg = load_config(write_config(sample_dir, tmp_path / "out", tmp_path / "run.yaml",
                                   stages=[{"type": "normalize"}, CURATION[1]]), {"decide_group_mb": 0.02})
    run_local(cfg, progress=False)
    default, small = (json.loads((o / "summaries.json").read_text())["dedup"] for o in (plain_local_out,
                                                                                          tmp_path / "out"))
    assert default["decide_groups"] == 16 and default["partition_bytes_per_row"] > 0
    assert small["decide_groups"] > 16
    _assert_same_decisions(tmp_path / "out", plain_local_out)


def test_ray_writes_byte_identical_shards_without_model_stages(ray_cluster, plain_local_out: Path,
                                                               sample_dir: Path, tmp_path: Path):
    """Ray with the single-process decide against the local engine's partitioned decide."""
    from vila2_curate.pipelines.executors.ray_data import run_ray

    cfg = load_config(write_config(sample_dir, tmp_path / "out", tmp_path / "run.yaml",
                                   stages=[{"type": "normalize"}, CURATION[1]]), {"engine": "ray", "decide": "single"})
    run_ray(cfg, progress=False)
    assert _decide_modes(tmp_path / "out") == {"dedup": "single"}
    assert _decide_modes(plain_local_out) == {"dedup": "partitioned"}
    assert output_files(tmp_path / "out") == output_files(plain_local_out)
    assert_same_stage_timings(tmp_path / "out", plain_local_out)
    _assert_same_decisions(tmp_path / "out", plain_local_out)


def test_beam_single_decide_writes_byte_identical_shards(plain_local_out: Path, sample_dir: Path, tmp_path: Path):
    pytest.importorskip("apache_beam")
    from vila2_curate.pipelines.executors.beam import run_beam

    cfg = load_config(write_config(sample_dir, tmp_path / "out", tmp_path / "run.yaml",
                                   stages=[{"type": "normalize"}, CURATION[1]]), {"engine": "beam", "decide": "single"})
    run_beam(cfg, progress=False)
    assert _decide_modes(tmp_path / "out") == {"dedup": "single"}
    assert output_files(tmp_path / "out") == output_files(plain_local_out)
    assert_same_stage_timings(tmp_path / "out", plain_local_out)
    _assert_same_decisions(tmp_path / "out", plain_local_out)


def _curation_matches_local(run, engine: str, local_out: Path, sample_dir: Path, out: Path) -> None:
    """The curation on ``engine`` (``run``: its entry point) gives the local engine's result and timing keys."""
    cfg = load_config(write_config(sample_dir, out, out.parent / "run.yaml", stages=CURATION), {"engine": engine})
    assert run(cfg, progress=False)["balanced"]
    _assert_same_result(out, local_out)
    assert_same_stage_timings(out, local_out)


def test_ray_engine_matches_local(ray_cluster, local_out: Path, sample_dir: Path, tmp_path: Path):
    from vila2_curate.pipelines.executors.ray_data import run_ray

    _curation_matches_local(run_ray, "ray", local_out, sample_dir, tmp_path / "out")
    assert validate_output(str(tmp_path / "out")) == []


def test_beam_engine_matches_local(local_out: Path, sample_dir: Path, tmp_path: Path):
    pytest.importorskip("apache_beam")
    from vila2_curate.pipelines.executors.beam import run_beam

    _curation_matches_local(run_beam, "beam", local_out, sample_dir, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["total"]["rows_in"] == 151
    assert len(list((tmp_path / "out" / "_work").glob("seg*/decided.json"))) == 4


@pytest.mark.parametrize("engine", ["local", "ray", "beam"])
def test_runner_confirms_pending_phash_edges_per_shard(engine: str, tmp_path: Path, request):
    """The engine's step 2b (schemas.stage.CombinesOnEngine, step a) on real signature files: pending pHash
    candidates across input shards are confirmed with each endpoint's payload read from its own shard
    (``per_shard`` of each engine), giving the single-process decisions; the work files are removed."""
    import pyarrow as pa

    from tests.curation.test_partitioned import _sorted, cross_shard_near_duplicates
    from tests.helpers.engine_combine import engine_decisions
    from vila2_curate.curation.dedup.stage import DedupStage
    from vila2_curate.pipelines.engine.components import components_dir
    from vila2_curate.pipelines.executors.local import LocalEngine
    from vila2_curate.schemas.config import DedupConfig

    if engine == "ray":
        request.getfixturevalue("ray_cluster")
        from vila2_curate.pipelines.executors.ray_data import RayEngine as Engine
    elif engine == "beam":
        pytest.importorskip("apache_beam")
        from vila2_curate.pipelines.executors.beam import BeamEngine as Engine
    shards = cross_shard_near_duplicates()
    for confirm in ("thumbnail", "clip"):
        cfg = DedupConfig(methods=["phash"], phash_confirm=confirm, thumbnail_neighbours=0)
        reference = _sorted(DedupStage(cfg).decide(pa.concat_tables([s for _, s in shards])))
        runner_engine = LocalEngine(progress=False) if engine == "local" else Engine()
        got, summary = engine_decisions(runner_engine, DedupStage(cfg), shards, tmp_path / confirm, 3)
        assert _sorted(got) == reference, confirm
        assert summary["phases"]["image"]["components"] > 0
        assert not (tmp_path / confirm / components_dir("", 0).lstrip("/")).exists()
