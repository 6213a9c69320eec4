"""clipscore (CLIP-S from open_clip embeddings) and clip_filter (floor / top p% / VILA COYO preset).

The model is the tiny random open_clip built by pipelines/demo/models.py, loaded through the production
path (a local open_clip model folder); expected values are recomputed by hand with open_clip directly.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from vila2_curate.curation.clip_filter import SIGNATURE_SCHEMA, ClipFilterStage
from vila2_curate.curation.clipscore import ClipScoreStage
from vila2_curate.curation.decisions import apply_decisions, index_decisions
from vila2_curate.pipelines.demo.models import cached_demo_models
from vila2_curate.schemas.captions import CLIPSCORE_CAPTION
from vila2_curate.schemas.config import ClipFilterConfig, ClipScoreConfig, ModelRuntime
from vila2_curate.schemas.rows import DOCUMENT_SCHEMA, PAIR_SCHEMA, make_table


def _image(seed: int, size: tuple[int, int] = (96, 80), fmt: str = "JPEG") -> bytes:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, size=(size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(small).resize(size, Image.Resampling.BILINEAR).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def demo() -> dict[str, str]:
    return cached_demo_models()


@pytest.fixture(scope="module")
def stage(demo: dict[str, str]) -> ClipScoreStage:
    s = ClipScoreStage(ClipScoreConfig(model=demo["clip"], runtime=ModelRuntime(device="cpu", batch_size=3)))
    s.setup()
    return s


@pytest.fixture(scope="module")
def reference(demo: dict[str, str]):
    """open_clip used by hand, independently of curation.models."""
    import open_clip
    import torch

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{demo['clip']}")
    model.eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{demo['clip']}")

    def embed(images: list[bytes], texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        with torch.no_grad():
            x = torch.stack([preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in images])
            im = model.encode_image(x)
            tx = model.encode_text(tokenizer(texts))
        im = im / im.norm(dim=-1, keepdim=True)
        tx = tx / tx.norm(dim=-1, keepdim=True)
        return im.numpy(), (im * tx).sum(-1).numpy()

    return embed


def _pairs(n: int, **overrides: dict) -> pa.Table:
    rows = [
        {
            "key": f"k{i:02d}",
            "source": "coyo",
            "shard": "00000",
            "image": _image(i),
            "text": f"a photo number {i} of a red car",
            "quarantined": False,
        }
        for i in range(n)
    ]
    for i, extra in overrides.items():
        rows[int(i)].update(extra)
    return make_table(rows, PAIR_SCHEMA)


def test_clip_score_matches_direct_computation(stage: ClipScoreStage, reference) -> None:
    captions = [{"round": 0, "text": "old alt text"}, {"round": 1, "text": "a detailed new caption of a car"}]
    table = _pairs(7, **{"3": {"captions": captions}, "5": {"image": _image(5, fmt="PNG")}})
    out = stage(table)
    assert out.num_rows == 7 and out.schema == PAIR_SCHEMA
    texts = [
        CLIPSCORE_CAPTION(c, t)
        for c, t in zip(table.column("captions").to_pylist(), table.column("text").to_pylist(), strict=True)
    ]
    assert texts[3] == "a detailed new caption of a car"
    emb, cos = reference(table.column("image").to_pylist(), texts)
    got_cos = np.array(out.column("clip_cosine").to_pylist())
    np.testing.assert_allclose(got_cos, cos, atol=1e-5)
    np.testing.assert_allclose(out.column("clip_score").to_pylist(), 2.5 * np.maximum(cos, 0), atol=1e-5)
    got_emb = np.array(out.column("embedding").to_pylist(), dtype=np.float32)
    np.testing.assert_allclose(got_emb, emb, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got_emb, axis=1), 1.0, atol=1e-5)
    assert out.column("drop_reason").null_count == 7


def test_clip_s_is_hessel_rescaled_cosine() -> None:
    from vila2_curate.curation.clipscore import clip_score

    assert clip_score(0.3) == pytest.approx(0.75)
    assert clip_score(-0.2) == 0.0


def test_identity_records_weights_checksum_and_demo_flag(stage: ClipScoreStage, demo: dict[str, str]) -> None:
    ckpt = Path(demo["clip"]) / "open_clip_model.safetensors"
    sha = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert stage.identity == {"model": demo["clip"], "pretrained": None, "weights_sha256": sha, "demo": True}
    out = stage(_pairs(1))
    assert out.column("clip_model")[0].as_py() == f"{demo['clip']}|-|{sha[:12]}|demo"


def test_pretrained_file_overrides_folder_checkpoint(demo: dict[str, str]) -> None:
    from vila2_curate.curation.models import load_open_clip

    ckpt = str(Path(demo["clip"]) / "open_clip_model.safetensors")
    bundle = load_open_clip(demo["clip"], ckpt, "cpu")
    assert bundle.identity["pretrained"] == ckpt and bundle.identity["demo"] is True
    assert bundle.identity["weights_sha256"] == hashlib.sha256(Path(ckpt).read_bytes()).hexdigest()


def test_undecodable_image_quarantines_only_its_row(stage: ClipScoreStage) -> None:
    table = _pairs(
        4,
        **{
            "1": {"image": b"\xff\xd8\xff\xe0 not really a jpeg"},
            "2": {"drop_reason": "too_small: 10x10 < 200", "drop_stage": "normalize"},
        },
    )
    out = stage(table)
    rows = out.to_pylist()
    assert rows[1]["quarantined"] is True and rows[1]["drop_stage"] == "clipscore"
    assert rows[1]["drop_reason"].startswith("image_undecodable:") and "0x" not in rows[1]["drop_reason"]
    assert rows[1]["clip_score"] is None and rows[1]["embedding"] is None
    assert rows[2]["drop_reason"].startswith("too_small") and rows[2]["clip_score"] is None  # untouched
    assert rows[0]["clip_model"] and rows[3]["embedding"] is not None and rows[3]["quarantined"] is False


def test_empty_caption_keeps_embedding_without_score(stage: ClipScoreStage) -> None:
    out = stage(_pairs(2, **{"0": {"text": None}})).to_pylist()
    assert out[0]["clip_score"] is None and out[0]["clip_cosine"] is None and len(out[0]["embedding"]) == 32
    assert out[1]["clip_score"] is not None


def test_mmc4_images_scored_against_matched_sentence(stage: ClipScoreStage, reference) -> None:
    sentences = ["An intro sentence about cooking.", "Slice the onions thinly.", "Serve the soup hot."]
    images = [
        {"image_name": "a.jpg", "matched_text_index": 2, "image": _image(10)},
        {"image_name": "b.jpg", "matched_text_index": 0, "image": _image(11)},
        {
            "image_name": "c.jpg",
            "matched_text_index": 1,
            "image": _image(12),
            "drop_reason": "exact_duplicate: of x",
            "drop_stage": "dedup",
        },
        {"image_name": "d.jpg", "matched_text_index": 7, "image": _image(13)},
        {"image_name": "e.jpg", "matched_text_index": 1, "image": b"broken"},
    ]
    doc = make_table(
        [
            {
                "key": "doc1",
                "source": "mmc4",
                "shard": "s0",
                "text_list": sentences,
                "image_info": images,
                "quarantined": False,
            },
            {
                "key": "doc2",
                "source": "mmc4",
                "shard": "s0",
                "text_list": sentences,
                "image_info": [{"image_name": "z.jpg", "matched_text_index": 0, "image": b"x"}],
                "quarantined": False,
            },
        ],
        DOCUMENT_SCHEMA,
    )
    out = stage(doc).to_pylist()
    ims = out[0]["image_info"]
    _, cos = reference([_image(10), _image(11)], [sentences[2], sentences[0]])
    assert ims[0]["clip_cosine"] == pytest.approx(cos[0], abs=1e-5)
    assert ims[1]["clip_cosine"] == pytest.approx(cos[1], abs=1e-5)
    assert ims[0]["clip_score"] == pytest.approx(2.5 * max(cos[0], 0), abs=1e-5)
    assert ims[2]["clip_score"] is None and ims[2]["drop_stage"] == "dedup"
    assert ims[3]["drop_reason"].startswith("clip_no_matched_text:")
    assert ims[4]["drop_reason"].startswith("image_undecodable:") and ims[4]["drop_stage"] == "clipscore"
    assert out[0]["drop_reason"] is None
    assert out[1]["drop_reason"] == "no_usable_images" and out[1]["drop_stage"] == "clipscore"


def test_draft_decoding_stays_close_to_full_decode(demo: dict[str, str]) -> None:
    big = [_image(20 + i, size=(640, 480)) for i in range(3)]
    table = _pairs(3, **{str(i): {"image": b} for i, b in enumerate(big)})
    rt = ModelRuntime(device="cpu", batch_size=8)
    full = ClipScoreStage(ClipScoreConfig(model=demo["clip"], draft=False, runtime=rt))(table)
    draft = ClipScoreStage(ClipScoreConfig(model=demo["clip"], draft=True, runtime=rt))(table)
    a = np.array(full.column("embedding").to_pylist())
    b = np.array(draft.column("embedding").to_pylist())
    assert (a * b).sum(1).min() > 0.98


# -- clip_filter -------------------------------------------------------------------------------------------


def _scored(
    scores: list[float | None],
    source: str = "coyo",
    metas: list[dict | None] | None = None,
    shards: list[str] | None = None,
) -> pa.Table:
    rows = []
    for i, s in enumerate(scores):
        rows.append(
            {
                "key": f"k{i:02d}",
                "source": source,
                "shard": (shards or ["00000"] * len(scores))[i],
                "clip_score": s,
                "quarantined": False,
                "meta": json.dumps(metas[i]) if metas and metas[i] is not None else None,
            }
        )
    return make_table(rows, PAIR_SCHEMA)


def _decide_all(stage: ClipFilterStage, sigs: pa.Table) -> pa.Table:
    """The local engine's grouping: one decide call per value of group_by."""
    parts = []
    groups = sigs.column(stage.group_by).to_pylist()
    for g in sorted(set(groups)):
        parts.append(stage.decide(sigs.filter(pa.array([x == g for x in groups]))))
    return pa.concat_tables(parts)


