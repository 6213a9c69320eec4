"""Near-duplicate evaluation set with ground truth: re-encoded / resized / cropped copies and look-alikes.

``make_dedup_eval(seed, families)`` draws, with PIL and one seeded numpy Generator (same seed, same
bytes), *families* of pictures. Each family is one original layout and its **look-alikes**: distinct
pictures that perceptual hashes and grey thumbnails confuse with it and that dedup must NOT merge:

* ``card``: a flat label card with a title and a line of words; look-alikes: the same card in a close
  colour of the same lightness (green vs grey-green), the same card with other words (title and subtitle line).
* ``shape``: one shape on a flat background; look-alikes: the same shape on another background of the
  same lightness (a pastel vs grey), the same shape moved by >= 20% of the picture, the shape in another
  colour.
* ``product``: a shaded bottle, jar or carton on a light backdrop with a vignette and grain; look-alike: the same object in another
  colour of about the same lightness (one product photographed in two colours).
* ``photo``: a smooth random texture (a photo-like picture, no look-alike: the recall cases).
* ``graphic``: a simple graphic, one shape on a plain light background, where hash and thumbnail
  distances between different pictures are smallest; look-alikes: the same shape and colour made 40-60%
  larger, moved by 18-25% of the picture, or on a background tinted by CIE76 delta E 9.5-13 at the same
  grey (pHash distance 0): each more than crops of up to 6% per side and JPEG q35 of both can explain.
* ``text``: one line of dark words on a plain light background; look-alikes: the line 40-60% larger,
  moved by 18-25%, on a tinted background (as ``graphic``), or other words whose line is 1.45-1.8x shorter.

Every picture then gets near-duplicate copies, the transformations a crawl produces (img2dataset
re-encodes, resizes and sites crop): JPEG q35-65, WebP<->JPEG, resize x0.5-0.8, a crop of 2-6% on each
side independently, a crop then a JPEG q35-65 re-encode, and combinations of them. Ground truth: items
with the same ``picture`` are near-duplicates (every pair of them should end in one dedup group); items of
different pictures must never share a group. Different families stay apart by design (pages from
palettes whose colours differ by more than JPEG's error, tints kept away from every page in use, product
height classes 18% of the picture apart), so a merge across families is the detector's error.

``score(items, group_of)`` turns any grouping (our dedup's decisions, or a baseline's union-find) into
recall over near-duplicate pairs and false merges; ``write_dedup_eval`` writes the set as a COYO parquet
source plus ``ground_truth.json`` so a whole run can be scored too.
"""

from __future__ import annotations

import io
import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from vila2_curate.pipelines.demo.colours import hsv, same_grey, tinted
from vila2_curate.pipelines.demo.pictures import WORDS, PictureGenerator

GOLDEN = 0.6180339887  # hue step between families: hues of different families stay far apart
KINDS = ("card", "shape", "product", "photo", "graphic", "text")
CROP_PER_SIDE = (0.02, 0.06)  # near-duplicate crops: this fraction cut from each side independently
# Graphic and text look-alikes differ from the original by more than a crop of each can explain: a crop of
# up to 6% per side enlarges content by up to 1 / 0.88 = 1.14 and moves it by up to ~0.065 of the side, and
# JPEG q35 moves a flat colour by up to ~2.2 delta E, in the original's copies and in the look-alike's.
LOOKALIKE_SCALE = (1.4, 1.6)  # > 1.14 ** 2
LOOKALIKE_MOVE = (0.18, 0.25)  # along x or y; > 2 x 0.065
LOOKALIKE_TINT = (9.5, 13.0)  # background delta E (CIE76), at the same grey: pHash distance 0


# Pages of the graphic and text families, and of the shape families: 7 hues at two depths each, every two
# of one palette >= ~9 delta E apart, of the two >= ~6: one family's page is never another's
PAGES = tuple(hsv(i / 7 + 0.07 * depth, 0.12 + 0.14 * depth, 0.97 - 0.07 * depth) for depth in (0, 1)
              for i in range(7))
