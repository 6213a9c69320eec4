"""The offline sample must be deterministic, in the real source layouts, and agree with its ground truth."""

from __future__ import annotations

import glob
import gzip
import hashlib
import io
import itertools
import json
import re
import shutil
import tarfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageOps

from vila2_curate.pipelines.demo.hostile import BOMB_SIDE
from vila2_curate.pipelines.demo.sample import write_sample

REPO = Path(__file__).resolve().parents[2]
COYO_COLUMNS = {
    "id": pa.int64(), "url": pa.string(), "text": pa.string(), "width": pa.int32(), "height": pa.int32(),
    "image_phash": pa.string(), "text_length": pa.int32(), "word_count": pa.int32(),
    "num_tokens_bert": pa.int32(), "num_tokens_gpt": pa.int32(), "num_faces": pa.int32(),
    "clip_similarity_vitb32": pa.float32(), "clip_similarity_vitl14": pa.float32(),
    "nsfw_score_opennsfw2": pa.float32(), "nsfw_score_gantman": pa.float32(),
    "watermark_score": pa.float32(), "aesthetic_score_laion_v2": pa.float32(),
}
I2D_COLUMNS = ["similarity", "NSFW", "LICENSE", "caption", "url", "key", "status", "error_message", "width",
               "height", "original_width", "original_height", "exif", "sha256"]


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    root = tmp_path_factory.mktemp("sample")
    t0 = time.perf_counter()
    truth = write_sample(str(root), seed=0)
    assert time.perf_counter() - t0 < 10
    return root, truth


@pytest.fixture(scope="module")
def payloads(sample: tuple[Path, dict[str, Any]]) -> dict[tuple[str, str], bytes | None]:
    return _payloads(sample[0])


def _tar_samples(path: Path) -> tuple[list[str], dict[str, dict[str, bytes]], dict[str, float]]:
    order: list[str] = []
    samples: dict[str, dict[str, bytes]] = {}
    mtimes: dict[str, float] = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            assert m.isfile()
            key, ext = m.name.rsplit(".", 1)  # last suffix: keeps the dotted key whole
            if key not in samples:
                order.append(key)
                samples[key], mtimes[key] = {}, m.mtime
            f = tar.extractfile(m)
            assert f is not None
            samples[key][ext] = f.read()
    return order, samples, mtimes


def _payloads(root: Path) -> dict[tuple[str, str], bytes | None]:
    """(source, key) -> stored image bytes (None where the source has a row but no image)."""
    out: dict[tuple[str, str], bytes | None] = {}
    for tar in sorted((root / "img2dataset").glob("*.tar")):
        for key, fields in _tar_samples(tar)[1].items():
            out[("img2dataset", key)] = fields["jpg"]
    for row in pq.read_table(root / "coyo/part-00000.parquet").to_pylist():
        out[("coyo_bytes", str(row["id"]))] = row["image"]
    for row in pq.read_table(root / "coyo/part-00001.parquet").to_pylist():
        p = root / "coyo" / row["image_path"]
        out[("coyo_paths", str(row["id"]))] = p.read_bytes() if p.exists() else None
    for doc in _mmc4_docs(root):
        for info in doc["image_info"]:
            p = root / "mmc4" / info["image_name"]
            out[("mmc4", info["image_name"])] = p.read_bytes() if p.exists() else None
    return out


def _mmc4_docs(root: Path) -> list[dict[str, Any]]:
    docs = []
    for p in sorted((root / "mmc4").glob("docs_shard_*_v2.jsonl*")):
        opener = gzip.open if p.suffix == ".gz" else open
        with opener(p, "rt", encoding="utf-8") as f:
            docs += [json.loads(line) for line in f if line.strip()]
    return docs


def _tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_deterministic_bytes(tmp_path: Path, sample: tuple[Path, dict[str, Any]]) -> None:
    root, truth = sample
    again = write_sample(str(tmp_path / "again"), seed=0)
    assert again == truth
    assert _tree_hashes(tmp_path / "again") == _tree_hashes(root)
    other = write_sample(str(tmp_path / "other"), seed=1)
    assert {r["sha256"] for r in other["records"]} != {r["sha256"] for r in truth["records"]}


