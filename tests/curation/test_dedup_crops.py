"""Near-duplicates that differ by a crop of up to 6% per side are confirmed and found as thumbnail
neighbours; look-alike simple graphics (one shape or one line of text on a plain page: larger, moved, on a
tinted page, other words) are not confirmed; confirmation is a function of the unordered pair."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from vila2_curate.curation.dedup import DedupStage
from vila2_curate.curation.dedup.pairs import thumb_knn_pairs
from vila2_curate.curation.dedup.thumb_match import confirm_pair, confirm_pairs, knn_key, thumbnail_signals
from vila2_curate.curation.dedup.thumbnails import THUMB_BYTES, thumbnail
from vila2_curate.curation.normalize import phash_u64
from vila2_curate.pipelines.demo.colours import tinted
from vila2_curate.pipelines.demo.dedup_eval import eval_table, make_dedup_eval
from vila2_curate.pipelines.demo.pictures import PictureGenerator
from vila2_curate.schemas.config import DedupConfig
from vila2_curate.schemas.rows import PAIR_SCHEMA, make_table

W, H = 600, 500
PAGE = (236, 226, 246)
CFG = DedupConfig()


def _jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _crop(img: Image.Image, left: float, top: float, right: float, bottom: float) -> Image.Image:
    w, h = img.size
    return img.crop((round(left * w), round(top * h), w - round(right * w), h - round(bottom * h)))


def _shape(centre: tuple[float, float] = (0.42, 0.5), size: float = 0.28, page: tuple[int, int, int] = PAGE,
           colour: tuple[int, int, int] = (40, 120, 200)) -> Image.Image:
    img = Image.new("RGB", (W, H), page)
    r = size * H / 2
    cx, cy = centre[0] * W, centre[1] * H
    ImageDraw.Draw(img).ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    return img


def _line(words: str = "BAKERY OPEN", centre: tuple[float, float] = (0.5, 0.45), px: int = 30,
          page: tuple[int, int, int] = PAGE) -> Image.Image:
    img = Image.new("RGB", (W, H), page)
    ImageDraw.Draw(img).text((centre[0] * W, centre[1] * H), words, font=ImageFont.load_default(size=px),
                             fill=(40, 30, 60), anchor="mm")
    return img


_CROPS = (((0.06, 0.06, 0.02, 0.06), 40), ((0.02, 0.05, 0.06, 0.03), 85), ((0.06, 0.02, 0.06, 0.02), 55))


def _cropped_copies(img: Image.Image) -> list[bytes]:
    """Crops of 2-6% per side, re-encoded at JPEG q40-85, as they are and resized to 0.6."""
    out = []
    for crop, quality in _CROPS:
        cropped = _crop(img, *crop)
        out += [_jpeg(cropped, quality), _jpeg(cropped.resize((round(cropped.width * 0.6),
                                                               round(cropped.height * 0.6))), quality)]
    return out


@pytest.mark.parametrize("make", [_shape, _line], ids=["shape", "text"])
def test_crops_of_up_to_six_percent_per_side_are_confirmed(make) -> None:
    img = make()
    original = thumbnail(_jpeg(img))
    for n, copy in enumerate(_cropped_copies(img)):
        assert confirm_pair(original, thumbnail(copy), CFG), n


def test_crops_of_a_photo_end_in_one_group() -> None:
    """A photo-like picture (no flat border: compared on the whole frame) and six cropped copies."""
    img = PictureGenerator(7).photo(W, H)[0]
    rows = [{"key": f"k{n}", "source": "coyo", "shard": "s0", "image": data, "image_format": "jpg",
             "sha256": f"{n:064x}", "phash": phash_u64(Image.open(io.BytesIO(data))), "width": 1, "height": 1,
             "text": "a photo"} for n, data in enumerate([_jpeg(img), *_cropped_copies(img)])]
    stage = DedupStage(CFG)
    decisions = stage.decide(stage.signatures(make_table(rows, PAIR_SCHEMA)))
    groups = {g for g in decisions.column("group").to_pylist()}
    assert decisions.num_rows == len(rows) and len(groups) == 1, groups


def test_lookalike_simple_graphics_are_not_confirmed() -> None:
    original = _shape()
    tint = tinted(PAGE, (10.0, 10.0), np.random.default_rng(0))
    lookalikes = {"larger": _shape(size=0.28 * 1.45), "moved": _shape(centre=(0.62, 0.5)),
                  "tinted page": _shape(page=tint)}
    copies = [original, _crop(original, 0.05, 0.03, 0.02, 0.06)]
    for name, other in lookalikes.items():
        for copy in copies:  # the look-alike against the original and against its crop, re-encoded
            for quality in (90, 40):
                assert not confirm_pair(thumbnail(_jpeg(copy, quality)), thumbnail(_jpeg(other)), CFG), name
    assert confirm_pair(thumbnail(_jpeg(copies[0])), thumbnail(_jpeg(copies[1], 40)), CFG)


def test_lookalike_lines_of_text_are_not_confirmed() -> None:
    original = thumbnail(_jpeg(_line()))
    for name, other in {"larger": _line(px=45), "moved": _line(centre=(0.5, 0.67)),
                        "shorter, other words": _line("PARK")}.items():
        assert not confirm_pair(original, thumbnail(_jpeg(other)), CFG), name


def test_crop_pair_is_among_the_nearest_thumbnails_of_many_lookalikes() -> None:
    """Sixteen pictures of one shape in one colour, each somewhere else on the page: cropped to their
    content they have one grey grid, so without the content box in the key the crop of one of them is
    just one of sixteen ties for its nearest neighbours."""
    steps = np.linspace(0.22, 0.78, 4)  # >= 0.18 apart on x or y: more than crops of both explain
    pictures = [_shape(centre=(float(x), float(y)), size=0.24) for x in steps for y in steps]
    data = [_jpeg(p) for p in pictures] + [_jpeg(_crop(pictures[7], 0.05, 0.06, 0.03, 0.05), 45)]
    thumbs = np.stack([np.frombuffer(thumbnail(d), dtype=np.uint8) for d in data])
    crop = len(pictures)
    assert (7, crop) in {tuple(p) for p in thumb_knn_pairs(thumbs, 10).tolist()}
    assert confirm_pairs(thumbs, np.array([[7, crop]]), CFG).all()
    others = np.array([[i, crop] for i in range(len(pictures)) if i != 7])
    assert not confirm_pairs(thumbs, others, CFG).any()


def test_knn_key_is_exact_in_float32() -> None:
    """Squared norms under 2^23: faiss' float32 distances (|x|^2 + |y|^2 - 2 x.y) are exact integers, so ties
    break alike in the reference decide and in every partition."""
    extremes = np.stack([np.zeros(THUMB_BYTES, np.uint8), np.full(THUMB_BYTES, 255, np.uint8)])
    grey = np.stack([np.zeros(64), np.full(64, 255.0)])
    key = knn_key(extremes, grey).astype(np.float64)
    assert np.array_equal(key, np.rint(key)) and (key ** 2).sum(axis=1).max() < 2 ** 23


def test_confirmation_is_a_function_of_the_unordered_pair() -> None:
    ev = make_dedup_eval(seed=11, families=6)
    table = eval_table(ev)
    thumbs = np.stack([np.frombuffer(thumbnail(d), dtype=np.uint8) for d in table.column("image").to_pylist()])
    pairs = np.array([(i, j) for i in range(len(thumbs)) for j in range(i + 1, len(thumbs))])
    a, b = thumbnail_signals(thumbs, pairs), thumbnail_signals(thumbs, pairs[:, ::-1])
    for name in a:
        assert np.array_equal(a[name], b[name]), name
    assert np.array_equal(confirm_pairs(thumbs, pairs, CFG), confirm_pairs(thumbs, pairs[:, ::-1], CFG))