SHAPE_PAGES = tuple(hsv(i / 7 + 0.035 + 0.07 * depth, 0.19 + 0.14 * depth, 0.935 - 0.07 * depth) for depth in (0, 1)
                    for i in range(7))


@dataclass
class EvalItem:
    """One encoded image of the set: which picture it shows and how it was made from it."""

    id: str
    picture: str  # ground truth: equal for near-duplicates, different for distinct pictures
    family: str
    kind: str
    transform: str  # "original" or the near-duplicate transformation with its parameters
    data: bytes
    fmt: str  # "jpg" | "png" | "webp"


@dataclass
class DedupEvalSet:
    items: list[EvalItem]
    lookalikes: list[tuple[str, str, str]] = field(default_factory=list)  # (picture, picture, how)

    def near_pairs(self) -> list[tuple[int, int]]:
        """Index pairs (i < j) of items showing the same picture."""
        by_picture: dict[str, list[int]] = {}
        for i, it in enumerate(self.items):
            by_picture.setdefault(it.picture, []).append(i)
        return [p for members in by_picture.values() for p in itertools.combinations(members, 2)]


def _encode(img: Image.Image, fmt: str, quality: int) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpg":
        img.convert("RGB").save(buf, format="JPEG", quality=quality)
    elif fmt == "webp":
        img.convert("RGB").save(buf, format="WEBP", quality=quality, method=4)
    else:
        img.convert("RGB").save(buf, format="PNG", optimize=False)
    return buf.getvalue()


