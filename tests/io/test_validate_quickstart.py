"""validate on corrupted copies of the quickstart flow's output: ranks, sidecars, duplicates, tar headers."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import tarfile
from pathlib import Path

import pytest

from tests.helpers.outputs import assert_reports, first_tar, resync, rewrite_tar, sample_urls
from vila2_curate.pipelines.cli import main as cli_main
from vila2_curate.pipelines.validate import check_output, validate_output

# ---------------------------------------------------------------- the quickstart flow's output, corrupted copies


@pytest.fixture(scope="module")
def quickstart(sample_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Round 0 of the quickstart flow over the whole sample (COYO, img2dataset, MMC4) and a round 1 over
    its coyo_bytes source that writes caption and specialist sidecars: a valid output to corrupt."""
    import yaml

    from tests.helpers.runs import write_config
    from vila2_curate.pipelines.executors.local import run_local
    from vila2_curate.schemas.config import load_config

    tmp = tmp_path_factory.mktemp("qs")
    cfg = write_config(sample_dir, tmp / "r0", tmp / "r0.yaml",
                       stages=[{"type": "normalize"}, {"type": "dedup", "methods": ["exact", "phash"]}])
    run_local(load_config(cfg), progress=False)
    models = sample_dir / "models"
    raw = {"name": "qs-r1", "batch_size": 16,
           "sources": [{"name": "coyo_bytes", "kind": "vila_wds", "paths": [str(tmp / "r0" / "coyo_bytes")]}],
           "stages": [{"type": "recaption", "prompts": "self_augment",
                       "captioner": {"model": str(models / "vlm"), "model_tag": "demo-vlm",
                                     "generation": {"max_new_tokens": 8, "seed": 0},
                                     "runtime": {"batch_size": 8}}},
                      {"type": "grounding", "model": str(models / "owlv2"), "box_threshold": 0.0},
                      {"type": "spatial"}],
           "output": {"path": str(tmp / "r1"), "shard_max_samples": 64}}
    (tmp / "r1.yaml").write_text(yaml.safe_dump(raw))
    run_local(load_config(tmp / "r1.yaml"), progress=False)
    return tmp


@pytest.fixture()
def r0(quickstart: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(quickstart / "r0", tmp_path / "r0", ignore=shutil.ignore_patterns("_work")))


@pytest.fixture()
def r1(quickstart: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(quickstart / "r1", tmp_path / "r1", ignore=shutil.ignore_patterns("_work")))


def test_quickstart_outputs_are_valid(quickstart: Path) -> None:
    for rnd in ("r0", "r1"):
        report = check_output(str(quickstart / rnd), world_sizes=[1, 2, 4, 8])
        assert report.problems == [], (rnd, report.problems)
    assert list((quickstart / "r1" / "captions").iterdir())  # the round wrote sidecars


def test_world_size_prints_documents_per_rank_and_fails_on_an_empty_rank(r0: Path) -> None:
    report = check_output(str(r0), world_sizes=[8])
    assert report.problems == []
    (line,) = [x for x in report.info if "world size 8" in x]
    assert line.startswith("mmc4: world size 8: 16 pkl files, 2 per rank, documents per rank [")
    # the old layout: one pkl per input shard -> 2 files for 8 GPUs, no rank gets a file
    total = sum(int(p.read_text()) for p in (r0 / "mmc4").glob("*.count"))
    shards: dict[str, list] = {}
    for p in sorted((r0 / "mmc4").glob("*.pkl")):
        shards.setdefault(p.name.split("-", 1)[1], []).extend(pickle.loads(p.read_bytes()))
        p.unlink()
        p.with_suffix(".count").unlink()
    for name, docs in shards.items():
        (r0 / "mmc4" / f"p00-{name}").write_bytes(pickle.dumps(docs))
        (r0 / "mmc4" / f"p00-{name}").with_suffix(".count").write_text(f"{len(docs)}\n")
    resync(r0)
    report = check_output(str(r0), world_sizes=[2, 8])
    assert [p for p in report.problems if "world size" in p] == [
        "mmc4: with world size 8, rank(s) [0, 1, 2, 3, 4, 5, 6, 7] get no MMC4 document, so VILA cuts every rank "
        f"to 0 and trains on none of the {total} documents (2 pkl files for 8 ranks: each gets 2 // 8 = 0 files; "
        "set output.mmc4_min_files to a multiple of 8)"]
    assert any(x.startswith("mmc4: world size 2: 2 pkl files, 1 per rank") for x in report.info)
    assert cli_main(["validate", str(r0), "--world-size", "8"]) == 1
    assert cli_main(["validate", str(r0), "--world-size", "2"]) == 0


