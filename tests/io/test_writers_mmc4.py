"""Mmc4PklWriter: MMC4 pkl/count pairs as VILA's LazyMMC4Dataset reads them, and what it refuses."""

from __future__ import annotations

import base64
import io
import pickle
from pathlib import Path
from typing import Any

import fsspec
import pytest
from PIL import Image

from tests.helpers.rows import doc_row
from tests.helpers.writers import all_files
from vila2_curate.pipelines.io.writers.mmc4 import Mmc4PklWriter, mark_imageless
from vila2_curate.schemas.rows import DOCUMENT_SCHEMA, make_table

# ---------------------------------------------------------------- MMC4


def write_docs(root: Path, rows: list[dict[str, Any]], docs_per_pkl: int, batch: int = 2, **kw: Any):
    fs = fsspec.filesystem("file")
    kw.setdefault("min_files", 1)  # one part: these tests are about documents; tests/io/test_mmc4_layout.py about parts
    w = Mmc4PklWriter(fs, str(root), "mmc4/docs/00000", docs_per_pkl=docs_per_pkl, **kw)
    table = make_table(rows, DOCUMENT_SCHEMA)
    refused = []
    for off in range(0, table.num_rows, batch):
        refused += w.write(table.slice(off, batch))
    files = w.close()
    if refused:
        raise ValueError("; ".join(why for _, why in refused))
    return w, files


def vila_mmc4_images(info: dict[str, Any]) -> tuple[list[Image.Image], list[int]]:
    """The image part of VILA's LazyMMC4Dataset.__getitem__ (llava/data/dataset.py), verbatim in spirit."""
    images, sentence_ixs = [], []
    for sample_image, _sim_vec in zip(info["image_info"], info["similarity_matrix"], strict=False):
        rawbytes = base64.b64decode(sample_image["image_base64"])
        images.append(Image.open(io.BytesIO(rawbytes)).convert("RGB"))
        sentence_ixs.append(sample_image["matched_text_index"])
    return images[:6], sentence_ixs[:6]


def test_pkl_count_round_trip_with_image_limit(tmp_path: Path) -> None:
    rows = [doc_row(0, 9, drops={1, 4}), doc_row(1, 2), doc_row(2, 3, drops={0}), doc_row(3, 1), doc_row(4, 6)]
    w, files = write_docs(tmp_path, rows, docs_per_pkl=2)
    assert [(f.relpath, f.nsamples) for f in files] == [
        ("mmc4/docs/p00-00000-0000.pkl", 2), ("mmc4/docs/p00-00000-0001.pkl", 2), ("mmc4/docs/p00-00000-0002.pkl", 1)]
    assert all_files(tmp_path / "mmc4/docs") == sorted(
        [f"p00-00000-000{i}.{e}" for i in range(3) for e in ("pkl", "count")])
    docs = []
    for f in files:
        data = (tmp_path / f.relpath).read_bytes()
        assert f.bytes == len(data)
        count = (tmp_path / f.relpath).with_suffix(".count").read_text()
        loaded = pickle.loads(data)
        assert int(count.strip()) == len(loaded) == f.nsamples
        docs.extend(loaded)
    d0 = docs[0]
    # 9 images, 2 dropped -> 7 kept -> the first 6 in image_info order
    assert [im["image_name"] for im in d0["image_info"]] == [f"img{j}.jpg" for j in (0, 2, 3, 5, 6, 7)]
    assert d0["similarity_matrix"] == [[float(j * 10 + s) for s in range(10)] for j in (0, 2, 3, 5, 6, 7)]
    assert d0["image_info"][0]["face_detections"] == [[1, 2, 3, 4]]
    assert d0["image_info"][1]["face_detections"] is None
    assert base64.b64decode(d0["image_info"][0]["image_base64"]) == rows[0]["image_info"][0]["image"]
    assert d0["text_list"] == rows[0]["text_list"] and d0["url"] == rows[0]["url"]
    assert set(d0) >= {"url", "text_list", "image_info", "similarity_matrix", "could_have_url_duplicate"}
    assert set(d0["image_info"][0]) >= {"image_name", "raw_url", "matched_text_index", "matched_sim",
                                        "face_detections", "image_base64"}
    assert [im["image_name"] for im in docs[2]["image_info"]] == ["img1.jpg", "img2.jpg"]
    assert w.counters == {"documents_written": 5, "images_written": 6 + 2 + 2 + 1 + 6, "images_truncated": 1}
    for d in docs:
        images, ixs = vila_mmc4_images(d)
        assert len(images) == len(d["image_info"]) <= 6
        assert all(0 <= ix < len(d["text_list"]) for ix in ixs)


def test_pkl_bytes_are_deterministic(tmp_path: Path) -> None:
    rows = [doc_row(i, 3) for i in range(4)]
    _, a = write_docs(tmp_path / "a", rows, docs_per_pkl=3, batch=1)
    _, b = write_docs(tmp_path / "b", rows, docs_per_pkl=3, batch=4)
    assert a == b
    assert (tmp_path / "a" / a[0].relpath).read_bytes() == (tmp_path / "b" / b[0].relpath).read_bytes()


def test_missing_similarity_matrix_is_synthesised_per_image(tmp_path: Path) -> None:
    _, (f,) = write_docs(tmp_path, [doc_row(0, 2, similarity_matrix=None)], docs_per_pkl=5)
    (doc,) = pickle.loads((tmp_path / f.relpath).read_bytes())
    assert len(doc["similarity_matrix"]) == 2
    assert doc["similarity_matrix"][1][1] == pytest.approx(0.26)


def test_imageless_documents_are_marked_not_written(tmp_path: Path) -> None:
    rows = [doc_row(0, 2, drops={0, 1}), doc_row(1, 0), doc_row(2, 1), doc_row(3, 1, drop_reason="x", drop_stage="s")]
    table = mark_imageless(make_table(rows, DOCUMENT_SCHEMA))
    assert table.column("drop_reason").to_pylist() == ["no_usable_images", "no_usable_images", None, "x"]
    assert table.column("drop_stage").to_pylist() == ["mmc4_write", "mmc4_write", None, "s"]
    with pytest.raises(ValueError, match="mark_imageless"):
        write_docs(tmp_path, rows[:1], docs_per_pkl=5)


def test_bad_matched_text_index_is_refused(tmp_path: Path) -> None:
    row = doc_row(0, 1)
    row["image_info"][0]["matched_text_index"] = 99
    with pytest.raises(ValueError, match="matched_text_index"):
        write_docs(tmp_path, [row], docs_per_pkl=5)