class _Painter:
    """The drawings: every random draw through one numpy Generator, so a seed fixes every byte."""

    def __init__(self, seed: int) -> None:
        self.g = PictureGenerator(seed)
        self.rng = self.g.rng
        self._fonts: dict[int, Any] = {}

    def font(self, size: int) -> Any:
        if size not in self._fonts:
            self._fonts[size] = ImageFont.load_default(size=size)  # Pillow's bundled FreeType font
        return self._fonts[size]

    def size(self) -> tuple[int, int]:
        return self.g.randint(480, 640), self.g.randint(450, 560)  # a 10% crop then x0.5 stays >= 200 px

    def card(self, w: int, h: int, colour: tuple[int, int, int], words: list[str]) -> Image.Image:
        """A label card filling most of the picture: coloured panel, white title, a darker band. The page
        around it (>= 8.4% of each side) outlasts a 6% crop: cut into, a card has no border to be found by,
        and its grids then cannot tell other words from a crop (as for a picture without a page)."""
        img = Image.new("RGB", (w, h), (250, 250, 248))
        d = ImageDraw.Draw(img)
        m = int(min(w, h) * 0.12)
        d.rounded_rectangle((m, m, w - m, h - m), radius=m, fill=colour)
        band = tuple(max(0, int(c * 0.6)) for c in colour)
        d.rectangle((m, int(h * 0.68), w - m, int(h * 0.82)), fill=band)
        d.text((w / 2, h * 0.38), words[0], font=self.font(int(h * 0.16)), fill=(255, 255, 255), anchor="mm")
        d.text((w / 2, h * 0.75), " ".join(words[1:]), font=self.font(int(h * 0.07)), fill=(245, 245, 245),
               anchor="mm")
        return img

    def shape(self, w: int, h: int, bg: tuple[int, int, int], colour: tuple[int, int, int], label: str,
              centre: tuple[float, float]) -> Image.Image:
        """One shape of ~35% of the short side at ``centre`` (fractions of the picture) on a flat background."""
        img = Image.new("RGB", (w, h), bg)
        r = int(min(w, h) * 0.18)
        cx, cy = int(centre[0] * w), int(centre[1] * h)
        PictureGenerator.draw_shape(ImageDraw.Draw(img), label, [cx - r, cy - r, cx + r, cy + r], colour)
        return img

    def product(self, w: int, h: int, colour: tuple[int, int, int], layout: dict[str, float]) -> Image.Image:
        """A shaded product (bottle, jar or carton) on a light graded backdrop with a vignette and grain."""
        t = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None, None]
        backdrop = np.broadcast_to(np.float32(layout["bg_top"]) * (1 - t) + np.float32(layout["bg_bottom"]) * t,
                                   (h, w, 3)).copy()
        img = Image.fromarray(np.clip(backdrop, 0, 255).astype(np.uint8), "RGB")
        d = ImageDraw.Draw(img)
        cx, bw, top, bottom = layout["cx"] * w, layout["body_w"] * w, layout["top"] * h, 0.9 * h
        if layout["type"] == "bottle":  # body, neck, cap, label band
            body = (cx - bw / 2, top + 0.12 * h, cx + bw / 2, bottom)
            d.rounded_rectangle(body, radius=int(bw * 0.2), fill=colour)
            d.rectangle((cx - bw * 0.18, top, cx + bw * 0.18, top + 0.13 * h), fill=colour)
            d.rectangle((cx - bw * 0.2, top - 0.05 * h, cx + bw * 0.2, top + 0.01 * h), fill=(40, 40, 40))
            d.rectangle((body[0], top + 0.35 * h, body[2], top + 0.55 * h), fill=(240, 240, 235))
        elif layout["type"] == "jar":  # short and wide, a wide lid, a label low down
            body = (cx - bw, top + 0.3 * h, cx + bw, bottom)
            d.rounded_rectangle(body, radius=int(bw * 0.3), fill=colour)
            d.rectangle((cx - bw * 0.85, top + 0.2 * h, cx + bw * 0.85, top + 0.31 * h), fill=(190, 160, 60))
            d.rectangle((body[0], top + 0.5 * h, body[2], top + 0.62 * h), fill=(250, 250, 250))
        else:  # box: a tall carton with a dark top stripe and a white window
            body = (cx - bw * 0.6, top, cx + bw * 0.6, bottom)
            d.rectangle(body, fill=colour)
            d.rectangle((body[0], top, body[2], top + 0.08 * h), fill=(30, 30, 60))
            d.ellipse((cx - bw * 0.35, top + 0.25 * h, cx + bw * 0.35, top + 0.45 * h), fill=(245, 245, 245))
        img = img.filter(ImageFilter.GaussianBlur(1.2))
        arr = np.asarray(img, dtype=np.float32)
        shade = 1.0 - 0.25 * np.abs(np.linspace(-1.0, 1.0, w, dtype=np.float32))[None, :, None] ** 2
        grain = 3.0 * self.rng.standard_normal(size=(h, w, 1), dtype=np.float32)
        return Image.fromarray(np.clip(arr * shade + grain, 0, 255).astype(np.uint8), "RGB")

    def graphic(self, w: int, h: int, bg: tuple[int, int, int], centre: tuple[float, float], size: float, *,
                colour: tuple[int, int, int], content: str) -> Image.Image:
        """One shape (``content``: its label), ``size`` x the short side across, at ``centre`` (fractions)
        on a plain background."""
        img = Image.new("RGB", (w, h), bg)
        r = size * min(w, h) / 2
        cx, cy = centre[0] * w, centre[1] * h
        box = [round(cx - r), round(cy - r), round(cx + r), round(cy + r)]
        PictureGenerator.draw_shape(ImageDraw.Draw(img), content, box, colour)
        return img

    def font_px(self, words: str, width: float) -> int:
        """The font size at which ``words`` span ``width`` pixels."""
        return max(8, round(100 * width / self.font(100).getlength(words)))

    def text_line(self, w: int, h: int, bg: tuple[int, int, int], centre: tuple[float, float], size: float, *,
                  colour: tuple[int, int, int], content: str, px: int | None = None) -> Image.Image:
        """One line of words (``content``) spanning ``size`` x the picture's width (or in a font of ``px``
        pixels), centred at ``centre``."""
        img = Image.new("RGB", (w, h), bg)
        ImageDraw.Draw(img).text((centre[0] * w, centre[1] * h), content, font=self.font(px or self.font_px(
            content, size * w)), fill=colour, anchor="mm")
        return img