def test_coyo_len4_unreachable_samples_are_a_warning(r0: Path) -> None:
    meta = json.loads((r0 / "coyo_bytes" / "wids-meta.json").read_text())
    n = sum(e["nsamples"] for e in meta["shardlist"])
    report = check_output(str(r0))
    assert report.problems == []
    lines = [w for w in report.warnings if w.startswith("coyo_bytes: VILA's COYO loader")]
    if n % 4:
        last = list(sample_urls(first_tar(r0)))[-(n % 4):]
        assert lines == [f"coyo_bytes: VILA's COYO loader serves len // 4 = {n // 4} groups of 4; the last {n % 4} "
                         f"of {n} samples ({', '.join(last)}) are never read"]
    else:
        assert lines == []


def test_sidecar_form_keys_location_and_coverage(r1: Path) -> None:
    tar = first_tar(r1)
    rel = tar.relative_to(r1)
    folder = r1 / "captions" / "r1-demo-vlm"
    side = folder / f"{rel}.json"
    entries = json.loads(side.read_text())
    n_urls = len(sample_urls(tar))
    info = [x for x in check_output(str(r1)).info if x.startswith("captions/r1-demo-vlm:")]
    assert info and info[0].startswith(f"captions/r1-demo-vlm: covers {len(entries)} of {n_urls} samples")
    assert "data_path coyo_bytes -> caption_choice captions/r1-demo-vlm/coyo_bytes" in info[0]
    # form {url: {"output": str}}, keys that are urls of this tar
    url = next(iter(entries))
    bad = dict(entries)
    bad[url] = "a bare string"
    bad["https://elsewhere.example/not-in-this-shard.jpg"] = {"output": "x"}
    side.write_text(json.dumps(bad))
    assert_reports(validate_output(str(r1)), "lack a non-empty {\"output\": str}", "not a url of coyo_bytes/",
                   "https://elsewhere.example/not-in-this-shard.jpg")
    # a sidecar where VILA does not look for it (beside the tar name instead of <folder>/<tar relpath>.json)
    side.write_text(json.dumps(entries))
    side.rename(folder / f"{tar.name}.json")
    resync(r1)
    problems = validate_output(str(r1))
    assert problems[0] == (f"captions/r1-demo-vlm/{tar.name}.json: not <caption folder>/<tar relpath>.json of a "
                           "tar in this output; VILA never reads it")
    # so the round's tar has no sidecar where VILA looks, and the round's captions are not covered
    assert problems[1].startswith(f"{rel}: no sidecar captions/r1-demo-vlm/{rel}.json, though round 1 recaptioned")
    assert problems[2].startswith(f"captions/r1-demo-vlm: covers 0 of {n_urls} samples (0.0%), but round 1 captioned")
    assert len(problems) == 3
    info = [x for x in check_output(str(r1)).info if x.startswith("captions/r1-demo-vlm:")]
    assert info[0].startswith(f"captions/r1-demo-vlm: covers 0 of {n_urls} samples (0.0%) in 0 of 1 tars")


def test_nan_in_sidecar_and_in_json_member(r1: Path) -> None:
    side = next((r1 / "captions").rglob("*.tar.json"))
    side.write_text(side.read_text().replace("{", '{"nan": NaN, ', 1))
    tar = first_tar(r1)
    key = next(iter(sample_urls(tar)))

    def nan(name: str, data: bytes):
        if name == f"{key}.json":
            data = data.replace(b"{", b'{"clip_score_nan": NaN, ', 1)
        return [(name, data)]

    rewrite_tar(tar, nan)
    resync(r1)
    assert_reports(validate_output(str(r1)), f"{side.relative_to(r1)}: not valid JSON (NaN is not JSON)",
                   f"sample '{key}' .json is not valid JSON (NaN is not JSON)")
    assert json.loads(b'{"a": NaN}')  # what VILA's json.load would have accepted


def test_duplicate_urls_within_a_shard(r0: Path, r1: Path) -> None:
    for root in (r0, r1):
        tar = first_tar(root)
        keys = list(sample_urls(tar))
        first_url = sample_urls(tar)[keys[0]]

        def same_url(name: str, data: bytes, victim: str = keys[1], url: str = first_url):
            if name == f"{victim}.json":
                meta = json.loads(data)
                meta["url"] = url
                data = json.dumps(meta).encode()
            return [(name, data)]

        rewrite_tar(tar, same_url)
        resync(root)
    # round 0 has no sidecars yet: a warning; round 1 has them, so two images share one caption: a problem
    r0_report = check_output(str(r0))
    assert r0_report.problems == []
    assert_reports(r0_report.warnings, "1 url(s) shared by several samples")
    assert_reports(validate_output(str(r1)), "1 url(s) shared by several samples",
                   "so those samples get one another's captions")


