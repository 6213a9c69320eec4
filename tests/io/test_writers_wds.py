"""WdsShardWriter: VILA WebDataset tars, their rollover, members, bytes and refusals."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import fsspec
import numpy as np
import pytest
from PIL import Image

from tests.helpers.rows import caption, pair_row, pairs
from tests.helpers.writers import LATEST, all_files, write_pairs
from vila2_curate.pipelines.io.writers.wds import FIXED_MTIME, WdsShardWriter, tar_file_size
from vila2_curate.schemas.rows import PAIR_SCHEMA, make_table

# ---------------------------------------------------------------- WebDataset tars


def test_same_rows_give_byte_identical_tars(tmp_path: Path) -> None:
    table = pairs(12)
    a = write_pairs(tmp_path / "a", table, batch=5)
    b = write_pairs(tmp_path / "b", table, batch=12)
    assert a == b
    for f in a:
        assert (tmp_path / "a" / f.relpath).read_bytes() == (tmp_path / "b" / f.relpath).read_bytes()
        assert f.bytes == (tmp_path / "a" / f.relpath).stat().st_size
    assert [f.relpath for f in a] == ["coyo/00000_0000.tar", "coyo/00000_0001.tar"]
    assert [f.nsamples for f in a] == [10, 2]


@pytest.mark.parametrize("batch", [1, 3, 7, 25])
def test_rollover_by_samples_is_independent_of_batches(tmp_path: Path, batch: int) -> None:
    files = write_pairs(tmp_path, pairs(25), batch=batch, max_samples=10)
    assert [(f.relpath, f.nsamples) for f in files] == [
        ("coyo/00000_0000.tar", 10), ("coyo/00000_0001.tar", 10), ("coyo/00000_0002.tar", 5)]
    assert all_files(tmp_path) == [f.relpath for f in files]


def test_rollover_by_bytes_is_independent_of_batches(tmp_path: Path) -> None:
    table = pairs(20)
    limit = 3 * 10240
    results = []
    for batch in (1, 4, 20):
        files = write_pairs(tmp_path / str(batch), table, batch=batch, max_samples=None, max_bytes=limit)
        results.append([(f.relpath, f.nsamples, f.sha256) for f in files])
        assert sum(f.nsamples for f in files) == 20
        assert len(files) > 2
        for f in files:
            assert f.bytes <= limit
            assert f.bytes == (tmp_path / str(batch) / f.relpath).stat().st_size
    assert results[0] == results[1] == results[2]


def test_both_limits_close_at_whichever_comes_first(tmp_path: Path) -> None:
    files = write_pairs(tmp_path, pairs(20), batch=6, max_samples=2, max_bytes=1 << 30)
    assert [f.nsamples for f in files] == [2] * 10


def test_a_sample_bigger_than_max_bytes_gets_its_own_part(tmp_path: Path) -> None:
    files = write_pairs(tmp_path, pairs(3), batch=3, max_samples=None, max_bytes=1024)
    assert [f.nsamples for f in files] == [1, 1, 1]


def test_predicted_tar_size_matches_tarfile() -> None:
    for payload in (0, 512, 9 * 1024, 10240 - 1024, 10240 - 1023, 123456):
        assert tar_file_size(payload) % tarfile.RECORDSIZE == 0
        assert tar_file_size(payload) >= payload + 1024


def test_members_are_ustar_regular_files_with_fixed_metadata(tmp_path: Path) -> None:
    table = make_table([pair_row(0), pair_row(1, fmt="png"), pair_row(2, fmt="webp"), pair_row(3, fmt="jpeg")],
                       PAIR_SCHEMA)
    (f,) = write_pairs(tmp_path, table, batch=4)
    data = (tmp_path / f.relpath).read_bytes()
    # Raw headers: plain ustar magic, no pax ('x'/'g') or GNU long-name ('L') entries.
    offset, types = 0, []
    while data[offset:offset + 512] != b"\0" * 512:
        hdr = data[offset:offset + 512]
        assert hdr[257:265] == b"ustar\x0000"
        assert hdr[345:500].strip(b"\0") == b""  # no ustar prefix (VILA reads only the name field)
        types.append(hdr[156:157])
        size = int(hdr[124:136].strip(b"\0 "), 8)
        offset += 512 + (size + 511) // 512 * 512
    assert set(types) == {b"0"}
    assert len(data) % tarfile.RECORDSIZE == 0
    with tarfile.open(tmp_path / f.relpath, "r:") as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == [
        "k00000.jpg", "k00000.txt", "k00000.json", "k00001.png", "k00001.txt", "k00001.json",
        "k00002.webp", "k00002.txt", "k00002.json", "k00003.jpg", "k00003.txt", "k00003.json"]
    for m in members:
        assert m.isreg() and m.mtime == FIXED_MTIME and m.uid == 0 and m.gid == 0
        assert m.uname == "" and m.gname == "" and not m.pax_headers


def test_sample_json_and_txt_content(tmp_path: Path) -> None:
    (f,) = write_pairs(tmp_path, pairs(1), batch=1)
    with tarfile.open(tmp_path / f.relpath) as tar:
        meta = json.loads(tar.extractfile("k00000.json").read())
        txt = tar.extractfile("k00000.txt").read().decode()
        img = tar.extractfile("k00000.jpg").read()
    assert txt == "recaption one 0"
    assert img == pair_row(0)["image"]
    assert meta["url"] == "https://example.com/img/0.jpg"
    assert meta["key"] == "k00000" and meta["source"] == "coyo" and meta["source_key"] == "0"
    assert meta["text"] == "alt text 0"
    assert [c["round"] for c in meta["captions"]] == [0, 1]
    assert meta["captions"][1] == caption(1, "recaption one 0")
    assert meta["txt_source"] == {"round": 1, "model": "vlm", "prompt_id": "p1", "params_hash": "h"}
    assert meta["specialists"]["models"] == {"ocr": "rapidocr-1.3"}
    assert meta["specialists"]["ocr"][0]["box"] == [0.1, 0.2, 0.3, 0.4]
    assert meta["clip_score"] == 0.75 and meta["clip_cosine"] == 0.3 and meta["clip_model"] == "ViT-B-32"
    assert (meta["delta_loss"], meta["logp_small"], meta["logp_large"]) == (1.5, -10.0, -8.5)
    assert (meta["width"], meta["height"], meta["sha256"]) == (32, 24, f"{0:064x}")
    assert meta["phash"] == "f0f0f0f0f0f0f0f0" and len(meta["phash"]) == 16
    assert meta["flags"] == ["boilerplate_caption"]
    assert meta["meta"] == {"aesthetic": 5.1, "num_faces": 0}


@pytest.mark.parametrize("key", ["has.dot", "a" * 96, "sub/dir"])
def test_bad_keys_are_refused_and_leave_no_temp_file(tmp_path: Path, key: str) -> None:
    table = make_table([pair_row(0), pair_row(1, key=key)], PAIR_SCHEMA)
    with pytest.raises(ValueError, match="key"):
        write_pairs(tmp_path, table, batch=2)
    assert not [f for f in all_files(tmp_path) if ".tmp" in f]
    w = WdsShardWriter(fsspec.filesystem("file"), str(tmp_path / "again"), "coyo/00000", max_samples=10,
                       max_bytes=None, caption_policy=LATEST)
    assert [i for i, _ in w.write(table)] == [1]  # the bad row is refused, the good one written
    assert [f.nsamples for f in w.close()] == [1]


def test_key_at_the_name_limit_is_accepted(tmp_path: Path) -> None:
    key = "a" * 95  # "<key>.json" is exactly 100 bytes
    (f,) = write_pairs(tmp_path, make_table([pair_row(0, key=key)], PAIR_SCHEMA), batch=1)
    with tarfile.open(tmp_path / f.relpath) as tar:
        assert f"{key}.json" in tar.getnames()


def test_dropped_rows_duplicates_and_missing_urls_are_refused(tmp_path: Path) -> None:
    for bad in ([pair_row(0, drop_reason="x", drop_stage="s")], [pair_row(0, quarantined=True)]):
        with pytest.raises(RuntimeError):  # a dropped row reaching the writer is an engine bug
            write_pairs(tmp_path, make_table(bad, PAIR_SCHEMA), batch=2)
    for bad in ([pair_row(0), pair_row(0)], [pair_row(0, url=None)], [pair_row(0, image_format="gif")]):
        with pytest.raises(ValueError):
            write_pairs(tmp_path / "refused", make_table(bad, PAIR_SCHEMA), batch=2)
    assert not [f for f in all_files(tmp_path) if ".tmp" in f]


def test_exception_mid_part_keeps_finished_parts_and_removes_the_temp(tmp_path: Path) -> None:
    rows = [pair_row(i) for i in range(12)] + [pair_row(12, drop_reason="x", drop_stage="s")]
    with pytest.raises(RuntimeError):
        write_pairs(tmp_path, make_table(rows, PAIR_SCHEMA), batch=13, max_samples=10)
    assert all_files(tmp_path) == ["coyo/00000_0000.tar"]


def test_no_rows_writes_nothing(tmp_path: Path) -> None:
    assert write_pairs(tmp_path, pairs(0), batch=1) == []
    assert all_files(tmp_path) == []


def test_writer_works_on_memory_filesystem() -> None:
    fs = fsspec.filesystem("memory")
    w = WdsShardWriter(fs, "memory://wds-test", "src/00001", max_samples=3, max_bytes=None, caption_policy=LATEST)
    w.write(pairs(4))
    files = w.close()
    assert [f.relpath for f in files] == ["src/00001_0000.tar", "src/00001_0001.tar"]
    assert sorted(fs.find("/wds-test")) == ["/wds-test/src/00001_0000.tar", "/wds-test/src/00001_0001.tar"]
    fs.rm("/wds-test", recursive=True)


def test_webdataset_package_reads_the_shards_back(tmp_path: Path) -> None:
    import webdataset as wds

    table = make_table([pair_row(i, fmt=["jpg", "png", "webp"][i % 3]) for i in range(7)], PAIR_SCHEMA)
    files = write_pairs(tmp_path, table, batch=3, max_samples=4)
    urls = [str(tmp_path / f.relpath) for f in files]
    samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    assert [s["__key__"] for s in samples] == [f"k{i:05d}" for i in range(7)]
    for i, s in enumerate(samples):
        ext = ["jpg", "png", "webp"][i % 3]
        assert set(s) >= {ext, "txt", "json"}
        assert s[ext] == table.column("image")[i].as_py()
        assert s["txt"].decode() == f"recaption one {i}"
        assert json.loads(s["json"])["url"] == f"https://example.com/img/{i}.jpg"
        assert Image.open(io.BytesIO(s[ext])).size == (32, 24)


# ---------------------------------------------------------------- tar bytes against tarfile


@pytest.mark.parametrize("name", ["a.jpg", "000010007.json", "x" * 95 + ".json", "ü-key.txt"])
@pytest.mark.parametrize("size", [0, 1, 511, 512, 513, 60_000, 8**11 - 1])
def test_hand_built_ustar_header_equals_tarfile(name: str, size: int) -> None:
    from vila2_curate.pipelines.io.writers.wds import _tarinfo, ustar_header

    expected = _tarinfo(name, size).tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
    assert ustar_header(name, size) == expected


def _tarfile_copy(part: Path) -> bytes:
    """What tarfile writes (USTAR, the writer's header fields) for the members of ``part``."""
    from vila2_curate.pipelines.io.writers.wds import _tarinfo

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar, tarfile.open(part) as src:
        for m in src.getmembers():
            data = src.extractfile(m).read()
            tar.addfile(_tarinfo(m.name, len(data)), io.BytesIO(data))
    return buf.getvalue()


def test_tar_bytes_equal_tarfile_archive(tmp_path: Path) -> None:
    """The whole part is byte-identical to what tarfile writes for the same members."""
    (f,) = write_pairs(tmp_path, pairs(7), batch=3)
    written = (tmp_path / f.relpath).read_bytes()
    assert written == _tarfile_copy(tmp_path / f.relpath)


def test_parts_over_the_write_buffer_equal_tarfile_and_their_hash(tmp_path: Path) -> None:
    """Parts of several MiB (written in ~1 MiB batches) stay byte-identical to tarfile, sha256 included."""
    rng = np.random.default_rng(0)
    table = make_table([pair_row(i, image=b"\xff\xd8" + rng.bytes(int(rng.integers(200_000, 700_000))))
                        for i in range(9)], PAIR_SCHEMA)
    (f,) = write_pairs(tmp_path, table, batch=4)
    written = (tmp_path / f.relpath).read_bytes()
    assert len(written) > 3 << 20 and f.bytes == len(written)
    assert f.sha256 == hashlib.sha256(written).hexdigest()
    assert written == _tarfile_copy(tmp_path / f.relpath)