def _other_words(p: _Painter, first: str, words: str, width: float) -> tuple[str, int]:
    """(words, font px): other words (``first`` if it fits), in the font of ``words`` spanning ``width``,
    whose line is 1.45-1.8x shorter. Same-length other words in small type are beyond what a 256-pixel
    thumbnail resolves (their letters blur alike), so the look-alike differs where it can be seen: the
    line's extent (shorter: a longer line would span what the larger look-alike spans)."""
    px = p.font_px(words, width)
    font = p.font(px)
    extra = [WORDS[int(i)] for i in p.rng.permutation(len(WORDS))]

    def shorter(alt: str) -> float:  # how many times shorter
        ink = font.getbbox(alt)
        return (font.getbbox(words)[2] - font.getbbox(words)[0]) / max(ink[2] - ink[0], 1)
    options = [first, *extra, *(f"{first} {x}" for x in extra), *(f"{x} {y}" for x, y in itertools.pairwise(extra))]
    fits = [alt for alt in options if 1.45 <= shorter(alt) <= 1.8 and alt != words]
    return (fits[0] if fits else min(options, key=lambda alt: abs(shorter(alt) - 1.6))), px


def _near_duplicates(p: _Painter, img: Image.Image, fmt: str, n: int) -> list[tuple[str, bytes, str]]:
    """``n`` near-duplicate copies of ``img`` (stored as ``fmt``): (transform, bytes, format)."""
    w, h = img.size
    other = "jpg" if fmt != "jpg" else "webp"  # WebP <-> JPEG (a PNG original goes to JPEG)
    kinds = ["jpeg", "format", "resize", "crop", "crop_jpeg", "combo"]
    picked = [kinds[int(k)] for k in p.rng.permutation(len(kinds))[:n]]
    out = []
    for kind in picked:
        im, name, enc, q = img, [], "jpg", p.g.randint(35, 65)
        if kind in ("crop", "crop_jpeg", "combo"):
            c = [p.rng.uniform(*CROP_PER_SIDE) for _ in range(4)]
            im = im.crop((round(c[0] * w), round(c[1] * h), w - round(c[2] * w), h - round(c[3] * h)))
            name.append("crop_" + "_".join(f"{v:.3f}" for v in c))
        if kind in ("resize", "combo"):
            s = p.rng.uniform(0.5, 0.8)
            im = im.resize((round(im.width * s), round(im.height * s)), Image.Resampling.LANCZOS)
            name.append(f"resize_{s:.2f}")
        if kind == "format":
            enc, q = other, p.g.randint(60, 90)
        elif kind == "combo" and p.rng.uniform() < 0.5:
            enc = other
        elif kind in ("resize", "crop"):
            q = p.g.randint(75, 92)
        name.append(f"{enc}_q{q}")
        out.append(("+".join(name), _encode(im, enc, q), enc))
    return out