def test_byte_identical_images_across_the_dataset(r0: Path) -> None:
    a, b = first_tar(r0, "coyo_bytes"), first_tar(r0, "img2dataset")
    with tarfile.open(a) as tar:
        m = next(m for m in tar.getmembers() if m.name.endswith(".jpg"))
        image = tar.extractfile(m).read()
    b_key = next(iter(sample_urls(b)))

    def swap(name: str, data: bytes):
        if name.startswith(f"{b_key}.") and name.split(".")[1] in ("jpg", "png", "webp"):
            return [(f"{b_key}.jpg", image)]
        return [(name, data)]

    rewrite_tar(b, swap)
    resync(r0)
    report = check_output(str(r0))
    # round 0 ran exact dedup (its manifest lists the dedup stage), so a surviving copy fails it
    assert len(report.problems) == 1
    assert_reports(report.problems, "1 image(s) appear byte-identical in more than one sample (1 extra copies",
                   f"{a.relative_to(r0)}:{m.name[:-4]}", f"{b.relative_to(r0)}:{b_key}", "though exact dedup ran")


def rename_first_sample(tar: Path, new_key: str, fmt: int) -> None:
    """Rewrite ``tar`` in ``fmt`` with its first sample's members renamed to ``new_key``."""
    key = next(iter(sample_urls(tar)))

    def rename(name: str, data: bytes):
        return [(name.replace(key, new_key, 1) if name.startswith(key + ".") else name, data)]

    rewrite_tar(tar, rename, fmt=fmt)


def test_gnu_long_name_header(r0: Path) -> None:
    tar = first_tar(r0)
    long_key = "k" * 120
    rename_first_sample(tar, long_key, tarfile.GNU_FORMAT)
    resync(r0)
    assert_reports(validate_output(str(r0)), f"GNU long name header ('L') for '{long_key}.",
                   "indexes the next member under its truncated 100-byte name")


def test_symlinks_and_other_non_regular_files_in_the_tree(r0: Path) -> None:
    tar = first_tar(r0)
    (r0 / "coyo_bytes" / "alias.tar").symlink_to(tar)
    (r0 / "mmc4-link").symlink_to(r0 / "mmc4", target_is_directory=True)
    os.mkfifo(r0 / "img2dataset" / "pipe")
    problems = validate_output(str(r0))
    assert_reports(problems, "coyo_bytes/alias.tar: symlink in the output tree", "mmc4-link: symlink",
                   "img2dataset/pipe: not a regular file")


def test_pax_long_name_and_global_headers(r0: Path) -> None:
    tar = first_tar(r0)
    long_key = "p" * 120
    rename_first_sample(tar, long_key, tarfile.PAX_FORMAT)
    # a global pax header ('g') in front, as `tar --format=pax` or a pax_headers= argument writes
    buf = io.BytesIO()
    with (tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT, pax_headers={"comment": "x"}) as t,
          tarfile.open(tar) as src):
        for m in src.getmembers():
            t.addfile(m, src.extractfile(m))
    tar.write_bytes(buf.getvalue())
    resync(r0)
    report = check_output(str(r0))
    assert_reports(report.problems, "pax header ('x') at byte", "pax header sets ['path']; VILA's reader ignores")
    assert_reports(report.warnings, "global pax header ('g') at byte 0 with ['comment']: VILA's reader skips it")


def test_image_digests_spill_to_buckets_and_find_the_same_duplicates() -> None:
    """Memory stays bounded (records spill to 256 bucket files) and the answer equals a plain dict's."""
    import random

    from vila2_curate.pipelines.validate.images import ImageDigests

    rng = random.Random(7)
    pool = [hashlib.sha256(str(i).encode()).digest()[:8] for i in range(3000)]
    tars = [[(rng.choice(pool), o) for o in range(rng.randint(0, 40))] for _ in range(200)]
    seen: dict[bytes, list[tuple[int, int]]] = {}
    for t, images in enumerate(tars):
        for d, o in images:
            seen.setdefault(d, []).append((t, o))
    dups = {d: m for d, m in seen.items() if len(m) > 1}
    want = (len(dups), sum(len(m) - 1 for m in dups.values()), dups[min(dups, key=lambda d: int.from_bytes(d))])
    for spill_at in (1 << 20, 97, 1):
        digests = ImageDigests(spill_at=spill_at)
        for t, images in enumerate(tars):
            digests.add(t, images)
        assert digests.summary() == want
        assert digests._spill is None  # the temporary bucket folder is gone
