"""DeltaLoss: mean token log-likelihood under two causal LMs, and top-K per subset.

The LMs are the tiny random Llamas from pipelines/demo/models.py, loaded through the production path;
expected log-likelihoods are recomputed by hand with transformers, one unpadded sequence at a time.
"""

from __future__ import annotations

import json
import math
import random

import pyarrow as pa
import pytest
import torch

from vila2_curate.curation.deltaloss import DeltaLossScoreStage, DeltaLossTopKStage
from vila2_curate.pipelines.demo.models import cached_demo_models
from vila2_curate.schemas.config import DeltaLossConfig, ModelRuntime
from vila2_curate.schemas.rows import DOCUMENT_SCHEMA, PAIR_SCHEMA, make_table

TEXTS = [
    "A photo of a dog running on the beach at sunset.",
    "cat",
    "Two children play football in a green park while their parents watch from a wooden bench, "
    "and a red car is parked next to a tree near the river.",
    "A bowl of fresh fruit.",
    "Snow covers the roofs of the village in winter.",
]


@pytest.fixture(scope="module")
def demo() -> dict[str, str]:
    return cached_demo_models()


def _cfg(demo: dict[str, str], batch_size: int = 8, **kw) -> DeltaLossConfig:
    return DeltaLossConfig(
        small_model=demo["lm_small"],
        large_model=demo["lm_large"],
        runtime=ModelRuntime(device="cpu", batch_size=batch_size),
        **kw,
    )


@pytest.fixture(scope="module")
def stage(demo: dict[str, str]) -> DeltaLossScoreStage:
    s = DeltaLossScoreStage(_cfg(demo))
    s.setup()
    return s


def _by_hand(path: str, text: str, max_length: int | None = None) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = tok(text).input_ids  # the demo tokenizer prepends <s>
    assert ids[0] == tok.bos_token_id
    ids = ids[:max_length] if max_length else ids
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    logp = torch.log_softmax(logits.float(), -1)
    return sum(logp[t - 1, ids[t]].item() for t in range(1, len(ids))) / (len(ids) - 1)


def _pairs(texts: list[str | None], **extra) -> pa.Table:
    return make_table(
        [
            {"key": f"k{i}", "source": "coyo", "shard": "0", "text": t, "quarantined": False, **extra}
            for i, t in enumerate(texts)
        ],
        PAIR_SCHEMA,
    )


def test_logp_matches_hand_computation(stage: DeltaLossScoreStage, demo: dict[str, str]) -> None:
    out = stage(_pairs(TEXTS)).to_pylist()
    small, large = _by_hand(demo["lm_small"], TEXTS[0]), _by_hand(demo["lm_large"], TEXTS[0])
    assert out[0]["logp_small"] == pytest.approx(small, abs=1e-5)
    assert out[0]["logp_large"] == pytest.approx(large, abs=1e-5)
    assert out[0]["delta_loss"] == pytest.approx(large - small, abs=1e-5)
    for r in out:
        assert r["delta_loss"] == pytest.approx(r["logp_large"] - r["logp_small"], abs=1e-6)
    assert (
        stage.identities["small"]["demo"] is True and len(stage.identities["large"]["weights_sha256"]) == 64
    )


def test_padding_does_not_change_scores(demo: dict[str, str], stage: DeltaLossScoreStage) -> None:
    many = stage(_pairs(TEXTS))
    one = DeltaLossScoreStage(_cfg(demo, batch_size=1))(_pairs(TEXTS))
    for col in ("logp_small", "logp_large", "delta_loss"):
        assert one.column(col).to_pylist() == pytest.approx(many.column(col).to_pylist(), abs=1e-5)
    alone = stage(_pairs([TEXTS[1]]))
    assert alone.column("logp_large")[0].as_py() == pytest.approx(
        many.column("logp_large")[1].as_py(), abs=1e-5
    )


def test_latest_caption_dropped_rows_and_empty_text(stage: DeltaLossScoreStage, demo: dict[str, str]) -> None:
    caps = [{"round": 1, "text": TEXTS[3]}]
    table = make_table(
        [
            {"key": "a", "source": "s", "shard": "0", "text": "ignored alt text", "captions": caps},
            {
                "key": "b",
                "source": "s",
                "shard": "0",
                "text": TEXTS[0],
                "drop_reason": "x: y",
                "drop_stage": "z",
            },
            {"key": "c", "source": "s", "shard": "0", "text": ""},
        ],
        PAIR_SCHEMA,
    )
    out = stage(table).to_pylist()
    assert out[0]["logp_small"] == pytest.approx(_by_hand(demo["lm_small"], TEXTS[3]), abs=1e-5)
    assert out[1]["logp_small"] is None and out[1]["drop_reason"] == "x: y"
    assert out[2]["delta_loss"] is None and out[2]["drop_reason"] is None


