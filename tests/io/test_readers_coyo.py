"""CoyoParquetReader: image bytes or path columns, missing columns, corrupt parquet, batch bounds."""

from __future__ import annotations

import io
import json
import uuid
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.helpers.readers import JPG, PNG, WEBP, read_all
from vila2_curate.pipelines.io.readers import CoyoParquetReader, InputShard, SourceFormatError, make_reader
from vila2_curate.schemas.config import SourceConfig
from vila2_curate.schemas.keys import safe_key

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


def test_coyo_corrupt_parquet_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    reader = CoyoParquetReader(coyo_source(str(tmp_path / "broken.parquet"), image_column="jpg"))
    shard = InputShard(source="coyo", shard_id="broken", path=str(tmp_path / "broken.parquet"),
                       kind="coyo_parquet", row_kind="pair")
    with pytest.raises(SourceFormatError, match="broken.parquet"):
        next(reader.read(shard, 8))