def test_img2dataset_layout(sample: tuple[Path, dict[str, Any]]) -> None:
    import webdataset as wds

    root, _ = sample
    folder = root / "img2dataset"
    assert sorted(p.name for p in folder.iterdir()) == [
        "00000.parquet", "00000.tar", "00000_stats.json", "00001.parquet", "00001.tar", "00001_stats.json"]
    for shard in ("00000", "00001"):
        table = pq.read_table(folder / f"{shard}.parquet")
        assert table.column_names == I2D_COLUMNS
        rows = table.to_pylist()
        stats = json.loads((folder / f"{shard}_stats.json").read_text())
        assert stats["count"] == len(rows)
        assert stats["successes"] == sum(r["status"] == "success" for r in rows)
        assert stats["failed_to_download"] == sum(r["status"] == "failed_to_download" for r in rows) > 0
        assert sum(stats["status_dict"].values()) == len(rows)
        raw = (folder / f"{shard}.tar").read_bytes()
        order, samples, mtimes = _tar_samples(folder / f"{shard}.tar")
        ok = [r for r in rows if r["status"] == "success"]
        assert [r["key"] for r in ok] == order  # same write loop: tar order == parquet order of successes
        for r in rows:
            if r["status"] != "success":
                assert r["key"] not in samples and r["error_message"] and r["width"] is None
                continue
            fields = samples[r["key"]]
            assert sorted(fields) == ["jpg", "json", "txt"]
            meta = json.loads(fields["json"])
            assert list(meta) == I2D_COLUMNS and meta == r
            assert fields["json"].decode() == json.dumps(r, indent=4)
            assert meta["width"] == meta["original_width"] and meta["exif"] == "{}"
        for key in order:
            assert re.fullmatch(r"0000[01]\d{4}(\.v2)?", key)
        # byte-identical to what webdataset.TarWriter (img2dataset's writer) produces
        buf = io.BytesIO()
        writer = wds.TarWriter(buf)
        for key in order:
            writer.mtime = mtimes[key]
            writer.write({"__key__": key, **samples[key]})
        writer.close()
        assert buf.getvalue() == raw
        with tarfile.open(folder / f"{shard}.tar") as tar:
            assert all("mtime" in m.pax_headers for m in tar.getmembers())  # float mtime -> pax header


def test_coyo_layout(sample: tuple[Path, dict[str, Any]]) -> None:
    root, _ = sample
    for part, extra, typ in (("part-00000", "image", pa.binary()), ("part-00001", "image_path", pa.string())):
        table = pq.read_table(root / "coyo" / f"{part}.parquet")
        schema = dict(zip(table.column_names, table.schema.types, strict=True))
        assert schema == {**COYO_COLUMNS, extra: typ}
        rows = table.to_pylist()
        assert len({r["id"] for r in rows}) == len(rows)
        for r in rows:
            assert re.fullmatch(r"[0-9a-f]{16}", r["image_phash"])
            assert r["text_length"] == len(r["text"]) and r["word_count"] == len(r["text"].split())
            assert 0 <= r["nsfw_score_opennsfw2"] < 0.5 and 0.15 < r["clip_similarity_vitb32"] < 0.45
    paths = pq.read_table(root / "coyo/part-00001.parquet").column("image_path").to_pylist()
    assert all(not p.startswith("/") and p.startswith("images/") for p in paths)
    assert sum(not (root / "coyo" / p).exists() for p in paths) == 1  # the one missing file


def test_mmc4_layout(sample: tuple[Path, dict[str, Any]]) -> None:
    root, _ = sample
    assert (root / "mmc4/docs_shard_00000_v2.jsonl").exists()
    assert (root / "mmc4/docs_shard_00001_v2.jsonl.gz").read_bytes()[:2] == b"\x1f\x8b"
    docs = _mmc4_docs(root)
    assert docs
    for doc in docs:
        assert set(doc) == {"url", "text_list", "image_info", "similarity_matrix", "could_have_url_duplicate"}
        sim = np.asarray(doc["similarity_matrix"])
        assert sim.shape == (len(doc["image_info"]), len(doc["text_list"]))
        for i, info in enumerate(doc["image_info"]):
            assert set(info) == {"image_name", "raw_url", "matched_text_index", "matched_sim", "face_detections"}
            assert re.fullmatch(r"[0-9a-f]{12}\.jpg", info["image_name"])
            if info["matched_text_index"] < len(doc["text_list"]):
                assert info["matched_sim"] == pytest.approx(sim[i, info["matched_text_index"]])


