"""Colour-aware near-duplicate dedup on the generated evaluation set: recall and no distinct picture merged."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from vila2_curate.curation.dedup.thumb_match import confirm_pair
from vila2_curate.curation.dedup.thumbnails import THUMB_BYTES, thumbnail
from vila2_curate.pipelines.demo.dedup_eval import (
    dedup_groups,
    eval_table,
    make_dedup_eval,
    phash_baseline_groups,
    score,
)
from vila2_curate.schemas.config import DedupConfig


@pytest.fixture(scope="module")
def small_eval():
    ev = make_dedup_eval(seed=3, families=12)  # 2 families of each kind, 152 items
    return ev, eval_table(ev)


def test_generator_is_deterministic_and_has_ground_truth():
    a, b = make_dedup_eval(seed=5, families=6), make_dedup_eval(seed=5, families=6)
    assert [(i.id, i.data) for i in a.items] == [(i.id, i.data) for i in b.items]
    assert {i.kind for i in a.items} == {"card", "shape", "product", "photo", "graphic", "text"}
    assert {how for _, _, how in a.lookalikes} == {"colour", "words", "background", "moved", "larger", "tint"}
    transforms = " ".join(i.transform for i in a.items)
    assert all(t in transforms for t in ("crop_", "resize_", "jpg_q", "webp_q"))
    crops = [float(v) for i in a.items for part in i.transform.split("+") if part.startswith("crop_")
             for v in part.split("_")[1:]]
    assert crops and min(crops) >= 0.02 and max(crops) <= 0.06  # 2-6% per side
    # a crop then a low-quality JPEG re-encode
    assert any(i.transform.startswith("crop_") and "resize" not in i.transform
               and int(i.transform.rsplit("_q", 1)[1]) <= 65 for i in a.items)
    # 3 card + 4 shape + 2 product + 1 photo + 4 graphic + 5 text pictures, each original + 3 copies
    assert len(a.near_pairs()) == 19 * 6


def test_defaults_find_near_duplicates_and_merge_no_distinct_picture(small_eval):
    ev, table = small_eval
    ours = score(ev.items, dedup_groups(table, DedupConfig()))
    assert ours["merged_pictures"] == 0, ours["merged"]
    assert ours["recall"] >= 0.98, ours["missed"]
    baseline = score(ev.items, phash_baseline_groups(ev, 8))  # what plain pHash does on the same set
    assert baseline["merged_pictures"] > 0 and baseline["recall"] < ours["recall"]


def _encoded(img: Image.Image, fmt: str = "JPEG", quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, quality=quality)
    return buf.getvalue()


def test_colour_and_background_change_is_seen_copies_are_not():
    """Colour look-alikes pHash cannot tell apart: a green and a grey-green card of the same grey; a shape on
    cream and on grey."""
    cfg = DedupConfig()

    def card(colour: tuple[int, int, int]) -> Image.Image:
        img = Image.new("RGB", (480, 400), (250, 250, 248))
        img.paste(colour, (30, 30, 450, 370))
        return img

    green, grey_green = card((60, 150, 75)), card((105, 120, 108))  # luma 114.5 vs 114.1
    assert abs(np.asarray(green.convert("L"), float).mean() - np.asarray(grey_green.convert("L"), float).mean()) < 1
    copy = green.crop((10, 12, 470, 390)).resize((345, 284))
    t_green, t_grey, t_copy = (thumbnail(_encoded(i, quality=q)) for i, q in ((green, 90), (grey_green, 90),
                                                                               (copy, 40)))
    assert len(t_green) == THUMB_BYTES
    assert confirm_pair(t_green, t_copy, cfg) and not confirm_pair(t_green, t_grey, cfg)

    def shape(bg: tuple[int, int, int], x: int = 120) -> Image.Image:
        img = Image.new("RGB", (480, 400), bg)
        img.paste((200, 60, 50), (x, 120, x + 140, 260))
        return img

    cream, grey = shape((245, 235, 205)), shape((234, 234, 234))
    moved = shape((245, 235, 205), x=260)
    t_cream = thumbnail(_encoded(cream))
    assert confirm_pair(t_cream, thumbnail(_encoded(cream, "WEBP", 60)), cfg)
    assert not confirm_pair(t_cream, thumbnail(_encoded(grey)), cfg)
    assert not confirm_pair(t_cream, thumbnail(_encoded(moved)), cfg)
