"""validate_output on a hand-built output: a good one passes and reads back like VILA; each break is named."""

from __future__ import annotations

import gzip
import io
import json
import pickle
import tarfile
from pathlib import Path

import fsspec
import pytest

from tests.helpers.outputs import FS, assert_reports, refresh_records, replace_tar, sample
from tests.helpers.rows import doc_row, pair_row
from vila2_curate.pipelines.io.writers.atomic import OutputFile, write_json_atomic
from vila2_curate.pipelines.io.writers.mmc4 import Mmc4PklWriter
from vila2_curate.pipelines.io.writers.records import (
    manifest_row,
    write_manifest,
    write_rejects,
    write_wids_meta,
)
from vila2_curate.pipelines.io.writers.wds import WdsShardWriter
from vila2_curate.pipelines.validate import read_vila_samples, validate_output
from vila2_curate.schemas.config import CaptionPolicy
from vila2_curate.schemas.records import ShardStats, merge_stats
from vila2_curate.schemas.rows import DOCUMENT_SCHEMA, PAIR_SCHEMA, make_table


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
    # one per source too, urls relative to its own folder (as pipelines/engine/finalize.py writes them)
    write_wids_meta(FS, str(root / "coyo"), "curated-coyo",
                    [OutputFile(f.relpath.split("/", 1)[1], f.nsamples, f.bytes, f.sha256) for f in files])
    write_json_atomic(FS, str(root / "stats.json"), merge_stats(stats))
    write_manifest(FS, str(root), manifest)
    return root


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
