"""validate holds an output to what its run recorded: a recaptioned round's sidecars, exact dedup, POSIX tars.

One curated round 0 (two COYO sources, normalize + exact/pHash dedup) and one demo-VLM recaption round are
run once; each test plants one defect in a copy and resyncs wids-meta.json and manifest.parquet, so the
planted defect is the only thing left to find.
"""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import pytest

from tests.helpers.outputs import first_tar, resync, rewrite_tar, sample_urls
from tests.helpers.runs import write_config, write_round_config
from vila2_curate.pipelines.cli import main as cli_main
from vila2_curate.pipelines.executors.local import run_local
from vila2_curate.pipelines.validate import check_output, validate_output
from vila2_curate.schemas.config import load_config

FOLDER = "r1-demo-vlm"


@pytest.fixture(scope="module")
def runs(sample_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``r0``: the COYO sources curated with exact + pHash dedup; ``r1``: one demo-VLM recaption round."""
    tmp = tmp_path_factory.mktemp("contract")
    cfg = write_config(sample_dir, tmp / "r0", tmp / "r0.yaml", sources=["coyo_bytes", "coyo_paths"],
                       stages=[{"type": "normalize"}, {"type": "dedup", "methods": ["exact", "phash"]}])
    run_local(load_config(cfg), progress=False)
    run_local(load_config(write_round_config(sample_dir, tmp, tmp / "round.yaml", name="c"), round=1),
              progress=False)
    return tmp


def _copy(runs: Path, tmp_path: Path, name: str) -> Path:
    return Path(shutil.copytree(runs / name, tmp_path / name, ignore=shutil.ignore_patterns("_work")))


@pytest.fixture()
def r0(runs: Path, tmp_path: Path) -> Path:
    return _copy(runs, tmp_path, "r0")


@pytest.fixture()
def r1(runs: Path, tmp_path: Path) -> Path:
    return _copy(runs, tmp_path, "r1")


def _sidecars(r1: Path) -> list[Path]:
    return sorted((r1 / "captions" / FOLDER).rglob("*.tar.json"))


def _covered(r1: Path) -> int:
    return sum(len(json.loads(p.read_text())) for p in _sidecars(r1))


def _only(problems: list[str], *starts: str) -> None:
    """``problems`` are exactly one line per prefix in ``starts`` (any order)."""
    assert len(problems) == len(starts), problems
    for s in starts:
        assert any(p.startswith(s) for p in problems), (s, problems)


def test_the_runs_pass_and_truncated_captions_are_not_expected_in_sidecars(runs: Path) -> None:
    for name in ("r0", "r1"):
        assert validate_output(str(runs / name)) == [], name
    # the demo VLM truncates most captions at 12 tokens: the round counted them, its sidecars leave them out
    captioned = json.loads((runs / "r1" / "summaries.json").read_text())["rounds"]["1"]["captions"]
    assert 0 < _covered(runs / "r1") < captioned


def test_a_tar_without_its_round_sidecar(r1: Path) -> None:
    side = _sidecars(r1)[-1]
    tar = str(side.relative_to(r1 / "captions" / FOLDER))[: -len(".json")]
    lost = len(json.loads(side.read_text()))
    side.unlink()
    resync(r1)  # the manifest no longer lists it either: only the missing sidecar is left to find
    _only(validate_output(str(r1)),
          f"{tar}: no sidecar captions/{FOLDER}/{tar}.json, though round 1 recaptioned it ({lost} sample(s)",
          f"captions/{FOLDER}: covers {_covered(r1)} of ")


def test_sidecars_covering_a_fraction_of_what_the_round_captioned(r1: Path) -> None:
    full = _covered(r1)
    side = _sidecars(r1)[0]
    entries = json.loads(side.read_text())
    side.write_text(json.dumps(dict(list(entries.items())[:1])))
    resync(r1)
    n = sum(len(sample_urls(t)) for t in sorted(r1.rglob("*.tar")))
    _only(validate_output(str(r1)),
          f"captions/{FOLDER}: covers {full - len(entries) + 1} of {n} samples")
    assert f"but round 1 captioned {full} (summaries.json rounds[1] captions" in validate_output(str(r1))[0]
    # --min-caption-coverage replaces the default bar
    assert validate_output(str(r1), min_caption_coverage=0.05) == []
    _only(validate_output(str(r1), min_caption_coverage=0.9), f"captions/{FOLDER}: covers ")
    assert "under --min-caption-coverage 90.0%" in validate_output(str(r1), min_caption_coverage=0.9)[0]


def test_min_caption_coverage_flag(r1: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["validate", str(r1), "--min-caption-coverage", "0.1"]) == 0
    assert cli_main(["validate", str(r1), "--min-caption-coverage", "0.95"]) == 1
    assert "INVALID: captions/r1-demo-vlm: covers " in capsys.readouterr().out
    with pytest.raises(ValueError, match="between 0 and 1"):
        validate_output(str(r1), min_caption_coverage=1.5)


def test_a_round_without_any_sidecar_folder_is_a_warning(r1: Path) -> None:
    shutil.rmtree(r1 / "captions")
    resync(r1)  # as a round run with recaption.sidecars: false records it
    report = check_output(str(r1))
    assert report.problems == []
    assert any(w.startswith(f"captions/{FOLDER}: missing, though round 1 gave ") for w in report.warnings)


def _plant_duplicate_image(root: Path) -> str:
    """Copy the first coyo_bytes image into the first coyo_paths sample; returns the copy's key."""
    src, dst = first_tar(root, "coyo_bytes"), first_tar(root, "coyo_paths")
    with tarfile.open(src) as tar:
        m = next(m for m in tar.getmembers() if m.name.rsplit(".", 1)[1] in ("jpg", "png", "webp"))
        image, ext = tar.extractfile(m).read(), m.name.rsplit(".", 1)[1]
    key = next(iter(sample_urls(dst)))

    def swap(name: str, data: bytes) -> list[tuple[str, bytes]]:
        if name.startswith(f"{key}.") and name.rsplit(".", 1)[1] in ("jpg", "png", "webp"):
            return [(f"{key}.{ext}", image)]
        return [(name, data)]

    rewrite_tar(dst, swap)
    resync(root)
    return key


def test_byte_identical_images_after_exact_dedup(r0: Path) -> None:
    key = _plant_duplicate_image(r0)
    report = check_output(str(r0))
    _only(report.problems, "1 image(s) appear byte-identical in more than one sample (1 extra copies")
    assert f"coyo_paths/part-00001_0000.tar:{key}" in report.problems[0]
    from vila2_curate.curation.dedup.stage import DedupStage

    assert f"though exact dedup ran (manifest.parquet lists stage dedup@{DedupStage.version}" in report.problems[0]
    # a dedup summary that records its methods is believed: without exact, a copy is only a warning
    summaries = json.loads((r0 / "summaries.json").read_text())
    summaries["dedup"]["methods"] = ["phash"]
    (r0 / "summaries.json").write_text(json.dumps(summaries))
    report = check_output(str(r0))
    assert report.problems == []
    assert any("byte-identical" in w and "was exact dedup run?" in w for w in report.warnings)


def test_byte_identical_images_without_dedup_are_a_warning(r1: Path) -> None:
    _plant_duplicate_image(r1)  # a recaption round: its manifest lists no dedup stage
    report = check_output(str(r1))
    assert report.problems == []
    assert any("byte-identical" in w for w in report.warnings)


def test_exact_dedup_record() -> None:
    from vila2_curate.pipelines.validate.run_record import RunRecord

    assert RunRecord(stages={"normalize": "1"}).exact_dedup() is None
    assert "dedup@2; its methods are not recorded" in (RunRecord(stages={"dedup": "2"}).exact_dedup() or "")
    # a summary that lists methods is believed: only the second dedup stage ran exact
    two = RunRecord(stages={"dedup": "2", "dedup_2": "2"},
                    summaries={"dedup": {"methods": ["semantic"]}, "dedup_2": {"methods": ["exact", "phash"]}})
    assert "dedup_2@2" in (two.exact_dedup() or "")
    minhash = RunRecord(stages={"dedup": "2"}, summaries={"dedup": {"methods": ["minhash_captions"]}})
    assert minhash.exact_dedup() is None
    assert RunRecord(stages={"recaption_r2": "1", "recaption_r2_2": "1"}).recaption_rounds == {2}


def test_gnu_format_tar(r0: Path) -> None:
    tar = first_tar(r0)
    rewrite_tar(tar, lambda name, data: [(name, data)], fmt=tarfile.GNU_FORMAT)
    resync(r0)
    n = 3 * len(sample_urls(tar))
    _only(validate_output(str(r0)),
          f"{tar.relative_to(r0)}: {n} header(s) in GNU tar format (magic 'ustar  \\0'), the first at byte 0")