def _reasons(decisions: pa.Table) -> dict[str, str]:
    return dict(
        zip(decisions.column("key").to_pylist(), decisions.column("drop_reason").to_pylist(), strict=True)
    )


def test_floor_drops_below_min_score_and_unscored() -> None:
    stage = ClipFilterStage(ClipFilterConfig(min_score=0.2))
    sigs = stage.signatures(_scored([0.12, 0.2, 0.5, None]))
    assert sigs.schema == SIGNATURE_SCHEMA and sigs.num_rows == 4
    dec = _decide_all(stage, sigs)
    r = _reasons(dec)
    assert r == {
        "k00": "clip_below_floor: 0.1200 < 0.2000",
        "k03": "clip_unscored: no CLIP score (empty caption or not run through clipscore)",
    }
    assert dec.filter(pa.compute.equal(dec.column("key"), "k00")).column("value")[0].as_py() == pytest.approx(
        0.2
    )


def test_top_percent_exact_with_ties_broken_by_key() -> None:
    stage = ClipFilterStage(ClipFilterConfig(top_percent=30))
    scores = [0.5, 0.9, 0.7, 0.7, 0.7, 0.1, 0.3, 0.2, 0.4, 0.6]  # ceil(30% of 10) = 3 kept
    dec = _decide_all(stage, stage.signatures(_scored(scores)))
    kept = sorted(set(f"k{i:02d}" for i in range(10)) - set(_reasons(dec)))
    assert kept == ["k01", "k02", "k03"]  # 0.9, then the 0.7 tie -> smallest keys k02, k03; k04 dropped
    r = _reasons(dec)
    assert r["k04"] == "clip_below_top_percent: 0.7000 ranks 4 > 3 kept (top 30% of 10 in 'coyo', cut 0.7000)"
    assert dec.column("value").to_pylist() == pytest.approx([0.7] * 7)


