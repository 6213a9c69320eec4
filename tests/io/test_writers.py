"""Writers: VILA tars, MMC4 pkl/count pairs, records, atomic writes and the caption policy."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import pickle
import tarfile
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vila2_curate.pipelines.io.writers.atomic import atomic_open, is_temp_name, write_json_atomic
from vila2_curate.pipelines.io.writers.mmc4 import Mmc4PklWriter, mark_imageless
from vila2_curate.pipelines.io.writers.records import (
    manifest_row,
    write_manifest,
    write_quarantine,
    write_rejects,
    write_wids_meta,
)
from vila2_curate.pipelines.io.writers.wds import FIXED_MTIME, WdsShardWriter, tar_file_size
from vila2_curate.schemas.captions import choose_caption, choose_caption_source, mix_draw
from vila2_curate.schemas.config import CaptionPolicy
from vila2_curate.schemas.records import MANIFEST_SCHEMA, REJECTS_SCHEMA
from vila2_curate.schemas.rows import DOCUMENT_SCHEMA, PAIR_SCHEMA, make_table

LATEST = CaptionPolicy(mode="latest")


def image_bytes(fmt: str = "JPEG", seed: int = 0, size: tuple[int, int] = (32, 24)) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def caption(rnd: int, text: str, flags: list[str] | None = None, model: str = "vlm") -> dict[str, Any]:
    return {"round": rnd, "model": model if rnd else "original", "prompt_id": f"p{rnd}", "params_hash": "h",
            "text": text, "created_at": "2024-01-01T00:00:00Z", "flags": flags or []}


def pair_row(i: int, **over: Any) -> dict[str, Any]:
    fmt = over.pop("fmt", "jpg")
    pil = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt]
    row = {
        "key": f"k{i:05d}", "source": "coyo", "shard": "00000", "source_key": f"{i}",
        "url": f"https://example.com/img/{i}.jpg", "image": image_bytes(pil, seed=i), "image_format": fmt,
        "sha256": f"{i:064x}", "phash": (0xF0F0F0F0F0F0F0F0 + i) % 2**64, "width": 32, "height": 24,
        "clip_score": 0.75, "clip_cosine": 0.3, "clip_model": "ViT-B-32", "text": f"alt text {i}",
        "captions": [caption(0, f"alt text {i}"), caption(1, f"recaption one {i}")],
        "specialists": {"ocr": [{"text": "SALE", "box": [0.1, 0.2, 0.3, 0.4], "score": 0.9}], "ocr_text": "SALE",
                        "grounding": [], "grounding_text": "", "spatial": ["left of"], "spatial_text": "x",
                        "models": json.dumps({"ocr": "rapidocr-1.3"})},
        "delta_loss": 1.5, "logp_small": -10.0, "logp_large": -8.5, "flags": ["boilerplate_caption"],
        "meta": json.dumps({"aesthetic": 5.1, "num_faces": 0}),
    }
    row.update(over)
    return row


def pairs(n: int, start: int = 0) -> pa.Table:
    return make_table([pair_row(i) for i in range(start, start + n)], PAIR_SCHEMA)


def write_pairs(root: Path, table: pa.Table, batch: int, **kw: Any) -> list:
    fs = fsspec.filesystem("file")
    kw.setdefault("max_samples", 10)
    kw.setdefault("max_bytes", None)
    kw.setdefault("caption_policy", LATEST)
    w = WdsShardWriter(fs, str(root), "coyo/00000", **kw)
    refused = []
    for off in range(0, table.num_rows, batch):
        refused += [(off + i, why) for i, why in w.write(table.slice(off, batch))]
    files = w.close()
    if refused:  # the sink turns these into rejects; tests see them as the error they are
        raise ValueError("; ".join(why for _, why in refused))
    return files


def all_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


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


# ---------------------------------------------------------------- caption policy


def test_latest_skips_flagged_rounds_and_falls_back_to_original() -> None:
    caps = [caption(0, "orig"), caption(1, "one"), caption(2, "two", ["truncated"]), caption(3, "three", ["refusal"])]
    assert choose_caption("k", "orig", caps, LATEST) == "one"
    assert choose_caption("k", "orig", caps + [caption(4, "four")], LATEST) == "four"
    assert choose_caption("k", "orig", [caption(1, "x", ["empty"])], LATEST) == "orig"
    assert choose_caption("k", "orig", [caption(1, "   ")], LATEST) == "orig"
    assert choose_caption("k", "orig", None, LATEST) == "orig"
    assert choose_caption("k", "orig", [], LATEST) == "orig"
    # order of the list does not matter across rounds
    assert choose_caption("k", "orig", list(reversed(caps)), LATEST) == "one"


def test_original_policy() -> None:
    pol = CaptionPolicy(mode="original")
    assert choose_caption("k", "orig", [caption(1, "one")], pol) == "orig"
    text, src = choose_caption_source("k", "", [caption(1, "one")], pol)
    assert (text, src["round"]) == ("one", 1)  # an empty alt-text never wins over a good recaption


def test_mix_policy_ratio_and_determinism() -> None:
    caps = [caption(1, "new")]
    for ratio in (0.0, 0.3, 0.5, 1.0):
        pol = CaptionPolicy(mode="mix", mix_ratio=ratio, seed=7)
        picks = [choose_caption(f"key{i}", "old", caps, pol) for i in range(1000)]
        share = picks.count("new") / 1000
        assert abs(share - ratio) <= 0.05
        assert picks == [choose_caption(f"key{i}", "old", caps, pol) for i in range(1000)]
    a = [mix_draw(1, f"k{i}") < 0.5 for i in range(200)]
    b = [mix_draw(2, f"k{i}") < 0.5 for i in range(200)]
    assert a != b  # the seed changes which samples get the recaption


# ---------------------------------------------------------------- MMC4


def doc_image(j: int, text_idx: int, drop: str | None = None, fmt: str = "JPEG") -> dict[str, Any]:
    return {"image_name": f"img{j}.jpg", "raw_url": f"https://example.com/{j}.jpg", "matched_text_index": text_idx,
            "matched_sim": 0.25 + j / 100, "image": image_bytes(fmt, seed=100 + j), "image_format": "jpg",
            "sha256": "0" * 64, "phash": 1, "width": 32, "height": 24, "drop_reason": drop,
            "drop_stage": "dedup" if drop else None,
            "meta": json.dumps({"face_detections": [[1, 2, 3, 4]] if j == 0 else None})}


def doc_row(i: int, n_images: int, drops: set[int] | frozenset[int] = frozenset(), **over: Any) -> dict[str, Any]:
    n_text = max(n_images, 1) + 1
    row = {
        "key": f"d{i:04d}", "source": "mmc4", "shard": "00000", "url": f"https://example.com/doc/{i}",
        "text_list": [f"sentence {s} of {i}" for s in range(n_text)],
        "image_info": [doc_image(j, j % n_text, "dup" if j in drops else None) for j in range(n_images)],
        "similarity_matrix": [[float(j * 10 + s) for s in range(n_text)] for j in range(n_images)],
        "could_have_url_duplicate": 0,
    }
    row.update(over)
    return row


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


# ---------------------------------------------------------------- records


def test_rejects_and_quarantine(tmp_path: Path) -> None:
    fs = fsspec.filesystem("file")
    rows = [pair_row(0), pair_row(1, drop_reason="too_small", drop_stage="normalize"),
            pair_row(2, quarantined=True, drop_reason="undecodable", drop_stage="read")]
    table = make_table(rows, PAIR_SCHEMA)
    rel = write_rejects(fs, str(tmp_path), "coyo", "00000", table)
    assert rel == "rejects/coyo/00000.parquet"
    rej = pq.read_table(tmp_path / rel)
    assert rej.schema.equals(REJECTS_SCHEMA)
    assert rej.to_pylist() == [
        {"key": "k00001", "source": "coyo", "shard": "00000", "source_key": "1", "url": rows[1]["url"],
         "stage": "normalize", "reason": "too_small", "quarantined": False},
        {"key": "k00002", "source": "coyo", "shard": "00000", "source_key": "2", "url": rows[2]["url"],
         "stage": "read", "reason": "undecodable", "quarantined": True}]
    qrel = write_quarantine(fs, str(tmp_path), "coyo", "00000", table)
    q = pq.read_table(tmp_path / qrel)
    assert q.column("key").to_pylist() == ["k00002"] and q.column("image")[0].as_py() == rows[2]["image"]
    assert write_quarantine(fs, str(tmp_path), "coyo", "00001", pairs(2)) is None
    # empty rejects still written (a finished shard always has one); document rows work too
    docs = make_table([doc_row(0, 1, drop_reason="dup_doc", drop_stage="dedup")], DOCUMENT_SCHEMA)
    assert pq.read_table(tmp_path / write_rejects(fs, str(tmp_path), "mmc4", "x", docs)).num_rows == 1
    assert pq.read_table(tmp_path / write_rejects(fs, str(tmp_path), "coyo", "00002", pairs(1))).num_rows == 0
    none = write_rejects(fs, str(tmp_path), "coyo", "00003", None)
    assert pq.read_table(tmp_path / none).schema.equals(REJECTS_SCHEMA)
    slim = table.drop_columns(["image"])  # payload columns are optional
    assert pq.read_table(tmp_path / write_rejects(fs, str(tmp_path), "coyo", "00004", slim)).num_rows == 2
    with pytest.raises(ValueError):
        write_rejects(fs, str(tmp_path), "coyo", "../up", table)


def test_wids_meta_and_manifest(tmp_path: Path) -> None:
    fs = fsspec.filesystem("file")
    files = write_pairs(tmp_path, pairs(15), batch=15, max_samples=10)
    write_wids_meta(fs, str(tmp_path), "coyo-curated", list(reversed(files)))
    meta = json.loads((tmp_path / "wids-meta.json").read_text())
    assert meta == {"name": "coyo-curated", "__kind__": "VILA-WebDataset", "wids_version": 1, "shardlist": [
        {"url": f.relpath, "nsamples": f.nsamples, "filesize": f.bytes} for f in files]}
    rows = [manifest_row(f, kind="wds", source="coyo", input_shards=["00000"], config_hash="abc",
                         stage_versions={"normalize": "1"}) for f in reversed(files)]
    write_manifest(fs, str(tmp_path), rows)
    man = pq.read_table(tmp_path / "manifest.parquet")
    assert man.schema.equals(MANIFEST_SCHEMA)
    assert man.column("shard").to_pylist() == [f.relpath for f in files]
    assert man.column("sha256").to_pylist() == [f.sha256 for f in files]
    assert json.loads(man.column("stage_versions")[0].as_py()) == {"normalize": "1"}


# ---------------------------------------------------------------- atomic writes


def test_atomic_open_removes_temp_on_exception(tmp_path: Path) -> None:
    fs = fsspec.filesystem("file")
    target = str(tmp_path / "sub" / "x.json")
    with pytest.raises(RuntimeError), atomic_open(fs, target) as f:
        f.write(b"partial")
        assert any(is_temp_name(p) for p in all_files(tmp_path))
        raise RuntimeError("killed")
    assert all_files(tmp_path) == []
    write_json_atomic(fs, target, {"b": 1, "a": [1, 2]})
    assert all_files(tmp_path) == ["sub/x.json"]
    assert (tmp_path / "sub/x.json").read_text() == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1\n}\n'


def test_atomic_open_replaces_existing_file(tmp_path: Path) -> None:
    fs = fsspec.filesystem("file")
    target = str(tmp_path / "x.bin")
    for payload in (b"one", b"two"):
        with atomic_open(fs, target) as f:
            f.write(payload)
    assert (tmp_path / "x.bin").read_bytes() == b"two"
    assert all_files(tmp_path) == ["x.bin"]


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
