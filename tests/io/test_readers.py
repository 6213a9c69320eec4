"""Source readers: img2dataset tar+parquet, COYO parquet, MMC4 jsonl.

Every test checks the accounting identity: one output row per input row (sample, failed parquet row,
unusable tar member, jsonl line), whatever state the input is in.
"""

from __future__ import annotations

import gzip
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
from PIL import Image

from vila2_curate.pipelines.io.readers import (
    CoyoParquetReader,
    Img2DatasetReader,
    InputShard,
    Mmc4Reader,
    SourceFormatError,
    make_reader,
)
from vila2_curate.schemas.config import SourceConfig
from vila2_curate.schemas.keys import is_safe_key, safe_key
from vila2_curate.schemas.rows import DOCUMENT_SCHEMA, PAIR_SCHEMA

# ------------------------------------------------------------------------------------------- fixtures


def image_bytes(fmt: str = "JPEG", color: tuple[int, int, int] = (200, 30, 30), size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format=fmt)
    return buf.getvalue()


JPG = image_bytes()
PNG = image_bytes("PNG", (10, 200, 10))
WEBP = image_bytes("WEBP", (10, 10, 200))


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


def read_all(reader: Any, batch_size: int = 256) -> tuple[list[pa.Table], list[dict[str, Any]]]:
    tables, rows = [], []
    schema = PAIR_SCHEMA if reader.row_kind == "pair" else DOCUMENT_SCHEMA
    for shard in reader.list_shards():
        for t in reader.read(shard, batch_size):
            assert t.schema.equals(schema, check_metadata=True)
            assert 0 < t.num_rows <= batch_size
            tables.append(t)
            rows.extend(t.to_pylist())
    keys = [(r["shard"], r["key"]) for r in rows]
    assert len(keys) == len(set(keys)), "keys must be unique within a shard"
    assert all(is_safe_key(r["key"]) for r in rows)
    for r in rows:
        if r["quarantined"]:
            assert r["drop_reason"] and r["drop_stage"] == "read"
        if r["meta"] is not None:
            json.loads(r["meta"])
    return tables, rows


def by_reason(rows: list[dict[str, Any]]) -> dict[str | None, int]:
    out: dict[str | None, int] = {}
    for r in rows:
        out[r["drop_reason"]] = out.get(r["drop_reason"], 0) + 1
    return out


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


# ------------------------------------------------------------------------------------------------ COYO

COYO_COLUMNS = ["id", "url", "text", "width", "height", "image_phash", "text_length", "word_count",
                "num_tokens_bert", "num_tokens_gpt", "num_faces", "clip_similarity_vitb32",
                "clip_similarity_vitl14", "nsfw_score_opennsfw2", "nsfw_score_gantman", "watermark_score",
                "aesthetic_score_laion_v2"]


def coyo_rows(n: int, start: int = 0) -> list[dict[str, Any]]:
    rows = []
    for i in range(start, start + n):
        rows.append({
            "id": 4_000_000_000 + i, "url": f"https://img.example/{i}.jpg", "text": f"a photo {i}",
            "width": 640, "height": 480, "image_phash": "d5a9a5a5" * 2, "text_length": 9, "word_count": 3,
            "num_tokens_bert": 4, "num_tokens_gpt": 4, "num_faces": 0, "clip_similarity_vitb32": 0.31,
            "clip_similarity_vitl14": 0.29, "nsfw_score_opennsfw2": 0.01, "nsfw_score_gantman": 0.02,
            "watermark_score": 0.1, "aesthetic_score_laion_v2": 5.1,
        })
    return rows


def coyo_source(*paths: str, **kw: Any) -> SourceConfig:
    return SourceConfig(name="coyo", kind="coyo_parquet", paths=list(paths), **kw)


