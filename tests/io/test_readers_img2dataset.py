"""Img2DatasetReader: img2dataset tar + parquet shards, whole, failed, truncated, hostile or on fsspec."""

from __future__ import annotations

import io
import json
import os
import tarfile
import uuid
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.helpers.readers import JPG, PNG, WEBP, by_reason, read_all
from vila2_curate.pipelines.io.readers import Img2DatasetReader, SourceFormatError, make_reader
from vila2_curate.schemas.config import SourceConfig
from vila2_curate.schemas.keys import safe_key

# ------------------------------------------------------------------------------------------- fixtures


def i2d_key(shard: int, index: int) -> str:
    """img2dataset's compute_key for 10000 samples/shard and 5 shard digits: 9 zero-padded digits."""
    return f"{shard * 10_000 + index:09d}"


def i2d_meta(key: str, i: int, status: str = "success", error: str | None = None) -> dict[str, Any]:
    ok = status == "success"
    return {
        "url": f"http://example.com/{i}.jpg",
        "caption": f"caption number {i}",
        "similarity": 0.3 + i / 1000,  # a save_additional_columns column
        "key": key,
        "status": status,
        "error_message": error,
        "width": 8 if ok else None,
        "height": 8 if ok else None,
        "original_width": 640 if ok else None,
        "original_height": 480 if ok else None,
        "exif": json.dumps({"Image Make": "Canon"}) if ok else None,
        "sha256": ("ab" * 32) if ok else None,
    }


_I2D_PARQUET_SCHEMA = pa.schema(
    [("url", pa.string()), ("caption", pa.string()), ("similarity", pa.float64()), ("key", pa.string()),
     ("status", pa.string()), ("error_message", pa.string()), ("width", pa.int64()),
     ("height", pa.int64()), ("original_width", pa.int64()), ("original_height", pa.int64()),
     ("exif", pa.string()), ("sha256", pa.string())]
)


def write_i2d_shard(
    folder: Path, shard: int = 0, n_ok: int = 3, failed: tuple[str, ...] = (), parquet: bool = True
) -> dict[str, Any]:
    """A shard laid out exactly as img2dataset's WebDatasetSampleWriter + BufferedParquetWriter write it.

    Successes go to the tar through webdataset's TarWriter (``<key>.json`` / ``.jpg`` / ``.txt``, json
    indented by 4); every row, failures included, goes to the parquet; ``_stats.json`` comes last.
    """
    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    name = f"{shard:05d}"
    metas = []
    with open(folder / f"{name}.tar", "wb") as f:
        tw = wds.TarWriter(f)
        i = 0
        for _ in range(n_ok):
            key = i2d_key(shard, i)
            meta = i2d_meta(key, i)
            tw.write({"__key__": key, "jpg": JPG, "txt": meta["caption"], "json": json.dumps(meta, indent=4)})
            metas.append(meta)
            i += 1
        for status in failed:
            metas.append(i2d_meta(i2d_key(shard, i), i, status, error=f"{status}: HTTP Error 404"))
            i += 1
        tw.close()
    if parquet:
        pq.write_table(pa.Table.from_pylist(metas, schema=_I2D_PARQUET_SCHEMA), folder / f"{name}.parquet")
    stats = {"count": len(metas), "successes": n_ok, "failed_to_download": failed.count("failed_to_download"),
             "failed_to_resize": failed.count("failed_to_resize"), "status_dict": {}}
    (folder / f"{name}_stats.json").write_text(json.dumps(stats, indent=4))
    return {"tar": folder / f"{name}.tar", "rows": len(metas), "ok": n_ok}


