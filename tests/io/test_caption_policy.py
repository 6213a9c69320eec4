"""The caption policy (latest / original / mix) that picks each sample's .txt."""

from __future__ import annotations

from tests.helpers.rows import caption
from tests.helpers.writers import LATEST
from vila2_curate.schemas.captions import choose_caption, choose_caption_source, mix_draw
from vila2_curate.schemas.config import CaptionPolicy

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