def test_coyo_bytes_column(tmp_path: Path) -> None:
    recs = coyo_rows(4)
    for r, img in zip(recs, (JPG, PNG, None, WEBP), strict=True):
        r["jpg"] = img
    recs[1]["text"] = None
    recs[3]["id"] = recs[0]["id"]  # duplicate key
    pq.write_table(pa.Table.from_pylist(recs), tmp_path / "part-00000.snappy.parquet")
    reader = make_reader(coyo_source(str(tmp_path / "*.parquet"), image_column="jpg"))
    assert isinstance(reader, CoyoParquetReader)
    assert [s.shard_id for s in reader.list_shards()] == ["part-00000"]
    _, rows = read_all(reader)
    assert len(rows) == 4
    assert rows[0]["key"] == "4000000000" and rows[0]["image"] == JPG and rows[0]["image_format"] == "jpg"
    assert rows[0]["url"] == "https://img.example/0.jpg" and rows[0]["text"] == "a photo 0"
    meta = json.loads(rows[0]["meta"])
    assert set(meta) == set(COYO_COLUMNS) - {"id", "url", "text"}
    assert rows[1]["text"] == "" and rows[1]["drop_reason"] is None and rows[1]["image_format"] == "png"
    assert rows[2]["drop_reason"] == "image_missing" and rows[2]["quarantined"]
    assert rows[3]["drop_reason"] == "duplicate_key" and rows[3]["image_format"] == "webp"


def test_coyo_path_column_local(tmp_path: Path) -> None:
    (tmp_path / "images" / "sub").mkdir(parents=True)
    (tmp_path / "images" / "sub" / "0.jpg").write_bytes(JPG)
    (tmp_path / "abs.png").write_bytes(PNG)
    recs = coyo_rows(5)
    paths = ["sub/0.jpg", str(tmp_path / "abs.png"), "sub/missing.jpg", None, "../abs.png"]
    for r, p in zip(recs, paths, strict=True):
        r["image_path"] = p
    for r in recs:
        r["id"] = str(r["id"])  # a string key column this time
    recs[2]["id"] = "id.with.dots"
    pq.write_table(pa.Table.from_pylist(recs), tmp_path / "coyo.parquet")
    src = coyo_source(str(tmp_path / "coyo.parquet"), image_path_column="image_path",
                      image_root=str(tmp_path / "images"))
    _, rows = read_all(CoyoParquetReader(src))
    assert len(rows) == 5
    assert rows[0]["image"] == JPG and rows[0]["drop_reason"] is None
    assert rows[1]["image"] is None and rows[1]["drop_reason"] == "image_path_unsafe"  # absolute, outside root
    assert rows[2]["drop_reason"].startswith("image_unreadable: FileNotFoundError")
    assert rows[2]["key"] == safe_key("id.with.dots") and rows[2]["source_key"] == "id.with.dots"
    assert rows[3]["drop_reason"] == "image_path_missing"
    assert rows[4]["drop_reason"] == "image_path_unsafe"
    assert json.loads(rows[0]["meta"])["image_path"] == "sub/0.jpg"


def test_coyo_path_column_memory_filesystem(tmp_path: Path) -> None:
    base = f"memory://coyo-{uuid.uuid4().hex}"
    fs = fsspec.filesystem("memory")
    fs.pipe(f"{base}/imgs/0.jpg", JPG)
    recs = coyo_rows(2)
    recs[0]["image_path"], recs[1]["image_path"] = "0.jpg", "gone.jpg"
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(recs), buf)
    fs.pipe(f"{base}/data/shard-1.parquet", buf.getvalue())
    src = coyo_source(f"{base}/data/*.parquet", image_path_column="image_path", image_root=f"{base}/imgs")
    _, rows = read_all(CoyoParquetReader(src))
    assert len(rows) == 2
    assert rows[0]["image"] == JPG and rows[0]["shard"] == "shard-1"
    assert rows[1]["quarantined"] and rows[1]["drop_reason"].startswith("image_unreadable:")


@pytest.mark.parametrize("missing", ["id", "text", "url", "jpg"])
def test_coyo_missing_required_column(tmp_path: Path, missing: str) -> None:
    recs = coyo_rows(2)
    for r in recs:
        r["jpg"] = JPG
        del r[missing]
    pq.write_table(pa.Table.from_pylist(recs), tmp_path / "bad.parquet")
    reader = CoyoParquetReader(coyo_source(str(tmp_path / "bad.parquet"), image_column="jpg"))
    with pytest.raises(SourceFormatError, match=rf"'{missing}'.*bad\.parquet|bad\.parquet.*'{missing}'"):
        reader.list_shards()


def test_coyo_missing_column_in_later_shard_fails_before_rows(tmp_path: Path) -> None:
    good = coyo_rows(2)
    for r in good:
        r["jpg"] = JPG
    pq.write_table(pa.Table.from_pylist(good), tmp_path / "a.parquet")
    pq.write_table(pa.Table.from_pylist(coyo_rows(2)), tmp_path / "b.parquet")  # no image column
    reader = CoyoParquetReader(coyo_source(str(tmp_path / "*.parquet"), image_column="jpg"))
    shards = reader.list_shards()
    assert [s.shard_id for s in shards] == ["a", "b"]
    gen = reader.read(shards[1], 8)
    with pytest.raises(SourceFormatError, match=r"b\.parquet.*'jpg'"):
        next(gen)