def test_floor_then_top_percent_counts_whole_group() -> None:
    stage = ClipFilterStage(ClipFilterConfig(min_score=0.45, top_percent=50))
    dec = _decide_all(stage, stage.signatures(_scored([0.1, 0.2, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9])))
    r = _reasons(dec)
    assert sorted(k for k, v in r.items() if v.startswith("clip_below_floor")) == ["k00", "k01", "k02"]
    assert sorted(k for k, v in r.items() if v.startswith("clip_below_top_percent")) == ["k03"]  # 4 of 8 kept


def test_groups_are_per_source() -> None:
    stage = ClipFilterStage(ClipFilterConfig(top_percent=50))
    sigs = pa.concat_tables(
        [stage.signatures(_scored([0.1, 0.2], "a")), stage.signatures(_scored([0.8, 0.9], "b"))]
    )
    dec = _decide_all(stage, sigs)
    pairs = zip(dec.column("source").to_pylist(), dec.column("key").to_pylist(), strict=True)
    assert sorted(pairs) == [("a", "k00"), ("b", "k00")]


def test_vila_coyo_preset_per_shard() -> None:
    stage = ClipFilterStage(ClipFilterConfig(preset="vila_coyo"))
    assert stage.group_by == "group"
    sims = [0.30, 0.40, 0.35, 0.28, 0.25, 0.32, 0.31, 0.36, 0.29, 0.33]
    metas = [{"clip_similarity_vitb32": s, "clip_similarity_vitl14": s - 0.02} for s in sims]
    metas[4]["clip_similarity_vitl14"] = 0.34  # 0.59 <= 0.6: below VILA's floor
    table = pa.concat_tables(
        [
            _scored([None] * 10, metas=metas, shards=["00000"] * 10),
            _scored([None] * 5, metas=metas[:5], shards=["00001"] * 5),
        ]
    )
    sigs = stage.signatures(table)
    assert set(sigs.column("group").to_pylist()) == {"coyo/00000", "coyo/00001"}
    dec = _decide_all(stage, sigs)
    shard0 = dec.filter(pa.compute.equal(dec.column("group"), "coyo/00000"))
    r0 = _reasons(shard0)
    # int(10 * 0.2) = 2 kept: sums 0.78 (k01) and 0.70 (k07)
    assert sorted(set(f"k{i:02d}" for i in range(10)) - set(r0)) == ["k01", "k07"]
    assert r0["k04"].startswith("clip_below_floor: clip_similarity_vitb32+vitl14 0.5900 <= 0.6000")
    assert r0["k02"].startswith("clip_below_top_percent: clip_similarity_vitb32+vitl14 0.6800 ranks 3 > 2")
    # shard 1: int(5 * 0.2) = 1 kept
    assert dec.filter(pa.compute.equal(dec.column("group"), "coyo/00001")).num_rows == 4