def test_ground_truth_matches_files(sample: tuple[Path, dict[str, Any]], payloads: dict[tuple[str, str], bytes | None]) -> None:
    root, truth = sample
    assert json.loads((root / "ground_truth.json").read_text()) == truth
    recs = truth["records"]
    keys = [(r["source"], r["key"]) for r in recs]
    assert len(keys) == len(set(keys))
    for r in recs:
        if r["expected"] in {"failed_to_download", "failed_to_resize"}:
            assert (r["source"], r["key"]) not in payloads  # parquet-only rows
            continue
        data = payloads[(r["source"], r["key"])]
        if r["sha256"] is None:
            assert data is None and r["expected"] == "missing_image"
        else:
            assert data is not None and hashlib.sha256(data).hexdigest() == r["sha256"]
    # every stored image is described
    assert set(payloads) <= set(keys)
    s = truth["summary"]
    assert s["rows"] == len(recs) == sum(s["rows_per_source"].values()) == sum(s["by_expected"].values())
    assert s["keep"] == s["by_expected"]["keep"] and 100 <= s["rows"] <= 400
    for cls in ("corrupt", "too_small", "aspect", "bomb", "failed_to_download", "not_utf8", "missing_image",
                "matched_text_index_out_of_range"):
        assert s["by_expected"][cls] >= 1, cls
    assert s["boilerplate_rows"] >= 5
    bp = [r for r in recs if r["boilerplate"]]
    assert {r["caption"] for r in bp} == {truth["boilerplate_caption"]} and len({r["sha256"] for r in bp}) == len(bp)
    for name in ("exact_groups", "near_groups", "similar_groups"):
        assert truth[name] and all(len(m) >= 2 for m in truth[name].values()), name
    for members in truth["exact_groups"].values():
        assert len({m["sha256"] for m in members}) == 1
    assert any(len({m["source"] for m in g}) >= 3 for g in truth["exact_groups"].values())  # cross-source
    for members in list(truth["near_groups"].values()) + list(truth["similar_groups"].values()):
        assert len({m["sha256"] for m in members}) == len(members)
    for r in recs:
        for sh in r["shapes"] or []:
            x0, y0, x1, y1 = sh["box"]
            assert 0 <= x0 < x1 <= r["width"] and 0 <= y0 < y1 <= r["height"]
            assert all(0 <= v <= 1 for v in sh["box_norm"])