def test_coyo_needs_one_image_column() -> None:
    with pytest.raises(SourceFormatError, match="image_column"):
        CoyoParquetReader(coyo_source("/nowhere/*.parquet"))


def test_coyo_batch_size_bounds_tables(tmp_path: Path) -> None:
    recs = coyo_rows(50)
    for r in recs:
        r["jpg"] = JPG
    pq.write_table(pa.Table.from_pylist(recs), tmp_path / "big.parquet", row_group_size=20)
    tables, rows = read_all(CoyoParquetReader(coyo_source(str(tmp_path), image_column="jpg")), batch_size=8)
    assert len(rows) == 50 and max(t.num_rows for t in tables) <= 8
    assert [r["key"] for r in rows] == [str(4_000_000_000 + i) for i in range(50)]


# ------------------------------------------------------------------------------------------------ MMC4


def mmc4_doc(i: int, images: list[tuple[str, int]]) -> dict[str, Any]:
    text = [f"Sentence {j} of doc {i}." for j in range(3)]
    return {
        "url": f"http://site.example/{i}.html",
        "text_list": text,
        "image_info": [
            {"image_name": name, "raw_url": f"http://site.example/{name}", "matched_text_index": idx,
             "matched_sim": 0.27, "face_detections": None}
            for name, idx in images
        ],
        "similarity_matrix": [[0.2, 0.3, 0.25] for _ in images],
        "could_have_url_duplicate": 0,
        "extra_doc_field": "kept in meta",
    }


def write_mmc4(folder: Path, name: str, lines: list[str], gz: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    payload = ("\n".join(lines) + "\n").encode()
    path = folder / (name + (".jsonl.gz" if gz else ".jsonl"))
    path.write_bytes(gzip.compress(payload) if gz else payload)
    return path


@pytest.mark.parametrize("gz", [False, True])
def test_mmc4_documents(tmp_path: Path, gz: bool) -> None:
    (tmp_path / "a1b2c3.jpg").write_bytes(JPG)
    (tmp_path / "d4e5f6.jpg").write_bytes(PNG)  # named .jpg, bytes are PNG (mogrify keeps names)
    lines = [
        json.dumps(mmc4_doc(0, [("a1b2c3.jpg", 2), ("d4e5f6.jpg", 0)])),
        json.dumps(mmc4_doc(1, [("missing.jpg", 1), ("a1b2c3.jpg", 7)])),  # every image dropped
        '{"url": "http://broken", "text_list": [',  # malformed line
        json.dumps(mmc4_doc(3, [])),
        "",  # trailing blank line: not a document
    ]
    write_mmc4(tmp_path, "docs_no_face_shard_0_v3", lines, gz=gz)
    reader = make_reader(SourceConfig(name="mmc4", kind="mmc4", paths=[str(tmp_path / "*.jsonl*")]))
    assert isinstance(reader, Mmc4Reader)
    assert [s.shard_id for s in reader.list_shards()] == ["docs_no_face_shard_0_v3"]
    _, rows = read_all(reader)
    assert len(rows) == 4  # one row per non-blank line, the malformed one included
    assert [r["key"] for r in rows] == [f"docs_no_face_shard_0_v3_{n:06d}" for n in (1, 2, 3, 4)]

    d0 = rows[0]
    assert d0["drop_reason"] is None and d0["url"] == "http://site.example/0.html"
    assert d0["text_list"][2] == "Sentence 2 of doc 0." and d0["could_have_url_duplicate"] == 0
    assert len(d0["similarity_matrix"]) == 2 and d0["similarity_matrix"][0][1] == pytest.approx(0.3)
    assert json.loads(d0["meta"]) == {"extra_doc_field": "kept in meta"}
    im0, im1 = d0["image_info"]
    assert im0["image"] == JPG and im0["image_format"] == "jpg" and im0["matched_text_index"] == 2
    assert im1["image"] == PNG and im1["image_format"] == "png" and im0["drop_reason"] is None
    assert json.loads(im0["meta"]) == {"face_detections": None}
    assert im0["matched_sim"] == pytest.approx(0.27) and im0["raw_url"] == "http://site.example/a1b2c3.jpg"

    d1 = rows[1]
    assert d1["drop_reason"] is None and not d1["quarantined"]  # kept: later stages decide
    assert [(i["drop_reason"], i["drop_stage"]) for i in d1["image_info"]] == [
        ("image_missing", "read"), ("matched_text_index_out_of_range", "read")]
    assert rows[2]["drop_reason"] == "invalid_json" and rows[2]["quarantined"]
    assert rows[3]["image_info"] == [] and rows[3]["drop_reason"] is None


def test_mmc4_images_in_download_script_folder_and_image_dir(tmp_path: Path) -> None:
    """allenai/mmc4's download_images.py saves to ``{jsonl stem}_images/`` by default."""
    (tmp_path / "docs_shard_7_v2_images").mkdir()
    (tmp_path / "docs_shard_7_v2_images" / "abc.jpg").write_bytes(JPG)
    write_mmc4(tmp_path, "docs_shard_7_v2", [json.dumps(mmc4_doc(0, [("abc.jpg", 0), ("../x.jpg", 0)]))])
    _, rows = read_all(Mmc4Reader(SourceConfig(name="m", kind="mmc4", paths=[str(tmp_path)])))
    assert len(rows) == 1
    assert rows[0]["image_info"][0]["image"] == JPG
    assert rows[0]["image_info"][1]["drop_reason"] == "image_path_unsafe"
    assert rows[0]["quarantined"] and rows[0]["drop_reason"] == "image_path_unsafe"

    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "abc.jpg").write_bytes(PNG)
    src = SourceConfig(name="m", kind="mmc4", paths=[str(tmp_path / "*.jsonl")], image_dir=str(other))
    _, rows = read_all(Mmc4Reader(src))
    assert rows[0]["image_info"][0]["image"] == PNG


