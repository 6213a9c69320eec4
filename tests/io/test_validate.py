"""validate_output: a good output passes; each kind of contract break is reported by name."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import pickle
import tarfile
from pathlib import Path

import fsspec
import pytest

from tests.io.test_writers import doc_row, image_bytes, pair_row
from vila2_curate.pipelines.cli import main as cli_main
from vila2_curate.pipelines.io.writers.atomic import OutputFile, write_json_atomic
from vila2_curate.pipelines.io.writers.mmc4 import Mmc4PklWriter
from vila2_curate.pipelines.io.writers.records import (
    manifest_row,
    write_manifest,
    write_rejects,
    write_wids_meta,
)
from vila2_curate.pipelines.io.writers.wds import WdsShardWriter
from vila2_curate.pipelines.validate import (
    check_output,
    read_vila_samples,
    scan_tar,
    validate_output,
    vila_groups,
)
from vila2_curate.schemas.config import CaptionPolicy
from vila2_curate.schemas.records import ShardStats, merge_stats
from vila2_curate.schemas.rows import DOCUMENT_SCHEMA, PAIR_SCHEMA, make_table

FS = fsspec.filesystem("file")


def _output_file(root: Path, rel: str) -> OutputFile:
    data = (root / rel).read_bytes()
    if rel.endswith(".tar"):
        with open(root / rel, "rb") as f:
            n = len(vila_groups([m.name for m in scan_tar(f).members]))
    elif rel.endswith(".json"):  # a sidecar: one entry per url
        n = len(json.loads(data))
    else:
        n = len(pickle.loads(data))
    return OutputFile(rel, n, len(data), hashlib.sha256(data).hexdigest())


def refresh_records(root: Path) -> None:
    """Rewrite wids-meta.json and manifest.parquet from the files as they are now."""
    tars = sorted(str(p.relative_to(root)) for p in root.rglob("*.tar"))
    pkls = sorted(str(p.relative_to(root)) for p in root.rglob("*.pkl"))
    write_wids_meta(FS, str(root), "test", [_output_file(root, t) for t in tars])
    nested = [_output_file(root, t) for t in tars if t.startswith("coyo/")]
    write_wids_meta(FS, str(root / "coyo"), "test-coyo",
                    [OutputFile(f.relpath[len("coyo/"):], f.nsamples, f.bytes, f.sha256) for f in nested])
    rows = [manifest_row(_output_file(root, r), kind="wds" if r.endswith(".tar") else "mmc4", source="s",
                         input_shards=["00000"], config_hash="c", stage_versions={"normalize": "1"})
            for r in tars + pkls]
    write_manifest(FS, str(root), rows)


@pytest.fixture()
def good(tmp_path: Path) -> Path:
    root = tmp_path / "out"
    stats = []
    files: list[OutputFile] = []
    manifest = []
    for s, shard in enumerate(["00000", "00001"]):
        rows = [pair_row(s * 100 + i, fmt=["jpg", "png", "webp"][i % 3], shard=shard) for i in range(7)]
        rows.append(pair_row(s * 100 + 50, shard=shard, drop_reason="too_small", drop_stage="normalize"))
        table = make_table(rows, PAIR_SCHEMA)
        w = WdsShardWriter(FS, str(root), f"coyo/{shard}", max_samples=4, max_bytes=None,
                           caption_policy=CaptionPolicy(mode="mix", seed=1))
        w.write(table.slice(0, 7))
        out = w.close()
        files += out
        manifest += [manifest_row(f, kind="wds", source="coyo", input_shards=[shard], config_hash="c",
                                  stage_versions={}) for f in out]
        write_rejects(FS, str(root), "coyo", shard, table)
        stats.append(ShardStats(source="coyo", shard=shard, rows_in=8, kept=7, dropped=1,
                                reasons={"normalize:too_small": 1}))
    m = Mmc4PklWriter(FS, str(root), "mmc4/docs/00000", docs_per_pkl=2)
    m.write(make_table([doc_row(i, 2 + i) for i in range(3)], DOCUMENT_SCHEMA))
    pk = m.close()
    manifest += [manifest_row(f, kind="mmc4", source="mmc4", input_shards=["00000"], config_hash="c",
                              stage_versions={}) for f in pk]
    stats.append(ShardStats(source="mmc4", shard="00000", rows_in=3, kept=3))
    write_wids_meta(FS, str(root), "curated", files)
    # one per source too, urls relative to its own folder (as pipelines/engine/progress.py writes them)
    write_wids_meta(FS, str(root / "coyo"), "curated-coyo",
                    [OutputFile(f.relpath.split("/", 1)[1], f.nsamples, f.bytes, f.sha256) for f in files])
    write_json_atomic(FS, str(root / "stats.json"), merge_stats(stats))
    write_manifest(FS, str(root), manifest)
    return root


def tar_bytes(members: list[tuple[str, bytes]], fmt: int = tarfile.USTAR_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def sample(key: str, ext: str = "jpg", txt: bytes = b"a caption", url: str | None = "https://x/1") -> list:
    meta = json.dumps({"url": url} if url is not None else {}).encode()
    return [(f"{key}.{ext}", image_bytes("JPEG")), (f"{key}.txt", txt), (f"{key}.json", meta)]


def replace_tar(root: Path, members: list[tuple[str, bytes]], fmt: int = tarfile.USTAR_FORMAT) -> None:
    (root / "coyo/00000_0000.tar").write_bytes(tar_bytes(members, fmt))
    refresh_records(root)


def assert_reports(problems: list[str], *needles: str) -> None:
    for needle in needles:
        assert any(needle in p for p in problems), f"{needle!r} not in {problems}"


# ---------------------------------------------------------------- good output


def test_good_output_is_valid(good: Path) -> None:
    assert validate_output(str(good)) == []


def test_validate_process_exits_cleanly(tmp_path: Path) -> None:
    """The CLI exits 0 every time: the manifest read must not leave arrow callbacks running at exit.

    ``pq.read_table`` on a file object aborted ~1 exit in 3 ("terminate called without an active
    exception", exit -6) when arrow's scanner thread released the file during interpreter shutdown.
    """
    import subprocess
    import sys

    from tests.helpers.runs import tiny_valid_output

    out = tmp_path / "out"
    tiny_valid_output(tmp_path, out)
    for _ in range(10):
        proc = subprocess.run([sys.executable, "-m", "vila2_curate.pipelines.cli", "validate", str(out)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        assert proc.returncode == 0 and "terminate called" not in proc.stderr, proc.stderr


def test_good_output_reads_back_like_vila(good: Path) -> None:
    samples = list(read_vila_samples(str(good)))
    meta = json.loads((good / "wids-meta.json").read_text())
    assert len(samples) == sum(e["nsamples"] for e in meta["shardlist"]) == 14
    assert [s["__key__"] for s in samples[:3]] == ["k00000", "k00001", "k00002"]
    for s in samples:
        exts = {k for k in s if k.startswith(".")}
        assert len(exts & {".jpg", ".png", ".webp"}) == 1 and {".txt", ".json"} <= exts
        assert s[".json"]["url"].startswith("https://example.com/img/")
        assert s[".txt"] in (s[".json"]["text"], s[".json"]["captions"][-1]["text"])


def test_webdataset_package_reads_the_good_output(good: Path) -> None:
    import webdataset as wds

    meta = json.loads((good / "wids-meta.json").read_text())
    urls = [str(good / e["url"]) for e in meta["shardlist"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    assert len(samples) == 14
    assert all(json.loads(s["json"])["key"] == s["__key__"] for s in samples)


def test_validate_on_memory_filesystem() -> None:
    fs = fsspec.filesystem("memory")
    root = "memory://validate-test"
    w = WdsShardWriter(fs, root, "a/00000", max_samples=2, max_bytes=None, caption_policy=CaptionPolicy())
    w.write(make_table([pair_row(i) for i in range(3)], PAIR_SCHEMA))
    files = w.close()
    write_wids_meta(fs, root, "m", files)
    write_manifest(fs, root, [manifest_row(f, kind="wds", source="a", input_shards=["00000"], config_hash="c",
                                           stage_versions={}) for f in files])
    write_json_atomic(fs, f"{root}/stats.json", merge_stats([ShardStats(source="a", shard="00000", rows_in=3,
                                                                        kept=3)]))
    try:
        assert validate_output(root) == []
    finally:
        fs.rm("/validate-test", recursive=True)


# ---------------------------------------------------------------- each problem, by name


def test_missing_wids_meta_entry(good: Path) -> None:
    meta = json.loads((good / "wids-meta.json").read_text())
    meta["shardlist"] = meta["shardlist"][1:]
    (good / "wids-meta.json").write_text(json.dumps(meta))
    assert validate_output(str(good)) == ["coyo/00000_0000.tar: missing from wids-meta.json (VILA would never read it)"]


def test_per_source_wids_meta_is_checked_relative_to_its_folder(good: Path) -> None:
    meta = json.loads((good / "coyo/wids-meta.json").read_text())
    assert meta["shardlist"][0]["url"] == "00000_0000.tar"
    meta["shardlist"][1]["nsamples"] = 99
    (good / "coyo/wids-meta.json").write_text(json.dumps(meta))
    assert validate_output(str(good)) == [
        "coyo/wids-meta.json: 00000_0001.tar nsamples 99 but the tar holds 3 samples"]


def test_missing_wids_meta_file(good: Path) -> None:
    (good / "wids-meta.json").unlink()
    assert_reports(validate_output(str(good)), "wids-meta.json is missing")


def test_wrong_nsamples(good: Path) -> None:
    meta = json.loads((good / "wids-meta.json").read_text())
    meta["shardlist"][0]["nsamples"] += 1
    (good / "coyo/wids-meta.json").unlink()
    (good / "wids-meta.json").write_text(json.dumps(meta))
    assert validate_output(str(good)) == [
        "wids-meta.json: coyo/00000_0000.tar nsamples 5 but the tar holds 4 samples"]


def test_wrong_kind_unsorted_and_wrong_filesize(good: Path) -> None:
    meta = json.loads((good / "wids-meta.json").read_text())
    meta["__kind__"] = "WebDataset"
    meta["shardlist"].reverse()
    meta["shardlist"][0]["filesize"] = 1
    (good / "wids-meta.json").write_text(json.dumps(meta))
    assert_reports(validate_output(str(good)), "__kind__", "not sorted", "filesize 1")


def test_jpeg_member(good: Path) -> None:
    replace_tar(good, sample("a", ext="jpeg") + sample("b"))
    assert_reports(validate_output(str(good)), "sample 'a' has a .jpeg member")


def test_dotted_key(good: Path) -> None:
    replace_tar(good, sample("a.b") + sample("c"))
    assert_reports(validate_output(str(good)), "dotted key")


def test_non_utf8_txt(good: Path) -> None:
    replace_tar(good, sample("a", txt="caf\u00e9".encode("latin-1")))
    assert validate_output(str(good)) == ["coyo/00000_0000.tar: sample 'a' .txt is not UTF-8"]


def test_json_without_url_and_undecodable_image(good: Path) -> None:
    members = sample("a", url=None) + [("b.jpg", b"not an image"), ("b.txt", b"t"), ("b.json", b'{"url": "u"}')]
    replace_tar(good, members)
    assert_reports(validate_output(str(good)), "sample 'a' .json has no \"url\"", "sample 'b' image does not decode")


def test_compressed_tar(good: Path) -> None:
    path = good / "coyo/00000_0000.tar"
    path.write_bytes(gzip.compress(path.read_bytes(), mtime=0))
    assert_reports(validate_output(str(good)), "coyo/00000_0000.tar: compressed tar (gzip)")


def test_leftover_tmp_file(good: Path) -> None:
    (good / "coyo/.00001_0000.tar.tmp-1234abcd").write_bytes(b"partial")
    (good / "stats.json.tmp").write_bytes(b"{")
    problems = validate_output(str(good))
    assert problems == ["coyo/.00001_0000.tar.tmp-1234abcd: leftover temporary file (an interrupted write)",
                        "stats.json.tmp: leftover temporary file (an interrupted write)"]


def test_unbalanced_stats(good: Path) -> None:
    stats = json.loads((good / "stats.json").read_text())
    stats["shards"][0]["kept"] -= 1
    stats["total"]["dropped"] += 5
    (good / "stats.json").write_text(json.dumps(stats))
    problems = validate_output(str(good))
    assert_reports(problems, "shard coyo/00000 unbalanced", "total unbalanced")
    assert all("unbalanced" in p for p in problems)


def test_missing_stats(good: Path) -> None:
    (good / "stats.json").unlink()
    assert validate_output(str(good)) == ["stats.json is missing"]


def test_manifest_mismatch(good: Path) -> None:
    import pyarrow.parquet as pq

    table = pq.read_table(good / "manifest.parquet")
    rows = table.to_pylist()
    rows[0]["sha256"] = "0" * 64
    rows[1]["bytes"] += 1
    dropped = rows.pop()
    write_manifest(FS, str(good), rows)
    assert_reports(validate_output(str(good)), "sha256 does not match", "bytes", f"{dropped['shard']}: not listed")


def test_non_regular_and_pax_long_name_members(good: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        d = tarfile.TarInfo("somedir")
        d.type = tarfile.DIRTYPE
        tar.addfile(d)
        for name, data in sample("k" * 120):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
    (good / "coyo/00000_0000.tar").write_bytes(buf.getvalue())
    refresh_records(good)
    assert_reports(validate_output(str(good)), "not a regular file", "pax header sets ['path']")


def test_mmc4_problems(good: Path) -> None:
    docs = [doc_row(0, 2)]
    w = Mmc4PklWriter(FS, str(good), "mmc4/docs/00001", docs_per_pkl=5, min_files=1)
    w.write(make_table(docs, DOCUMENT_SCHEMA))
    w.close()
    (good / "mmc4/docs/p00-00001-0000.count").write_text("7\n")
    (good / "mmc4/docs/00002_0000.pkl").write_bytes(pickle.dumps([]))
    (good / "mmc4/docs/README.md").write_text("x")
    refresh_records(good)
    problems = validate_output(str(good))
    assert_reports(problems, "p00-00001-0000.count: says 7 documents but mmc4/docs/p00-00001-0000.pkl holds 1",
                   "mmc4/docs/00002_0000.count: missing", "README.md: not a .pkl/.count file")
    assert validate_output(str(good), max_images_per_doc=1) != problems  # the image cap is checked too
    assert_reports(validate_output(str(good), max_images_per_doc=1), "over the limit of 1")


def test_pickles_with_classes_are_not_loaded(good: Path) -> None:
    import collections

    (good / "mmc4/docs/p00-00000-0000.pkl").write_bytes(pickle.dumps([collections.OrderedDict()]))
    assert_reports(validate_output(str(good)), "refusing to load collections.OrderedDict")


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


def resync(root: Path) -> None:
    """After editing files by hand: wids-meta entries and manifest rows describe the files as they are now
    (rows of deleted files removed), so only the corruption under test remains."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for meta_path in root.rglob("wids-meta.json"):
        meta = json.loads(meta_path.read_text())
        for e in meta["shardlist"]:
            f = _output_file(meta_path.parent, e["url"])
            e["filesize"], e["nsamples"] = f.bytes, f.nsamples
        meta_path.write_text(json.dumps(meta))
    table = pq.read_table(root / "manifest.parquet")
    rows = []
    for r in table.to_pylist():
        if not (root / r["shard"]).exists():
            continue
        f = _output_file(root, r["shard"])
        r.update(bytes=f.bytes, sha256=f.sha256, nsamples=f.nsamples)
        rows.append(r)
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), root / "manifest.parquet")


def rewrite_tar(path: Path, edit, fmt: int = tarfile.USTAR_FORMAT) -> None:
    """Rewrite a tar member by member through ``edit(name, data) -> [(name, data), ...]``."""
    with tarfile.open(path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    out = []
    for name, data in members:
        out.extend(edit(name, data))
    path.write_bytes(tar_bytes(out, fmt))


def first_tar(root: Path, source: str = "coyo_bytes") -> Path:
    return sorted((root / source).glob("*.tar"))[0]


def sample_urls(tar_path: Path) -> dict[str, str]:
    with tarfile.open(tar_path) as tar:
        return {m.name.split(".")[0]: json.loads(tar.extractfile(m).read())["url"]
                for m in tar.getmembers() if m.name.endswith(".json")}


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
