"""Mmc4Reader: MMC4 jsonl documents (plain, gz, zip), their image folders, truncation and fsspec."""

from __future__ import annotations

import gzip
import json
import uuid
from pathlib import Path
from typing import Any

import fsspec
import pytest

from tests.helpers.readers import JPG, PNG, by_reason, read_all
from vila2_curate.pipelines.io.readers import Mmc4Reader, make_reader
from vila2_curate.schemas.config import SourceConfig

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


def test_mmc4_zip_as_distributed(tmp_path: Path) -> None:
    """allenai/mmc4 ships shards as ``docs_no_face_shard_{N}_v2.jsonl.zip``; fsspec infers "zip"."""
    import zipfile

    with zipfile.ZipFile(tmp_path / "docs_no_face_shard_5_v2.jsonl.zip", "w") as z:
        z.writestr("docs_no_face_shard_5_v2.jsonl", "\n".join(json.dumps(mmc4_doc(i, [])) for i in range(3)))
    _, rows = read_all(Mmc4Reader(SourceConfig(name="m", kind="mmc4", paths=[str(tmp_path)])))
    assert [r["key"] for r in rows] == [f"docs_no_face_shard_5_v2_{n:06d}" for n in (1, 2, 3)]