def test_mmc4_truncated_gz_keeps_what_was_read(tmp_path: Path) -> None:
    lines = [json.dumps(mmc4_doc(i, [])) for i in range(200)]
    path = write_mmc4(tmp_path, "s", lines, gz=True)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _, rows = read_all(Mmc4Reader(SourceConfig(name="m", kind="mmc4", paths=[str(path)])))
    reasons = by_reason(rows)
    assert reasons.get("jsonl_truncated") == 1 and reasons.get(None, 0) > 0
    assert rows[-1]["key"] == "s_truncated"


def test_mmc4_memory_filesystem_and_batch_bound(tmp_path: Path) -> None:
    base = f"memory://mmc4-{uuid.uuid4().hex}"
    fs = fsspec.filesystem("memory")
    fs.pipe(f"{base}/img.jpg", JPG)
    lines = [json.dumps(mmc4_doc(i, [("img.jpg", i % 3)])) for i in range(50)]
    fs.pipe(f"{base}/docs.jsonl.gz", gzip.compress(("\n".join(lines) + "\n").encode()))
    tables, rows = read_all(Mmc4Reader(SourceConfig(name="m", kind="mmc4", paths=[f"{base}/*.jsonl.gz"])),
                            batch_size=8)
    assert len(rows) == 50 and max(t.num_rows for t in tables) <= 8
    assert all(r["image_info"][0]["image"] == JPG for r in rows)


def test_coyo_corrupt_parquet_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    reader = CoyoParquetReader(coyo_source(str(tmp_path / "broken.parquet"), image_column="jpg"))
    shard = InputShard(source="coyo", shard_id="broken", path=str(tmp_path / "broken.parquet"),
                       kind="coyo_parquet", row_kind="pair")
    with pytest.raises(SourceFormatError, match="broken.parquet"):
        next(reader.read(shard, 8))


def test_mmc4_zip_as_distributed(tmp_path: Path) -> None:
    """allenai/mmc4 ships shards as ``docs_no_face_shard_{N}_v2.jsonl.zip``; fsspec infers "zip"."""
    import zipfile

    with zipfile.ZipFile(tmp_path / "docs_no_face_shard_5_v2.jsonl.zip", "w") as z:
        z.writestr("docs_no_face_shard_5_v2.jsonl", "\n".join(json.dumps(mmc4_doc(i, [])) for i in range(3)))
    _, rows = read_all(Mmc4Reader(SourceConfig(name="m", kind="mmc4", paths=[str(tmp_path)])))
    assert [r["key"] for r in rows] == [f"docs_no_face_shard_5_v2_{n:06d}" for n in (1, 2, 3)]