def test_shapes_are_where_the_boxes_say(sample: tuple[Path, dict[str, Any]], payloads: dict[tuple[str, str], bytes | None]) -> None:
    _, truth = sample
    checked = 0
    for r in truth["records"]:
        if not r["shapes"] or r["sha256"] is None:
            continue
        img = ImageOps.exif_transpose(Image.open(io.BytesIO(payloads[(r["source"], r["key"])]))).convert("RGB")
        assert img.size == (r["width"], r["height"])
        for sh in r["shapes"]:
            x0, y0, x1, y1 = sh["box"]
            cy = (y0 + y1) // 2 if sh["label"] != "triangle" else y0 + (y1 - y0) * 2 // 3
            px = np.asarray(img.getpixel(((x0 + x1) // 2, cy)), dtype=int)
            assert np.abs(px - np.asarray(sh["rgb"])).max() < 60, (r["key"], sh)
            checked += 1
    assert checked >= 20
    rotated = [r for r in truth["records"] if r["kind"] == "exif_rotated"]
    assert rotated
    for r in rotated:
        raw = Image.open(io.BytesIO(payloads[(r["source"], r["key"])]))
        assert raw.getexif().get(0x0112) == 6 and raw.size == (r["height"], r["width"])


def test_bomb_exceeds_pil_limit(sample: tuple[Path, dict[str, Any]], payloads: dict[tuple[str, str], bytes | None]) -> None:
    _, truth = sample
    bombs = [r for r in truth["records"] if r["expected"] == "bomb"]
    assert bombs
    for r in bombs:
        data = payloads[(r["source"], r["key"])]
        assert data is not None and len(data) < 1_000_000
        assert BOMB_SIDE * BOMB_SIDE > Image.MAX_IMAGE_PIXELS
        with pytest.raises(Image.DecompressionBombError):
            Image.open(io.BytesIO(data))


def test_text_words_are_large(sample: tuple[Path, dict[str, Any]], payloads: dict[tuple[str, str], bytes | None]) -> None:
    _, truth = sample
    texts = [r for r in truth["records"] if r["kind"] == "text"]
    assert len(texts) >= 10
    for r in texts:
        grey = np.asarray(Image.open(io.BytesIO(payloads[(r["source"], r["key"])])).convert("L"))
        assert r["words"]
        for w in r["words"]:
            x0, y0, x1, y1 = w["box"]
            assert w["height"] >= 30 and re.fullmatch(r"[A-Z]+", w["text"])
            ink_rows = np.flatnonzero((grey[y0:y1, x0:x1] < 128).any(axis=1))
            assert ink_rows.size and ink_rows[-1] - ink_rows[0] + 1 >= 30  # measured on pixels, not metrics


def test_broken_records_are_broken(sample: tuple[Path, dict[str, Any]], payloads: dict[tuple[str, str], bytes | None]) -> None:
    root, truth = sample
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for r in truth["records"]:
        by_kind.setdefault(r["kind"], []).append(r)
    for r in by_kind["truncated_jpeg"] + by_kind["corrupt_bytes"] + by_kind["zero_bytes"]:
        with pytest.raises(OSError):
            Image.open(io.BytesIO(payloads[(r["source"], r["key"])] or b"")).load()
    for r in by_kind["too_small"]:
        assert min(Image.open(io.BytesIO(payloads[(r["source"], r["key"])])).size) < 200
    for r in by_kind["elongated"]:
        w, h = Image.open(io.BytesIO(payloads[(r["source"], r["key"])])).size
        assert max(w, h) / min(w, h) > 3
    (bad,) = by_kind["not_utf8_caption"]
    (shard,) = [p for p in (root / "img2dataset").glob("*.tar") if bad["key"] in _tar_samples(p)[1]]
    txt = _tar_samples(shard)[1][bad["key"]]["txt"]
    with pytest.raises(UnicodeDecodeError):
        txt.decode("utf-8")
    (dotted,) = by_kind["dotted_key"]
    assert dotted["key"].endswith(".v2") and ("img2dataset", dotted["key"]) in payloads
    docs = _mmc4_docs(root)
    oor = [i for d in docs for i in d["image_info"] if i["matched_text_index"] >= len(d["text_list"])]
    assert [i["image_name"] for i in oor] == [r["key"] for r in by_kind["bad_matched_index"]]
    missing = [r for r in truth["records"] if r["source"] == "mmc4" and r["expected"] == "missing_image"]
    assert missing and all(not (root / "mmc4" / r["key"]).exists() for r in missing)
    assert sum(bool(d["issues"]) for d in truth["documents"]) == 2


def test_near_duplicates_close_and_flat_pairs_collide(sample: tuple[Path, dict[str, Any]], payloads: dict[tuple[str, str], bytes | None]) -> None:
    imagehash = pytest.importorskip("imagehash")
    _, truth = sample

    def ph(m: dict[str, str]) -> Any:
        return imagehash.phash(Image.open(io.BytesIO(payloads[(m["source"], m["key"])])))

    for members in truth["near_groups"].values():
        hashes = [ph(m) for m in members]
        assert max(hashes[0] - h for h in hashes) <= 8
    flat = truth["similar_groups"]["similar-1"]
    assert ph(flat[0]) - ph(flat[1]) <= 4  # pHash cannot tell two plain colours apart: dedup must not merge
    means = [np.asarray(Image.open(io.BytesIO(payloads[(m["source"], m["key"])]))).mean(axis=(0, 1))
             for m in flat]
    assert np.abs(means[0] - means[1]).max() > 100


def test_quickstart_config_points_at_the_sample(tmp_path: Path) -> None:
    from vila2_curate.schemas.config import load_config

    (tmp_path / "configs").mkdir()
    shutil.copy(REPO / "configs/quickstart.yaml", tmp_path / "configs/quickstart.yaml")
    write_sample(str(tmp_path / "sample"))
    cfg = load_config(tmp_path / "configs/quickstart.yaml")
    assert [s.name for s in cfg.sources] == ["img2dataset", "coyo_bytes", "coyo_paths", "mmc4"]
    assert cfg.engine == "local" and cfg.output.shard_max_samples == 64
    counts = {s.name: len(glob.glob(p)) for s in cfg.sources for p in s.paths}
    assert counts == {"img2dataset": 2, "coyo_bytes": 1, "coyo_paths": 1, "mmc4": 2}
    paths_src = cfg.sources[2]
    assert paths_src.image_path_column == "image_path" and paths_src.image_root is not None
    rel = pq.read_table(paths_src.paths[0]).column("image_path")[0].as_py()
    assert Path(paths_src.image_root, rel).exists()
    assert cfg.sources[1].image_column == "image"


@pytest.mark.slow
def test_text_images_are_ocr_readable(sample: tuple[Path, dict[str, Any]],
                                      payloads: dict[tuple[str, str], bytes | None]) -> None:
    rapidocr = pytest.importorskip("rapidocr_onnxruntime")
    _, truth = sample
    engine = rapidocr.RapidOCR()
    texts = [r for r in truth["records"] if r["kind"] == "text"][:2]
    for r in texts:
        result, _ = engine(payloads[(r["source"], r["key"])])
        read = " ".join(line[1] for line in result or []).upper()
        assert all(w["text"] in read.replace(" ", "") or w["text"] in read for w in r["words"]), (r["words"], read)


def _trigrams(text: str) -> set[tuple[str, ...]]:
    """Word 3-shingles as curation.dedup.minhash builds them (lower-cased, split on whitespace)."""
    w = text.lower().split()
    return {tuple(w[i:i + 3]) for i in range(max(1, len(w) - 2))}


def _jaccard(a: set[Any], b: set[Any]) -> float:
    return len(a & b) / len(a | b)


def test_documents_are_distinct_pages_except_planted_recrawls(sample: tuple[Path, dict[str, Any]]) -> None:
    root, truth = sample
    docs = _mmc4_docs(root)
    by_url = {d["url"]: d for d in docs}
    assert [d["key"] for d in truth["documents"]] == [d["url"] for d in docs] and len(by_url) == len(docs)
    groups = truth["doc_near_groups"]
    assert 1 <= len(groups) <= 2 and truth["summary"]["doc_near_groups"] == len(groups)
    planted: dict[str, str] = {}
    for gid, members in groups.items():
        assert [m["role"] for m in members] == ["original", "recrawl"]
        assert len({m["file"] for m in members}) == 2  # across shards: dedup must compare globally
        orig, dup = (by_url[m["key"]]["text_list"] for m in members)
        assert len(dup) == len(orig) + 1 and len(set(dup) - set(orig)) == 2  # one sentence edited, one added
        j = _jaccard(_trigrams(" ".join(orig)), _trigrams(" ".join(dup)))
        assert 0.85 <= j <= 0.95 and members[1]["jaccard_to_original"] == pytest.approx(j, abs=1e-4)
        planted.update({m["key"]: gid for m in members})
    for d in truth["documents"]:
        assert d["doc_near_group"] == planted.get(d["key"])
        if d["doc_near_group"] is None:
            assert 3 <= d["n_sentences"] <= 12
    shingles = {d["url"]: _trigrams(" ".join(d["text_list"])) for d in docs}
    for a, b in itertools.combinations(docs, 2):
        if planted.get(a["url"]) is None or planted.get(a["url"]) != planted.get(b["url"]):
            assert _jaccard(shingles[a["url"]], shingles[b["url"]]) < 0.3, (a["url"], b["url"])


def test_pair_captions_repeat_only_where_the_truth_says(sample: tuple[Path, dict[str, Any]]) -> None:
    """Caption MinHash dedup (threshold 0.8) must find only the planted boilerplate, which is on >= 5 images."""
    _, truth = sample
    recs = [r for r in truth["records"] if r["source"] != "mmc4" and r["sha256"] is not None]
    bp = [r for r in recs if r["boilerplate"]]
    assert len({r["sha256"] for r in bp}) >= 5
    for a, b in itertools.combinations(recs, 2):
        same_picture = a["sha256"] == b["sha256"] or (a["near_group"] and a["near_group"] == b["near_group"])
        if (a["boilerplate"] and b["boilerplate"]) or same_picture:
            continue
        assert _jaccard(_trigrams(a["caption"]), _trigrams(b["caption"])) < 0.5, (a["caption"], b["caption"])