def make_dedup_eval(seed: int = 0, families: int = 16, copies: int = 3) -> DedupEvalSet:
    """``families`` families (kinds in turn: card, shape, product, photo, graphic, text), each picture with ``copies``
    near-duplicates; deterministic for a seed."""
    p = _Painter(seed)
    titles = [WORDS[int(i)] for i in p.rng.permutation(len(WORDS))]  # card titles: no two card pictures share one
    items: list[EvalItem] = []
    lookalikes: list[tuple[str, str, str]] = []
    pages = [*PAGES, *SHAPE_PAGES]  # page colours in use
    for f in range(families):
        kind = KINDS[f % len(KINDS)]
        fam = f"f{f:03d}"
        w, h = p.size()
        pictures: list[tuple[str, Image.Image]] = []  # (how it differs from the family's first, image)
        # per kind, each family its own hue in [0.05, 0.47); colour look-alikes take theirs from [0.55, 0.97):
        # a look-alike of one family is never the colour of another family (>= 0.08 of the hue circle apart)
        hue = 0.05 + ((f // len(KINDS)) * GOLDEN) % 1.0 * 0.4 + p.rng.uniform(0.0, 0.02)
        if kind == "card":  # a green and a grey-green card (same hue, less saturated)
            c0 = hsv(hue, p.rng.uniform(0.6, 0.8), p.rng.uniform(0.55, 0.75))
            c1 = same_grey(hsv(hue, p.rng.uniform(0.15, 0.3), 0.7), c0)
            m = f // len(KINDS)
            words = [titles[2 * m % len(titles)]] + [p.g.choice(WORDS) for _ in range(3)]
            other = [titles[(2 * m + 1) % len(titles)]] + [p.g.choice([x for x in WORDS if x not in words])
                                                           for _ in range(3)]
            pictures = [("original", p.card(w, h, c0, words)), ("colour", p.card(w, h, c1, words)),
                        ("words", p.card(w, h, c0, other))]
        elif kind == "shape":  # one shape on cream and on grey; the shape in another hue, same grey
            bg0 = SHAPE_PAGES[(f // len(KINDS)) % len(SHAPE_PAGES)]
            bg1 = same_grey((230, 230, 230), bg0)
            s0 = hsv(hue, p.rng.uniform(0.6, 0.85), p.rng.uniform(0.6, 0.8))
            s1 = same_grey(hsv(hue + 0.5, 0.75, 0.8), s0)
            label = ("rectangle", "ellipse", "triangle")[(f // len(KINDS)) % 3]
            x, y = p.rng.uniform(0.25, 0.4), p.rng.uniform(0.3, 0.7)
            pictures = [("original", p.shape(w, h, bg0, s0, label, (x, y))),
                        ("background", p.shape(w, h, bg1, s0, label, (x, y))),
                        ("moved", p.shape(w, h, bg0, s0, label, (x + p.rng.uniform(0.25, 0.35), y))),
                        ("colour", p.shape(w, h, bg0, s1, label, (x, y)))]
        elif kind == "product":  # one product in two colours of the same grey
            m = f // len(KINDS)  # product type m % 3; products of one type step through the hues
            hue = 0.05 + ((m // 3) * GOLDEN + (m % 3) / 3) % 1.0 * 0.4 + p.rng.uniform(0.0, 0.02)
            c0 = hsv(hue, p.rng.uniform(0.55, 0.8), p.rng.uniform(0.55, 0.8))
            c1 = same_grey(hsv(hue + 0.5, 0.7, 0.7), c0)
            top = p.rng.uniform(226, 245, size=3)
            layout = {"type": ("bottle", "jar", "box")[m % 3], "cx": (0.3, 0.5, 0.7)[(m // 3) % 3],
                      "body_w": p.rng.uniform(0.25, 0.32),
                      "top": (0.06, 0.24, 0.42)[(m // 9) % 3] + p.rng.uniform(0.0, 0.03),  # height class
                      "bg_top": top.tolist(), "bg_bottom": (top - p.rng.uniform(10, 30)).tolist()}
            pictures = [("original", p.product(w, h, c0, layout)), ("colour", p.product(w, h, c1, layout))]
        elif kind == "photo":
            pictures = [("original", p.g.photo(w, h)[0])]
        else:  # graphic / text: same content, larger, moved, or on a tinted background of the same grey
            m = f // len(KINDS)
            bg0 = PAGES[m % len(PAGES)]
            bg1 = tinted(bg0, LOOKALIKE_TINT, p.rng, tuple(c for c in pages if c != bg0))
            pages.append(bg1)  # later tints keep away from this one too
            x, y = p.rng.uniform(0.35, 0.65), p.rng.uniform(0.35, 0.65)
            angle = p.rng.uniform(0.0, 2 * np.pi)
            direction = np.array([np.cos(angle), np.sin(angle)])
            move = p.rng.uniform(*LOOKALIKE_MOVE) * direction / np.abs(direction).max()  # along x or y at least
            moved = tuple(float(c + d if 0.2 <= c + d <= 0.8 else c - d)  # the shape stays well inside
                          for c, d in zip((x, y), move, strict=True))
            scale = p.rng.uniform(*LOOKALIKE_SCALE)
            draw: Callable[..., Image.Image]
            other: list[tuple[str, Image.Image]] = []
            if kind == "graphic":  # hues over the whole circle: one family's shape is never another's colour
                colour = hsv((m * GOLDEN) % 1.0, p.rng.uniform(0.55, 0.85), p.rng.uniform(0.5, 0.8))
                draw = partial(p.graphic, w, h, colour=colour, content=("rectangle", "ellipse", "triangle")[m % 3])
                size = p.rng.uniform(0.22, 0.32)
            else:  # each family its own first word; the other-words look-alike takes one no family uses
                colour = hsv((m * GOLDEN) % 1.0, p.rng.uniform(0.3, 0.8), p.rng.uniform(0.1, 0.35))
                words = " ".join([titles[-1 - 2 * m % len(titles)], p.g.choice(WORDS)])
                draw = partial(p.text_line, w, h, colour=colour, content=words)
                size = p.rng.uniform(0.3, 0.45)
                x = 0.5 + (x - 0.5) * 0.3  # the line spans up to 0.72 of the width when larger
                moved = (x, y + float(np.abs(move).max()) * (1 if y < 0.5 else -1))  # up or down: the line is wide
                alt, px = _other_words(p, titles[-2 - 2 * m % len(titles)], words, size * w)
                other = [("words", p.text_line(w, h, bg0, (x, y), size, colour=colour, content=alt, px=px))]
            pictures = [("original", draw(bg0, (x, y), size)), ("larger", draw(bg0, (x, y), size * scale)),
                        ("moved", draw(bg0, moved, size)), ("tint", draw(bg1, (x, y), size)), *other]
        for j, (how, img) in enumerate(pictures):
            pic = f"{fam}_{j}"
            if j:
                lookalikes.append((f"{fam}_0", pic, how))
            fmt = p.g.choice(("jpg", "jpg", "webp", "png"))
            copies_ = [("original", _encode(img, fmt, 90), fmt), *_near_duplicates(p, img, fmt, copies)]
            for c, (transform, data, enc) in enumerate(copies_):
                items.append(EvalItem(f"{pic}_{c}", pic, fam, kind, transform, data, enc))
    return DedupEvalSet(items, lookalikes)


def score(items: list[EvalItem], group_of: dict[str, str]) -> dict[str, Any]:
    """Recall over near-duplicate pairs and false merges for a grouping ``item id -> group`` (absent =
    alone). ``merged_pictures`` counts pictures sharing a group with another picture."""
    by_picture: dict[str, list[str]] = {}
    for it in items:
        by_picture.setdefault(it.picture, []).append(it.id)
    pairs = found = 0
    missed: list[str] = []
    for ids in by_picture.values():
        for a, b in itertools.combinations(ids, 2):
            pairs += 1
            if group_of.get(a) is not None and group_of.get(a) == group_of.get(b):
                found += 1
            else:
                missed.append(f"{a}~{b}")
    pictures_in_group: dict[str, set[str]] = {}
    picture_of = {it.id: it.picture for it in items}
    for iid, g in group_of.items():
        if iid in picture_of:
            pictures_in_group.setdefault(g, set()).add(picture_of[iid])
    merged = sorted({pic for pics in pictures_in_group.values() if len(pics) > 1 for pic in pics})
    members = [len(pics) for pics in pictures_in_group.values()]
    false_pairs = sum(m * (m - 1) // 2 for m in members)
    return {"near_pairs": pairs, "found": found, "recall": found / pairs if pairs else 1.0,
            "false_merge_picture_pairs": false_pairs, "merged_pictures": len(merged),
            "missed": missed, "merged": merged}


def write_dedup_eval(out_dir: str, seed: int = 0, families: int = 16, copies: int = 3,
                     blank_first_caption: bool = False) -> DedupEvalSet:
    """Write the set as a COYO source (``coyo/part-00000.parquet``: id, url, text, image) and
    ``ground_truth.json`` (item -> picture, family, kind, transform; look-alike pairs).

    ``blank_first_caption``: the smallest id of every picture (its original) gets an empty caption, the
    case where a keeper chosen by id alone would be refused by the writer and the picture would vanish.
    """
    ev = make_dedup_eval(seed, families, copies)
    root = Path(out_dir)
    (root / "coyo").mkdir(parents=True, exist_ok=True)
    table = pa.table({
        "id": [it.id for it in ev.items],
        "url": [f"https://eval.example/{it.id}.{it.fmt}" for it in ev.items],
        "text": ["" if blank_first_caption and it.transform == "original" else f"{it.kind} picture {it.picture}"
                 for it in ev.items],
        "image": [it.data for it in ev.items],
    })
    pq.write_table(table, root / "coyo" / "part-00000.parquet")
    truth = {"seed": seed, "items": {it.id: {"picture": it.picture, "family": it.family, "kind": it.kind,
                                             "transform": it.transform, "format": it.fmt} for it in ev.items},
             "lookalikes": [list(x) for x in ev.lookalikes]}
    (root / "ground_truth.json").write_text(json.dumps(truth, indent=1, sort_keys=True))
    return ev


def eval_table(ev: DedupEvalSet) -> pa.Table:
    """The set as PAIR_SCHEMA rows after normalize (pHash, sha256, size and dedup's thumbnail from the same
    decode, as a curation with dedup computes them), keyed by item id."""
    from vila2_curate.curation.normalize import probe_image
    from vila2_curate.schemas.config import NormalizeConfig
    from vila2_curate.schemas.rows import PAIR_SCHEMA, make_table

    cfg = NormalizeConfig()
    rows = []
    for it in ev.items:
        im = probe_image(it.data, cfg, thumbnail=True)
        rows.append({"key": it.id, "source": "eval", "shard": "0", "url": f"https://eval.example/{it.id}",
                     "text": f"{it.kind} picture", "image": im.data, "image_format": im.fmt, "sha256": im.sha256,
                     "phash": im.phash, "thumb": im.thumb, "width": im.width, "height": im.height})
    return make_table(rows, PAIR_SCHEMA)


def dedup_groups(table: pa.Table, cfg: Any = None) -> dict[str, str]:
    """item id -> dedup group id from DedupStage's decisions (items in no group are absent)."""
    from vila2_curate.curation.dedup import DedupStage

    stage = DedupStage(cfg)
    return groups_of(stage.decide(stage.signatures(table)))


def groups_of(decisions: pa.Table) -> dict[str, str]:
    """item id -> image group id of dedup decision rows."""
    return {k: g for k, g in zip(decisions.column("key").to_pylist(), decisions.column("group").to_pylist(),
                                 strict=True) if g and g.startswith("image:")}


def phash_baseline_groups(ev: DedupEvalSet, max_distance: int) -> dict[str, str]:
    """item id -> group under plain ``imagehash.phash`` (full decode) Hamming <= k joined by union-find:
    the comparison baseline."""
    import imagehash

    from vila2_curate.curation.dedup.phash import brute_force_pairs
    from vila2_curate.curation.dedup.unionfind import UnionFind

    hashes = np.asarray([int(str(imagehash.phash(Image.open(io.BytesIO(it.data)))), 16) for it in ev.items],
                        dtype=np.uint64)
    uf = UnionFind()
    for a, b in brute_force_pairs(hashes, max_distance).tolist():
        uf.union(a, b)
    return {ev.items[m].id: f"g{g[0]}" for g in uf.groups() for m in g}