def test_vila_preset_falls_back_to_clip_score_without_similarities() -> None:
    stage = ClipFilterStage(ClipFilterConfig(preset="vila_coyo", min_score=0.3))
    sigs = stage.signatures(_scored([0.2, 0.5], source="mmc4like"))
    assert sigs.column("rule").to_pylist() == ["clip_score", "clip_score"]
    assert _reasons(_decide_all(stage, sigs)) == {"k00": "clip_below_floor: 0.2000 < 0.3000"}


def test_decide_is_order_independent() -> None:
    stage = ClipFilterStage(ClipFilterConfig(min_score=0.15, top_percent=40))
    rng = random.Random(0)
    scores = [round(rng.random(), 2) for _ in range(60)]  # many ties at 2 decimals
    sigs = stage.signatures(_scored(scores))
    ref = stage.decide(sigs)
    for seed in range(3):
        perm = list(range(sigs.num_rows))
        random.Random(seed).shuffle(perm)
        assert stage.decide(sigs.take(perm)).equals(ref)


def test_document_images_filtered_individually() -> None:
    info = [{"image_name": f"{j}.jpg", "clip_score": s} for j, s in enumerate([0.1, 0.6, 0.05])]
    docs = make_table(
        [
            {"key": "d1", "source": "mmc4", "shard": "s", "image_info": info, "quarantined": False},
            {
                "key": "d2",
                "source": "mmc4",
                "shard": "s",
                "quarantined": False,
                "image_info": [{"image_name": "x.jpg", "clip_score": 0.01}],
            },
        ],
        DOCUMENT_SCHEMA,
    )
    stage = ClipFilterStage(ClipFilterConfig(min_score=0.2))
    sigs = stage.signatures(docs)
    assert sigs.column("image_index").to_pylist() == [0, 1, 2, 0]
    out = apply_decisions(docs, index_decisions(_decide_all(stage, sigs)), stage.name).to_pylist()
    assert [im["drop_reason"] is None for im in out[0]["image_info"]] == [False, True, False]
    assert out[0]["drop_reason"] is None and out[1]["drop_reason"] == "no_usable_images"


def test_set_up_stage_pickles_without_its_model(stage: ClipScoreStage) -> None:
    import pickle

    stage.name = "clipscore_2"  # the planner renames repeated stages per instance
    try:
        clone = pickle.loads(pickle.dumps(stage))
    finally:
        stage.name = "clipscore"
    assert clone._bundle is None and clone.name == "clipscore_2" and clone.cfg == stage.cfg
    out = clone(_pairs(1))  # a worker's first batch loads the model
    assert out.column("drop_reason")[0].as_py() is None and out.column("clip_score")[0].is_valid
