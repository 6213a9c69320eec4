"""Dedup stage: exact / pHash / MinHash / semantic groups, keeper rule, MMC4 policies, determinism."""

from __future__ import annotations

import hashlib
import io
import random

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image, ImageDraw, ImageEnhance, ImageFont

from vila2_curate.curation.decisions import apply_decisions, index_decisions
from vila2_curate.curation.dedup import DedupStage, summarize
from vila2_curate.curation.dedup.minhash import minhash_signatures, near_duplicate_pairs
from vila2_curate.curation.dedup.pairs import semantic_cluster_pairs
from vila2_curate.curation.dedup.phash import brute_force_pairs, hamming_pairs
from vila2_curate.curation.dedup.unionfind import UnionFind
from vila2_curate.curation.normalize import phash_u64
from vila2_curate.schemas.config import DedupConfig
from vila2_curate.schemas.rows import DOCUMENT_SCHEMA, PAIR_SCHEMA, make_table

W, H = 320, 240


def _jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _photo(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, size=(10, 13, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((W, H), Image.Resampling.BICUBIC)


def _flat_images() -> dict[str, Image.Image]:
    out: dict[str, Image.Image] = {}
    for c in [(200, 30, 30), (30, 200, 30), (30, 30, 200), (120, 120, 120), (0, 102, 0), (0, 0, 0)]:
        out[f"colour_{c[0]}_{c[1]}_{c[2]}"] = Image.new("RGB", (W, H), c)
    cx, cy, r = W // 2, H // 2, 60
    shapes = {
        "circle": lambda d: d.ellipse([cx - r, cy - r, cx + r, cy + r], fill="black"),
        "square": lambda d: d.rectangle([cx - r, cy - r, cx + r, cy + r], fill="black"),
        "triangle": lambda d: d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill="black"),
        "ring": lambda d: d.ellipse([cx - r, cy - r, cx + r, cy + r], outline="black", width=12),
        "bar": lambda d: d.rectangle([cx - 2 * r, cy - 15, cx + 2 * r, cy + 15], fill="black"),
    }
    for name, draw in shapes.items():
        img = Image.new("RGB", (W, H), "white")
        draw(ImageDraw.Draw(img))
        out["shape_" + name] = img
    font = ImageFont.load_default(size=40)
    for word in ["hello", "world", "cat", "dog", "sale", "free", "news", "data"]:
        img = Image.new("RGB", (W, H), "white")
        ImageDraw.Draw(img).text((cx, cy), word, fill="black", font=font, anchor="mm")
        out["word_" + word] = img
    return out


def _variants(img: Image.Image) -> dict[str, bytes]:
    w, h = img.size
    cw, ch = int(w * 0.03), int(h * 0.03)
    return {
        "q50": _jpeg(img, 50),
        "resize": _jpeg(img.resize((int(w * 0.9), int(h * 0.9)), Image.Resampling.BICUBIC)),
        "crop": _jpeg(img.crop((cw // 2, ch // 2, w - cw + cw // 2, h - ch + ch // 2))),
        "bright": _jpeg(ImageEnhance.Brightness(img).enhance(1.05)),
    }


def _pair(key: str, data: bytes, source: str = "coyo", text: str | None = None, **extra) -> dict:
    img = Image.open(io.BytesIO(data))
    return {"key": key, "source": source, "shard": "s0", "image": data, "image_format": "jpg",
            "sha256": hashlib.sha256(data).hexdigest(), "phash": phash_u64(img), "width": img.width,
            "height": img.height, "text": text, **extra}


def _decide(stage: DedupStage, rows_or_tables) -> pa.Table:
    tables = rows_or_tables if isinstance(rows_or_tables, list) else [rows_or_tables]
    return stage.decide(pa.concat_tables([stage.signatures(t) for t in tables]))


def _groups(decisions: pa.Table) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for r in decisions.to_pylist():
        if r["group"] and r["group"].startswith(("image:", "document:")):
            out.setdefault(r["group"], set()).add(r["key"])
    return out


@pytest.fixture(scope="module")
def image_table() -> tuple[pa.Table, dict[str, str]]:
    """Photos with an exact copy and four near-duplicate variants each, plus distinct flat images."""
    rows, origin = [], {}
    for s in range(12):
        base = _jpeg(_photo(s))
        rows.append(_pair(f"p{s}", base))
        rows.append(_pair(f"p{s}x", base))  # exact copy (same bytes)
        origin[f"p{s}"] = origin[f"p{s}x"] = f"p{s}"
        for name, data in _variants(_photo(s)).items():
            rows.append(_pair(f"p{s}{name}", data))
            origin[f"p{s}{name}"] = f"p{s}"
    for name, img in _flat_images().items():
        rows.append(_pair(name, _jpeg(img)))
        origin[name] = name
    for name in ["shape_circle", "word_hello", "word_cat", "colour_0_102_0"]:
        for v, data in _variants(_flat_images()[name]).items():
            rows.append(_pair(f"{name}_{v}", data))
            origin[f"{name}_{v}"] = name
    return make_table(rows, PAIR_SCHEMA), origin


def test_exact_near_and_flat_images(image_table) -> None:
    table, origin = image_table
    decisions = _decide(DedupStage(DedupConfig(methods=["exact", "phash"])), table)
    groups = _groups(decisions)
    member_group = {k: g for g, ks in groups.items() for k in ks}
    for g, keys in groups.items():  # never merges different originals (flat colours, shapes, words)
        assert len({origin[k] for k in keys}) == 1, (g, sorted(keys))
    exact = [k for k in origin if k.endswith("x") and k.startswith("p")]
    assert all(member_group.get(k) == member_group.get(origin[k]) is not None for k in exact)
    near = [k for k in origin if k != origin[k] and k not in exact]
    found = sum(member_group.get(k) is not None and member_group.get(k) == member_group.get(origin[k])
                for k in near)
    assert found / len(near) >= 0.95, (found, len(near))
    reasons = {r["key"]: r["drop_reason"] for r in decisions.to_pylist()}
    assert reasons["p0x"] == "duplicate_exact: of coyo/p0/-1"
    assert reasons["p0q50"].startswith("duplicate_phash: of coyo/p0/-1")
    assert reasons["p0"] is None  # keeper: no CLIP scores yet -> smallest id


def test_decide_is_order_independent(image_table) -> None:
    table, _ = image_table
    stage = DedupStage(DedupConfig(methods=["exact", "phash"]))
    sigs = stage.signatures(table)
    expected = stage.decide(sigs)
    perm = list(range(sigs.num_rows))
    random.Random(1).shuffle(perm)
    shuffled = sigs.take(pa.array(perm))
    halves = pa.concat_tables([shuffled.slice(sigs.num_rows // 2), shuffled.slice(0, sigs.num_rows // 2)])
    assert stage.decide(halves).equals(expected)


def test_keeper_is_highest_clip_score_then_smallest_id() -> None:
    data = _jpeg(_photo(7))
    rows = [_pair("a", data, clip_score=0.5), _pair("b", data, clip_score=0.9), _pair("c", data, clip_score=0.9),
            _pair("d", data)]
    decisions = _decide(DedupStage(DedupConfig(methods=["exact"])), make_table(rows, PAIR_SCHEMA))
    reasons = {r["key"]: r["drop_reason"] for r in decisions.to_pylist()}
    assert reasons == {"a": "duplicate_exact: of coyo/b/-1", "b": None, "c": "duplicate_exact: of coyo/b/-1",
                       "d": "duplicate_exact: of coyo/b/-1"}


def _doc(key: str, text: list[str], images: list[bytes]) -> dict:
    infos = []
    for data in images:
        img = Image.open(io.BytesIO(data))
        infos.append({"image_name": f"{key}_{len(infos)}.jpg", "image": data, "image_format": "jpg",
                      "sha256": hashlib.sha256(data).hexdigest(), "phash": phash_u64(img)})
    return {"key": key, "source": "mmc4", "shard": "s0", "text_list": text, "image_info": infos}


def _docs_table() -> pa.Table:
    a, b, c = (_jpeg(_photo(s)) for s in (20, 21, 22))
    story = [f"sentence {i} of a long story about a fox in the forest and its friends" for i in range(8)]
    return make_table([
        _doc("d1", story, [a, b]),
        _doc("d2", story[:7] + ["sentence 7 of a long story about a fox in the forest and its pals"], [c]),
        _doc("d3", ["a different document about cooking pasta with tomatoes"], [a, _jpeg(_photo(23))]),
        _doc("d4", ["yet another text about trains and stations"], [b]),
    ], DOCUMENT_SCHEMA)


def test_mmc4_drop_image_policy() -> None:
    table = _docs_table()
    stage = DedupStage(DedupConfig(methods=["exact", "phash"], mmc4_policy="drop_image"))
    out = apply_decisions(table, index_decisions(_decide(stage, table)), "dedup").to_pylist()
    by_key = {r["key"]: r for r in out}
    assert by_key["d1"]["drop_reason"] is None
    assert by_key["d3"]["drop_reason"] is None  # keeps its other image
    assert by_key["d3"]["image_info"][0]["drop_reason"] == "duplicate_exact: of mmc4/d1/0"
    assert by_key["d3"]["image_info"][1]["drop_reason"] is None
    assert by_key["d4"]["drop_reason"] == "no_usable_images"  # its only image duplicates d1's


def test_mmc4_drop_document_policy() -> None:
    table = _docs_table()
    stage = DedupStage(DedupConfig(methods=["exact", "phash", "minhash_documents"], mmc4_policy="drop_document"))
    out = apply_decisions(table, index_decisions(_decide(stage, table)), "dedup").to_pylist()
    by_key = {r["key"]: r for r in out}
    assert by_key["d2"]["drop_reason"] == "duplicate_document: of mmc4/d1/-1"
    for k in ("d1", "d3", "d4"):  # images inside documents are not deduplicated under this policy
        assert by_key[k]["drop_reason"] is None
        assert all(im["drop_reason"] is None for im in by_key[k]["image_info"])


def test_boilerplate_captions_flagged_not_dropped() -> None:
    rows = [_pair(f"b{i}", _jpeg(_photo(100 + i)), text="click here to view the full size image " + "!" * (i % 2))
            for i in range(6)]
    rows += [_pair(f"u{i}", _jpeg(_photo(200 + i)), text=f"a unique caption number {i} about thing {i * 7}")
             for i in range(4)]
    rows += [_pair(f"r{i}", _jpeg(_photo(300)), text="a red barn in a snowy field at dawn") for i in range(2)]
    table = make_table(rows, PAIR_SCHEMA)
    stage = DedupStage(DedupConfig(methods=["exact", "minhash_captions"], boilerplate_min_images=5))
    decisions = _decide(stage, table)
    flagged = {r["key"] for r in decisions.to_pylist() if r["flag"] == "boilerplate_caption"}
    assert flagged == {f"b{i}" for i in range(6)}
    out = apply_decisions(table, index_decisions(decisions), "dedup").to_pylist()
    assert all(r["drop_reason"] is None and r["flags"] == ["boilerplate_caption"] for r in out if r["key"][0] == "b")
    assert {r["key"]: r["drop_reason"] for r in out if r["key"][0] == "r"} == {
        "r0": None, "r1": "duplicate_exact: of coyo/r0/-1"}  # same caption on one image: not boilerplate
    summary = summarize(decisions, stage.signatures(table))
    assert summary["per_source"]["coyo"]["boilerplate_caption"] == 6
    assert summary["examples"][0]["size"] == 6


def test_semantic_groups_on_synthetic_embeddings() -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(40, 64)).astype(np.float32)
    emb = np.repeat(centres, 3, axis=0) + 0.01 * rng.normal(size=(120, 64)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    labels = np.arange(120) // 30  # four clusters of ten centres (as k-means would keep a centre's copies)
    pairs = semantic_cluster_pairs(emb, labels, eps=0.05)
    uf = UnionFind(range(120))
    uf.union_pairs(pairs.tolist())
    assert uf.groups() == [[3 * c, 3 * c + 1, 3 * c + 2] for c in range(40)]
    rows = [{"key": f"k{i:03d}", "source": "coyo", "shard": "s0", "embedding": emb[i].tolist(),
             "clip_score": float(i % 3)} for i in range(120)]
    decisions = _decide(DedupStage(DedupConfig(methods=["semantic"])), make_table(rows, PAIR_SCHEMA))
    d = {r["key"]: r["drop_reason"] for r in decisions.to_pylist()}
    assert d["k002"] is None and d["k000"] == "duplicate_semantic: of coyo/k002/-1"


def test_phash_index_matches_brute_force() -> None:
    rng = np.random.default_rng(3)
    h = rng.integers(0, 2**64 - 1, size=4000, dtype=np.uint64, endpoint=True)
    for j in range(400):
        flips = rng.choice(64, size=int(rng.integers(1, 6)), replace=False)
        h[1000 + j] = h[j] ^ np.bitwise_or.reduce(np.uint64(1) << flips.astype(np.uint64))
    h[3000:3010] = h[5]
    ref = brute_force_pairs(h, 4)
    assert np.array_equal(hamming_pairs(h, 4, "flat"), ref)
    mih = hamming_pairs(h, 4, "mih")  # identical hashes are linked through one representative
    assert set(map(tuple, mih.tolist())) <= set(map(tuple, ref.tolist()))

    def components(pairs: np.ndarray) -> list[list[int]]:
        uf = UnionFind()
        uf.union_pairs(pairs.tolist())
        return uf.groups()

    assert components(mih) == components(ref)


def test_minhash_estimates_jaccard() -> None:
    words = [f"w{i}" for i in range(200)]
    a = " ".join(words)
    b = " ".join(words[:180] + [f"x{i}" for i in range(20)])
    sig = minhash_signatures([a, b, "", "two words"], num_perm=256, shingle_words=3)
    true = 178 / 218  # shared 3-shingles / union
    assert abs((sig[0] == sig[1]).mean() - true) < 0.08
    assert (sig[2] == 0xFFFFFFFF).all() and not (sig[3] == 0xFFFFFFFF).all()
    assert near_duplicate_pairs(sig, 0.7).tolist() == [[0, 1]]


def test_thumbnail_fast_paths_equal_the_plain_numpy_formulation(monkeypatch) -> None:
    """``_channel_max`` (two elementwise maxima) and ``_side_pairs`` (two sides per numpy call) are speed-ups
    of ``max(axis=-1)`` and one median per side: the thumbnail bytes must not move."""
    import itertools

    from vila2_curate.curation.dedup import thumbnails
    from vila2_curate.pipelines.demo.dedup_eval import make_dedup_eval

    def side_pairs_reference(small: np.ndarray) -> list:
        sides = [small[0], small[-1], small[:, 0], small[:, -1]]
        medians = [np.median(side, axis=0) for side in sides]
        flat = [(np.abs(side - m).max(axis=1) <= 12).mean() >= 0.9 for side, m in zip(sides, medians, strict=True)]
        return [((medians[a] + medians[b]) / 2, (a, b)) for a, b in itertools.combinations(range(4), 2)
                if flat[a] and flat[b] and np.abs(medians[a] - medians[b]).max() <= 24]

    rng = np.random.default_rng(0)
    for _ in range(300):
        h, w = (int(v) for v in rng.integers(1, 90, size=2))
        small = rng.integers(0, 256, size=(h, w, 3)).astype(np.float32)
        for side in ([0], [-1], (slice(None), 0), (slice(None), -1)):  # mostly flat sides, some alike
            if rng.random() < 0.7:
                small[side] = np.clip(rng.integers(0, 256, 3) + rng.integers(-14, 15, small[side].shape), 0, 255)
        got, ref = thumbnails._side_pairs(small), side_pairs_reference(small)
        assert [s for _, s in got] == [s for _, s in ref]
        assert all(g.dtype == r.dtype and np.array_equal(g, r) for (g, _), (r, _) in zip(got, ref, strict=True))

    images = [it.data for it in make_dedup_eval(0, 12).items]  # cards, shapes and products: content boxes
    fast = [thumbnails.thumbnail(b) for b in images]
    monkeypatch.setattr(thumbnails, "_channel_max", lambda a: a.max(axis=-1))
    monkeypatch.setattr(thumbnails, "_side_pairs", side_pairs_reference)
    assert fast == [thumbnails.thumbnail(b) for b in images]
    assert fast[0] == thumbnails.thumbnail_of(thumbnails.open_for_thumbnail(images[0]))