def write_tar(path: Path, members: list[tuple[str, bytes]], links: list[tarfile.TarInfo] = ()) -> None:
    """A USTAR tar as webdataset writes it (mode 0o444, user bigdata), plus optional link members."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as t:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode, ti.uname, ti.gname = len(data), 0o444, "bigdata", "bigdata"
            t.addfile(ti, io.BytesIO(data))
        for ti in links:
            t.addfile(ti)


def sample_members(key: str, caption: bytes | str = "a cat", image: bytes = JPG, ext: str = "jpg",
                   url: str = "http://x/y.jpg") -> list[tuple[str, bytes]]:
    cap = caption.encode() if isinstance(caption, str) else caption
    meta = json.dumps({"url": url, "key": key, "status": "success", "error_message": None}, indent=4)
    return [(f"{key}.json", meta.encode()), (f"{key}.{ext}", image), (f"{key}.txt", cap)]


def i2d_source(*paths: str, **kw: Any) -> SourceConfig:
    return SourceConfig(name="laion", kind="img2dataset", paths=list(paths), **kw)


# ------------------------------------------------------------------------------------------ img2dataset


def test_img2dataset_normal_and_failed_rows(tmp_path: Path) -> None:
    shard = write_i2d_shard(tmp_path / "out", n_ok=3, failed=("failed_to_download", "failed_to_resize"))
    reader = make_reader(i2d_source(str(tmp_path / "out" / "*.tar")))
    assert isinstance(reader, Img2DatasetReader)
    shards = reader.list_shards()
    assert [s.shard_id for s in shards] == ["00000"]
    assert shards[0].row_kind == "pair" and shards[0].kind == "img2dataset"
    _, rows = read_all(reader)
    assert len(rows) == shard["rows"] == 5  # accounting identity

    ok = [r for r in rows if r["drop_reason"] is None]
    assert [r["key"] for r in ok] == [i2d_key(0, i) for i in range(3)]
    first = ok[0]
    assert first["source"] == "laion" and first["shard"] == "00000" and first["source_key"] is None
    assert first["image"] == JPG and first["image_format"] == "jpg"
    assert first["text"] == "caption number 0" and first["url"] == "http://example.com/0.jpg"
    assert first["quarantined"] is False and first["sha256"] is None  # hashing is normalize's job
    meta = json.loads(first["meta"])
    assert meta["status"] == "success" and meta["original_width"] == 640 and meta["similarity"] == 0.3
    assert meta["sha256"] == "ab" * 32  # img2dataset's hash of the *downloaded* bytes, kept as given
    assert "url" not in meta and "caption" not in meta and "key" not in meta

    failed = [r for r in rows if r["drop_reason"] is not None]
    assert {r["drop_reason"] for r in failed} == {"img2dataset_failed_to_download", "img2dataset_failed_to_resize"}
    for r in failed:
        assert r["drop_stage"] == "read" and r["quarantined"] is False and r["image"] is None
        assert "HTTP Error 404" in json.loads(r["meta"])["error_message"]
        assert r["url"] and r["text"]


def test_img2dataset_png_and_webp_members(tmp_path: Path) -> None:
    members = sample_members("k1", image=PNG, ext="png") + sample_members("k2", image=WEBP, ext="webp")
    members += sample_members("k3", image=PNG, ext="jpg")  # mislabelled: magic bytes win
    write_tar(tmp_path / "00001.tar", members)
    _, rows = read_all(Img2DatasetReader(i2d_source(str(tmp_path))))
    assert [(r["key"], r["image_format"]) for r in rows] == [("k1", "png"), ("k2", "webp"), ("k3", "png")]


@pytest.mark.parametrize("with_parquet", [True, False])
def test_img2dataset_truncated_tar(tmp_path: Path, with_parquet: bool) -> None:
    shard = write_i2d_shard(tmp_path, n_ok=6, failed=("failed_to_download",), parquet=with_parquet)
    data = shard["tar"].read_bytes()
    shard["tar"].write_bytes(data[: len(data) // 2 + 100])  # cut inside a member
    _, rows = read_all(Img2DatasetReader(i2d_source(str(shard["tar"]))))
    reasons = by_reason(rows)
    kept = reasons.get(None, 0)
    assert 0 < kept < 6
    if with_parquet:
        assert len(rows) == shard["rows"]  # every parquet row accounted for, exactly once
        assert reasons.get("tar_truncated", 0) + reasons["missing_from_tar"] + kept == 6
        assert reasons["img2dataset_failed_to_download"] == 1
        missing = [r for r in rows if r["drop_reason"] == "missing_from_tar"]
        assert all(r["quarantined"] and r["url"] for r in missing)
    else:
        tail = [r for r in rows if r["key"] == "00000_truncated"]
        assert len(tail) == 1 and tail[0]["quarantined"] and tail[0]["drop_reason"] == "tar_truncated"


def test_img2dataset_tar_cut_at_member_boundary_detected(tmp_path: Path) -> None:
    """tarfile ends silently at a missing header; the reader still reports the truncation."""
    write_tar(tmp_path / "00000.tar", sample_members("a") + sample_members("b"))
    data = (tmp_path / "00000.tar").read_bytes()
    with tarfile.open(tmp_path / "00000.tar") as t:
        cut = t.getmembers()[3].offset  # header of "b.json": the archive ends right after "a"'s members
    (tmp_path / "00000.tar").write_bytes(data[:cut])
    with tarfile.open(tmp_path / "00000.tar") as t:  # sanity: the cut is exactly after "a"'s members
        assert [m.name for m in t.getmembers()] == ["a.json", "a.jpg", "a.txt"]
    _, rows = read_all(Img2DatasetReader(i2d_source(str(tmp_path / "00000.tar"))))
    assert by_reason(rows) == {"tar_truncated": 2}  # "a" itself ends at the cut, plus the unknown tail
    assert {r["key"] for r in rows} == {"a", "00000_truncated"}


@pytest.mark.parametrize("with_parquet", [True, False])
def test_img2dataset_zero_byte_tar(tmp_path: Path, with_parquet: bool) -> None:
    shard = write_i2d_shard(tmp_path, n_ok=4, failed=("failed_to_resize",), parquet=with_parquet)
    shard["tar"].write_bytes(b"")
    _, rows = read_all(Img2DatasetReader(i2d_source(str(shard["tar"]))))
    if with_parquet:
        assert len(rows) == shard["rows"]
        assert by_reason(rows) == {"missing_from_tar": 4, "img2dataset_failed_to_resize": 1}
    else:
        assert len(rows) == 1 and rows[0]["drop_reason"] == "tar_truncated" and rows[0]["quarantined"]


def test_img2dataset_all_failed_shard_is_an_empty_valid_tar(tmp_path: Path) -> None:
    shard = write_i2d_shard(tmp_path, n_ok=0, failed=("failed_to_download",) * 3)
    _, rows = read_all(Img2DatasetReader(i2d_source(str(shard["tar"]))))
    assert len(rows) == 3 and by_reason(rows) == {"img2dataset_failed_to_download": 3}


def test_img2dataset_stats_json_reveals_lost_samples_without_parquet(tmp_path: Path) -> None:
    shard = write_i2d_shard(tmp_path, n_ok=3, parquet=False)
    write_tar(shard["tar"], sample_members(i2d_key(0, 0)))  # a clean tar with fewer samples than stats say
    _, rows = read_all(Img2DatasetReader(i2d_source(str(shard["tar"]))))
    assert by_reason(rows) == {None: 1, "tar_truncated": 1}


def test_img2dataset_unsafe_members_never_extracted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    evil = b"EVIL-PAYLOAD"
    sym = tarfile.TarInfo("link.jpg")
    sym.type, sym.linkname = tarfile.SYMTYPE, "/etc/passwd"
    hard = tarfile.TarInfo("hard.jpg")
    hard.type, hard.linkname = tarfile.LNKTYPE, "good.jpg"
    folder = tarfile.TarInfo("somedir")
    folder.type = tarfile.DIRTYPE
    members = sample_members("good") + [
        ("../evil.jpg", evil), ("../../evil2.txt", evil), ("/tmp/abs_evil.jpg", evil),
        ("sub/nested.jpg", JPG), ("a..b.jpg", JPG),
    ]
    (tmp_path / "data").mkdir()
    tar = tmp_path / "data" / "00000.tar"
    write_tar(tar, members, links=[sym, hard, folder])
    before = {p for p in tmp_path.rglob("*")}
    _, rows = read_all(Img2DatasetReader(i2d_source(str(tar))))
    # 1 good sample + 5 unsafe regular members + 3 link/dir members
    assert len(rows) == 9
    assert by_reason(rows) == {None: 1, "tar_member_unsafe_path": 5, "tar_member_symlink": 1,
                               "tar_member_hardlink": 1, "tar_member_directory": 1}
    bad = [r for r in rows if r["quarantined"]]
    assert all(r["image"] is None for r in bad)  # payloads of unsafe members are never read
    assert {r["source_key"] for r in bad} >= {"../evil.jpg", "/tmp/abs_evil.jpg", "link.jpg"}
    assert json.loads(next(r for r in bad if r["source_key"] == "link.jpg")["meta"])["linkname"] == "/etc/passwd"
    # nothing was written anywhere: not beside the tar, not in cwd, not at the absolute path
    assert {p for p in tmp_path.rglob("*")} == before
    assert not os.path.exists("/tmp/abs_evil.jpg") or b"EVIL" not in Path("/tmp/abs_evil.jpg").read_bytes()
    assert list(work.iterdir()) == []


def test_img2dataset_caption_not_utf8_and_broken_json(tmp_path: Path) -> None:
    members = sample_members("a") + sample_members("b", caption=b"caf\xe9 \xff")
    members += [("c.json", b"{not json"), ("c.jpg", JPG), ("c.txt", b"ok")]
    members += [("d.json", b"{}"), ("d.txt", b"caption without image")]
    members += [("e.jpg", JPG), ("e.json", json.dumps({"caption": "from json", "url": "u"}).encode())]
    write_tar(tmp_path / "00000.tar", members)
    _, rows = read_all(Img2DatasetReader(i2d_source(str(tmp_path / "00000.tar"))))
    got = {r["key"]: r for r in rows}
    assert len(rows) == 5
    assert got["a"]["drop_reason"] is None
    assert got["b"]["drop_reason"] == "caption_not_utf8" and got["b"]["quarantined"]
    assert got["b"]["image"] == JPG  # payload kept for inspection
    assert got["c"]["drop_reason"] == "json_invalid"
    assert got["d"]["drop_reason"] == "missing_image"
    assert got["e"]["drop_reason"] is None and got["e"]["text"] == "from json"  # txt absent: json caption


def test_img2dataset_dot_slash_prefix_is_not_a_folder(tmp_path: Path) -> None:
    write_tar(tmp_path / "00000.tar", [(f"./{n}", d) for n, d in sample_members("a")])
    _, rows = read_all(Img2DatasetReader(i2d_source(str(tmp_path / "00000.tar"))))
    assert [(r["key"], r["drop_reason"]) for r in rows] == [("a", None)]


def test_img2dataset_dotted_and_unsafe_keys_rewritten(tmp_path: Path) -> None:
    members = sample_members("img.v2") + sample_members("key with space")
    write_tar(tmp_path / "00000.tar", members)
    _, rows = read_all(Img2DatasetReader(i2d_source(str(tmp_path / "00000.tar"))))
    assert len(rows) == 2 and by_reason(rows) == {None: 2}
    assert [(r["key"], r["source_key"]) for r in rows] == [
        (safe_key("img.v2"), "img.v2"), (safe_key("key with space"), "key with space")]
    assert "." not in rows[0]["key"]


def test_img2dataset_duplicate_key(tmp_path: Path) -> None:
    members = sample_members("a", caption="first") + sample_members("a", caption="second")
    members += sample_members("b") + sample_members("a", caption="third")
    write_tar(tmp_path / "00000.tar", members)
    _, rows = read_all(Img2DatasetReader(i2d_source(str(tmp_path / "00000.tar"))))
    assert len(rows) == 4
    assert rows[0]["key"] == "a" and rows[0]["text"] == "first" and rows[0]["drop_reason"] is None
    dups = [r for r in rows if r["drop_reason"] == "duplicate_key"]
    assert [r["text"] for r in dups] == ["second", "third"]
    assert all(r["quarantined"] and r["source_key"] == "a" and r["key"] != "a" for r in dups)


def test_img2dataset_memory_filesystem_and_sorted_shards(tmp_path: Path) -> None:
    base = f"memory://i2d-{uuid.uuid4().hex}"
    fs = fsspec.filesystem("memory")
    for shard in (1, 0):
        local = write_i2d_shard(tmp_path / str(shard), shard=shard, n_ok=2, failed=("failed_to_download",))
        for suffix in (".tar", ".parquet", "_stats.json"):
            fs.pipe(f"{base}/{shard:05d}{suffix}", Path(str(local["tar"])[:-4] + suffix).read_bytes())
    reader = Img2DatasetReader(i2d_source(f"{base}/*.tar"))
    assert [s.shard_id for s in reader.list_shards()] == ["00000", "00001"]
    assert all(s.path.startswith("memory://") for s in reader.list_shards())
    _, rows = read_all(reader)
    assert len(rows) == 6 and by_reason(rows) == {None: 4, "img2dataset_failed_to_download": 2}
    assert [r["key"] for r in rows if r["drop_reason"] is None] == [
        i2d_key(0, 0), i2d_key(0, 1), i2d_key(1, 0), i2d_key(1, 1)]


def test_img2dataset_batch_size_bounds_tables(tmp_path: Path) -> None:
    shard = write_i2d_shard(tmp_path, n_ok=45, failed=("failed_to_download",) * 5)
    tables, rows = read_all(Img2DatasetReader(i2d_source(str(shard["tar"]))), batch_size=8)
    assert len(rows) == 50 and [t.num_rows for t in tables] == [8] * 6 + [2]


def test_missing_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SourceFormatError, match="matched no"):
        Img2DatasetReader(i2d_source(str(tmp_path / "nothing-*.tar"))).list_shards()