def test_documents_join_sentences_and_truncate(demo: dict[str, str]) -> None:
    stage = DeltaLossScoreStage(_cfg(demo, max_length=8))
    doc = make_table(
        [
            {
                "key": "d",
                "source": "mmc4",
                "shard": "0",
                "text_list": TEXTS[:3],
                "image_info": [{"image_name": "a.jpg"}],
                "quarantined": False,
            }
        ],
        DOCUMENT_SCHEMA,
    )
    out = stage(doc).to_pylist()[0]
    joined = " ".join(TEXTS[:3])
    assert out["logp_large"] == pytest.approx(_by_hand(demo["lm_large"], joined, max_length=8), abs=1e-5)


def test_vlm_scorer_not_implemented(demo: dict[str, str]) -> None:
    with pytest.raises(NotImplementedError, match="vlm"):
        DeltaLossScoreStage(_cfg(demo, scorer="vlm"))


# -- top-K per subset --------------------------------------------------------------------------------------


def _scored(deltas: list[float | None], subsets: list[str]) -> pa.Table:
    return make_table(
        [
            {
                "key": f"k{i:02d}",
                "source": "coyo",
                "shard": "0",
                "delta_loss": d,
                "quarantined": False,
                "meta": json.dumps({"domain": s}),
            }
            for i, (d, s) in enumerate(zip(deltas, subsets, strict=True))
        ],
        PAIR_SCHEMA,
    )


def _decide_all(stage: DeltaLossTopKStage, sigs: pa.Table) -> pa.Table:
    groups = sigs.column(stage.group_by).to_pylist()
    return pa.concat_tables(
        [stage.decide(sigs.filter(pa.array([x == g for x in groups]))) for g in sorted(set(groups))]
    )


def test_top_k_per_subset_with_ties(demo: dict[str, str]) -> None:
    stage = DeltaLossTopKStage(_cfg(demo, keep_fraction=0.5, subset_by="meta.domain"))
    assert stage.group_by == "subset"
    deltas = [0.5, 0.2, 0.2, 0.2, None, 0.9, 0.1, -0.3]
    subsets = ["news", "news", "news", "news", "news", "art", "art", "art"]
    sigs = stage.signatures(_scored(deltas, subsets))
    assert sigs.column("image_index").to_pylist() == [-1] * 8
    dec = _decide_all(stage, sigs)
    dropped = dict(zip(dec.column("key").to_pylist(), dec.column("drop_reason").to_pylist(), strict=True))
    # news: 5 rows -> ceil(2.5) = 3 kept: 0.5, then the 0.2 tie by key (k01, k02); k03 and unscored k04 out
    # art: 3 rows -> ceil(1.5) = 2 kept: 0.9, 0.1
    assert sorted(dropped) == ["k03", "k04", "k07"]
    assert dropped["k03"] == "deltaloss_below_top_k: 0.2000 ranks 4 > k=3 of 5 in subset 'news' (cut 0.2000)"
    assert dropped["k04"].startswith("deltaloss_below_top_k: unscored (no text) ranks 5 > k=3")
    values = dict(zip(dec.column("key").to_pylist(), dec.column("value").to_pylist(), strict=True))
    assert values["k07"] == pytest.approx(0.1) and values["k03"] == pytest.approx(0.2)
    assert stage.summarize(dec, sigs)["subsets"]["news"] == {
        "rows": 5,
        "kept": 3,
        "dropped": 2,
        "cut": pytest.approx(0.2),
    }


def test_top_k_subset_by_column_and_order_independence(demo: dict[str, str]) -> None:
    stage = DeltaLossTopKStage(_cfg(demo, keep_fraction=0.3))
    rng = random.Random(1)
    deltas = [round(rng.uniform(-1, 1), 1) for _ in range(40)]
    sigs = stage.signatures(_scored(deltas, ["x"] * 40))
    assert set(sigs.column("subset").to_pylist()) == {"coyo"}
    ref = stage.decide(sigs)
    assert ref.num_rows == 40 - math.ceil(0.3 * 40)
    for seed in range(3):
        perm = list(range(40))
        random.Random(seed).shuffle(perm)
        assert stage.decide(sigs.take(perm)).equals(ref)


def test_keep_fraction_validated(demo: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="keep_fraction"):
        DeltaLossTopKStage(_cfg(demo, keep_fraction=0.0))
