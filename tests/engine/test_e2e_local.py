"""End to end on the local engine over the realistic sample: contract, accounting, ground truth, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq  # noqa: F401
import pytest

from tests.helpers.runs import ROOT, output_files, write_config
from vila2_curate.pipelines.cli import main as cli_main
from vila2_curate.pipelines.executors.local import run_local
from vila2_curate.pipelines.validate import read_vila_samples, validate_output
from vila2_curate.schemas.config import load_config

NORMALIZE = [{"type": "normalize"}]  # these tests are about reading, normalizing, writing and resuming

# The sample's ground-truth outcome classes -> the reason class our pipeline must give that row.
EXPECTED_REASON = {
    "corrupt": {"image_undecodable", "image_empty", "tar_truncated"},
    "too_small": {"too_small"},
    "aspect": {"aspect_ratio"},
    "bomb": {"decompression_bomb"},
    "failed_to_download": {"img2dataset_failed_to_download"},
    "failed_to_resize": {"img2dataset_failed_to_resize"},
    "not_utf8": {"caption_not_utf8"},
    "missing_image": {"image_unreadable", "image_missing"},
}


@pytest.fixture(scope="module")
def clean_run(curated_sample) -> Path:
    return curated_sample(NORMALIZE)


def _rejects(out: Path) -> dict[tuple[str, str], dict]:
    rows = {}
    for p in (out / "rejects").rglob("*.parquet"):
        for r in pq.read_table(p).to_pylist():
            rows[(r["source"], r["source_key"] or r["key"])] = r
    return rows


def test_output_matches_vila_contract(clean_run: Path):
    assert validate_output(str(clean_run)) == []
    samples = list(read_vila_samples(str(clean_run)))
    assert samples and all({".txt", ".json"} <= set(s) for s in samples)
    assert all(s[".json"]["url"] for s in samples)


def test_accounting_balances_per_input_shard(clean_run: Path, sample_dir: Path):
    stats = json.loads((clean_run / "stats.json").read_text())
    assert stats["balanced"]
    for shard in stats["shards"]:
        assert shard["rows_in"] == shard["kept"] + shard["dropped"] + shard["quarantined"], shard
    truth = json.loads((sample_dir / "ground_truth.json").read_text())
    n_pairs = sum(1 for r in truth["records"] if r["source"] != "mmc4")
    n_docs = len(truth["documents"])
    assert stats["total"]["rows_in"] == n_pairs + n_docs
    rejected = sum(1 for p in (clean_run / "rejects").rglob("*.parquet") for _ in pq.read_table(p).to_pylist())
    assert rejected == stats["total"]["dropped"] + stats["total"]["quarantined"]


def test_ground_truth_outcomes(clean_run: Path, sample_dir: Path):
    truth = json.loads((sample_dir / "ground_truth.json").read_text())
    rejects = _rejects(clean_run)
    kept = {(s[".json"]["source"], s[".json"].get("source_key") or s["__key__"])
            for s in read_vila_samples(str(clean_run))}
    checked = 0
    for rec in truth["records"]:
        if rec["source"] == "mmc4":
            continue
        ident = (rec["source"], rec["key"])
        if rec["expected"] == "keep":
            assert ident in kept, f"{ident} should be kept; rejected as {rejects.get(ident)}"
        else:
            assert ident in rejects, f"{ident} ({rec['expected']}) was not rejected"
            reason = rejects[ident]["reason"].split(":")[0]
            assert reason in EXPECTED_REASON[rec["expected"]], (ident, rec["expected"], reason)
        checked += 1
    assert checked >= 120
    mmc4 = json.loads((clean_run / "stats.json").read_text())["sources"]["mmc4"]
    assert mmc4["image_reasons"].get("read:image_missing") == 1
    assert mmc4["image_reasons"].get("read:matched_text_index_out_of_range") == 1
    assert mmc4["images_kept"] == sum(1 for r in truth["records"] if r["source"] == "mmc4" and r["expected"] == "keep")


def test_rerun_does_no_work_and_changes_nothing(clean_run: Path, sample_dir: Path, tmp_path: Path):
    cfg = load_config(write_config(sample_dir, clean_run, tmp_path / "run.yaml", stages=NORMALIZE))
    before = {p: p.stat().st_mtime_ns for p in clean_run.rglob("*.tar")}
    run_local(cfg, progress=False, max_shards=0)  # would raise if any shard still had work
    assert before == {p: p.stat().st_mtime_ns for p in clean_run.rglob("*.tar")}


def test_interrupted_run_resumes_to_identical_output(clean_run: Path, sample_dir: Path, tmp_path: Path):
    cfg = load_config(write_config(sample_dir, tmp_path / "out", tmp_path / "run.yaml", stages=NORMALIZE))
    for stop_after in (1, 3):
        with pytest.raises(InterruptedError):
            run_local(cfg, progress=False, max_shards=stop_after)
    run_local(cfg, progress=False)
    assert output_files(tmp_path / "out") == output_files(clean_run)


def test_batch_size_and_shard_size_are_independent(clean_run: Path, sample_dir: Path, tmp_path: Path):
    cfg = load_config(write_config(sample_dir, tmp_path / "out", tmp_path / "run.yaml", stages=NORMALIZE), {"batch_size": 7})
    run_local(cfg, progress=False)
    assert output_files(tmp_path / "out") == output_files(clean_run)
    small = load_config(write_config(sample_dir, tmp_path / "o2", tmp_path / "r2.yaml", shard_max_samples=10, stages=NORMALIZE))
    run_local(small, progress=False)
    meta = json.loads((tmp_path / "o2" / "wids-meta.json").read_text())
    assert max(s["nsamples"] for s in meta["shardlist"]) == 10
    assert validate_output(str(tmp_path / "o2")) == []


DEDUP = [*NORMALIZE, {"type": "dedup", "methods": ["exact", "phash", "minhash_captions", "minhash_documents"]}]


def test_intermediates_hold_no_images_and_a_redo_rebuilds_spent_rows(sample_dir: Path, tmp_path: Path):
    """Between segments a shard's rows carry no image bytes; once its next segment is done they are
    removed. A redo that needs them (here: one shard's final marker gone) rebuilds them from the input
    (the decisions are reused) and gives the same bytes."""
    cfg = load_config(write_config(sample_dir, tmp_path / "out", tmp_path / "run.yaml", stages=DEDUP))
    with pytest.raises(InterruptedError):  # every shard through segment 0, none written yet
        run_local(cfg, progress=False, max_shards=6)
    work = tmp_path / "out" / "_work"
    rows = sorted(work.glob("seg0/*.rows.parquet"))
    assert len(rows) == 6
    for p in rows:
        t = pq.read_table(p)
        assert "url" not in t.column_names
        if "image" in t.column_names:  # bytes only where normalize changed the image
            meta = t.column("meta").to_pylist()
            assert all(m and '"reencoded"' in m for m, b in zip(meta, t.column("image").to_pylist(), strict=True)
                       if b is not None)
    run_local(cfg, progress=False)
    clean = output_files(tmp_path / "out")
    assert not list(work.glob("seg*/*.rows.parquet")) and not list(work.glob("seg*/*.sig.parquet"))
    input_bytes = sum(p.stat().st_size for p in sample_dir.rglob("*") if p.is_file() and "models" not in p.parts)
    work_bytes = sum(p.stat().st_size for p in work.rglob("*") if p.is_file())
    assert work_bytes <= 0.05 * input_bytes, (work_bytes, input_bytes)

    marker = sorted((tmp_path / "out" / "_progress" / "img2dataset").glob("*.json"))[0]
    marker.unlink()
    run_local(cfg, progress=False)
    assert output_files(tmp_path / "out") == clean


@pytest.mark.parametrize("kill_when", ["first_tar", "first_marker", "after_1s"])
def test_kill_9_and_rerun_gives_identical_output(clean_run: Path, sample_dir: Path, tmp_path: Path,
                                                 kill_when: str):
    out = tmp_path / "out"
    cfg = write_config(sample_dir, out, tmp_path / "run.yaml", stages=NORMALIZE)
    cmd = [sys.executable, "-m", "vila2_curate.pipelines.cli", "run", str(cfg), "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while proc.poll() is None and time.time() < deadline:
        if kill_when == "first_tar" and any(out.rglob("*.tar")):
            break
        if kill_when == "first_marker" and any((out / "_progress").rglob("*.json")):
            break
        if kill_when == "after_1s" and time.time() > deadline - 59:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert cli_main(["run", str(cfg), "--no-progress"]) == 0
    assert output_files(out) == output_files(clean_run)
    assert validate_output(str(out)) == []
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]


def test_cli_reports_bad_config_field(tmp_path: Path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("sources: [{name: a, kind: coyo_parquet, paths: [x], image_colum: img}]\noutput: {path: o}\n")
    assert cli_main(["run", str(bad)]) == 2
    assert "sources.0.image_colum" in capsys.readouterr().err


def test_cli_validate_exit_codes(clean_run: Path, tmp_path: Path):
    assert cli_main(["validate", str(clean_run)]) == 0
    assert cli_main(["validate", str(tmp_path)]) == 1


def test_unpublishable_rows_are_quarantined_not_fatal(tmp_path: Path):
    """A COYO row without url or caption cannot be looked up / trained on: rejected with a reason."""
    import io

    import numpy as np
    import pyarrow as pa
    from PIL import Image

    def jpeg(seed: int) -> bytes:
        arr = np.random.default_rng(seed).integers(0, 255, (16, 16, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).resize((320, 240)).save(buf, format="JPEG")
        return buf.getvalue()

    table = pa.table({"id": [1, 2, 3], "url": ["http://a/1.jpg", None, "http://a/3.jpg"],
                      "text": ["a cat", "a dog", ""], "image": [jpeg(1), jpeg(2), jpeg(3)]})
    (tmp_path / "coyo").mkdir()
    pa.parquet.write_table(table, tmp_path / "coyo" / "part-0.parquet")
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"sources: [{{name: c, kind: coyo_parquet, paths: ['{tmp_path}/coyo/*.parquet'], "
                   f"image_column: image}}]\noutput: {{path: '{tmp_path}/out'}}\n")
    stats = run_local(load_config(cfg), progress=False)
    assert stats["total"]["kept"] == 1 and stats["total"]["quarantined"] == 2 and stats["balanced"]
    assert set(stats["total"]["reasons"]) == {"write:unpublishable"}
    assert validate_output(str(tmp_path / "out")) == []


def test_output_to_memory_filesystem(sample_dir: Path, tmp_path: Path):
    """Every path goes through fsspec: the same run writes to memory:// and validates there."""
    cfg = load_config(write_config(sample_dir, tmp_path / "unused", tmp_path / "run.yaml", stages=NORMALIZE),
                      {"output": {"path": "memory://vila2-test/out", "shard_max_samples": 64}})
    stats = run_local(cfg, progress=False)
    assert stats["balanced"] and stats["total"]["kept"] > 100
    assert validate_output("memory://vila2-test/out") == []
