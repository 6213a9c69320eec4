"""Seeded pictures and their captions for the sample dataset: shapes, sign text and photo-like textures.

Every draw goes through one numpy Generator (``PictureGenerator.rng``), so one seed gives the same pictures
byte for byte; the sample's item factories and the dedup evaluation set (dedup_eval.py) both draw from it.
The encoders here (JPEG, PNG, pHash) are the ones every source writer uses, so bytes stay the same everywhere.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

TEXT_FONT_SIZE = 52  # upper-case glyphs ~38 px tall: comfortably OCR-readable

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 35), "green": (30, 160, 60), "blue": (30, 70, 210), "yellow": (240, 205, 20),
    "orange": (245, 130, 20), "purple": (130, 40, 170), "black": (15, 15, 15), "cyan": (20, 190, 210),
}
_SHAPES = ("rectangle", "ellipse", "triangle")
WORDS = (
    "OPEN", "SALE", "COFFEE", "FRESH", "BREAD", "PARKING", "EXIT", "HOTEL", "MARKET", "GARDEN", "WELCOME",
    "DAILY", "SPECIAL", "BOOKS", "MUSIC", "PIZZA", "CITY", "PARK", "SUMMER", "WINTER", "NEWS", "TICKETS",
    "STATION", "LIBRARY", "BAKERY", "FLOWERS", "MUSEUM", "PHARMACY",
)
_PHOTO_SUBJECTS = (
    "sunset over the hills", "autumn forest path", "calm lake at dawn", "city skyline at night",
    "sandy beach with waves", "field of wildflowers", "snowy mountain peak", "foggy morning in the valley",
    "old stone bridge", "desert dunes under a clear sky", "rainy street with reflections",
    "lavender field in summer",
)
_PHOTO_STYLES = ("", "Beautiful ", "Scenic view of a ", "Photo of a ", "Landscape: ", "HD wallpaper - ")


def encode_jpeg(img: Image.Image, quality: int = 90, exif: bytes | None = None) -> bytes:
    """PIL JPEG bytes of ``img`` (as RGB) at ``quality``, with ``exif`` when given."""
    buf = io.BytesIO()
    kw: dict[str, Any] = {"quality": quality}
    if exif is not None:
        kw["exif"] = exif
    img.convert("RGB").save(buf, "JPEG", **kw)
    return buf.getvalue()


def encode_png(img: Image.Image) -> bytes:
    """PIL PNG bytes of ``img``."""
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def phash_hex(img: Image.Image) -> str:
    """imagehash.phash's algorithm (32x32 grey, 2-D DCT-II, 8x8 low band > median) in numpy, hex string."""
    a = np.asarray(img.convert("L").resize((32, 32), Image.Resampling.LANCZOS), dtype=np.float64)
    k = np.arange(32)
    m = np.cos(np.pi * (2 * k[None, :] + 1) * k[:, None] / 64.0)
    low = (m @ a @ m.T)[:8, :8]
    bits = (low > np.median(low)).flatten()
    return f"{int(''.join('1' if b else '0' for b in bits), 2):016x}"


class PictureGenerator:
    """Seeded image and caption generator; every random draw goes through one numpy Generator."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self._font: ImageFont.FreeTypeFont | ImageFont.ImageFont | None = None

    def randint(self, lo: int, hi: int) -> int:
        """Inclusive on both ends."""
        return int(self.rng.integers(lo, hi + 1))

    def choice(self, seq: Any) -> Any:
        return seq[int(self.rng.integers(0, len(seq)))]

    def size(self) -> tuple[int, int]:
        return self.randint(256, 640), self.randint(256, 640)

    # -- backgrounds -------------------------------------------------------------------------------
    def background(self, w: int, h: int, style: str) -> tuple[Image.Image, str]:
        if style == "plain":
            c = tuple(int(v) for v in self.rng.integers(225, 256, size=3))
            return Image.new("RGB", (w, h), c), "plain"
        if style == "noisy":
            base = self.rng.integers(215, 245)
            noise = 8.0 * self.rng.standard_normal(size=(h, w, 3), dtype=np.float32)
            arr = np.clip(base + noise, 0, 255).astype(np.uint8)
            return Image.fromarray(arr, "RGB"), "noisy"
        c0 = self.rng.integers(200, 256, size=3).astype(np.float32)
        c1 = self.rng.integers(200, 256, size=3).astype(np.float32)
        t = np.linspace(0.0, 1.0, w, dtype=np.float32)[None, :, None]
        arr = np.broadcast_to(c0 * (1 - t) + c1 * t, (h, w, 3))
        return Image.fromarray(arr.astype(np.uint8), "RGB"), "gradient"

    # -- content kinds -------------------------------------------------------------------------------
    def shapes(self, w: int | None = None, h: int | None = None, n: int | None = None,
               bg: str | None = None) -> tuple[Image.Image, list[dict[str, Any]], str]:
        """Coloured shapes at known, non-overlapping boxes; box = [xmin, ymin, xmax, ymax), pixels."""
        if w is None or h is None:
            w, h = self.size()
        img, bg_name = self.background(w, h, bg or self.choice(("plain", "noisy", "gradient")))
        draw = ImageDraw.Draw(img)
        n = n or self.randint(1, 3)
        shapes: list[dict[str, Any]] = []
        for _ in range(n):
            for _attempt in range(30):
                bw = self.randint(int(w * 0.18), int(w * 0.4))
                bh = self.randint(int(h * 0.18), int(h * 0.4))
                x0, y0 = self.randint(4, w - bw - 4), self.randint(4, h - bh - 4)
                box = [x0, y0, x0 + bw, y0 + bh]
                if all(box[2] <= s["box"][0] or s["box"][2] <= box[0] or box[3] <= s["box"][1]
                       or s["box"][3] <= box[1] for s in shapes):
                    break
            else:
                continue
            label = self.choice(_SHAPES)
            color = self.choice([c for c in COLORS if c not in {s["color"] for s in shapes}])
            self.draw_shape(draw, label, box, COLORS[color])
            shapes.append(self.shape_record(label, color, box, w, h))
        names = [f"{s['color']} {s['label']}" for s in shapes]
        joined = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
        article = "An" if joined[0] in "aeiou" else "A"
        caption = self.choice((
            f"{article} {joined} on a {bg_name} background",
            f"Simple geometric illustration: {joined}",
            f"{article} {joined}, flat vector clipart",
        ))
        return img, shapes, caption

    @staticmethod
    def draw_shape(draw: ImageDraw.ImageDraw, label: str, box: list[int], rgb: tuple[int, int, int]) -> None:
        """Fill ``label`` (rectangle, ellipse or triangle) inside the half-open ``box``."""
        x0, y0, x1, y1 = box
        if label == "rectangle":
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=rgb)
        elif label == "ellipse":
            draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=rgb)
        else:
            draw.polygon([(x0, y1 - 1), ((x0 + x1 - 1) / 2, y0), (x1 - 1, y1 - 1)], fill=rgb)

    @staticmethod
    def shape_record(label: str, color: str, box: list[int], w: int, h: int) -> dict[str, Any]:
        """The ground-truth entry of one drawn shape: label, colour, pixel box and box normalised to w, h."""
        return {"label": label, "color": color, "rgb": list(COLORS[color]), "box": box,
                "box_norm": [round(box[0] / w, 6), round(box[1] / h, 6), round(box[2] / w, 6),
                             round(box[3] / h, 6)]}

    def font(self) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
        if self._font is None:
            self._font = ImageFont.load_default(size=TEXT_FONT_SIZE)  # DejaVu-like Aileron via FreeType
        return self._font

    def text(self) -> tuple[Image.Image, list[dict[str, Any]], str]:
        """Several lines of large dark upper-case words on a light background; per-word boxes recorded."""
        font = self.font()
        n_lines = self.randint(2, 3)
        lines = [[self.choice(WORDS) for _ in range(self.randint(1, 2))] for _ in range(n_lines)]
        space = font.getlength(" ")
        line_w = [sum(font.getlength(wd) for wd in ln) + space * (len(ln) - 1) for ln in lines]
        margin, line_h = 40, int(TEXT_FONT_SIZE * 1.5)
        w = max(320, int(max(line_w)) + 2 * margin)
        h = max(256, n_lines * line_h + 2 * margin, int(w / 2.5) + 1)
        bg = tuple(int(v) for v in self.rng.integers(235, 256, size=3))
        fg = tuple(int(v) for v in self.rng.integers(0, 50, size=3))
        img = Image.new("RGB", (w, h), bg)
        draw = ImageDraw.Draw(img)
        words: list[dict[str, Any]] = []
        y = (h - n_lines * line_h) // 2
        for ln, lw in zip(lines, line_w, strict=True):
            x = (w - lw) / 2
            for wd in ln:
                draw.text((x, y), wd, font=font, fill=fg)
                bb = [int(v) for v in draw.textbbox((x, y), wd, font=font)]
                words.append({"text": wd, "box": bb, "height": bb[3] - bb[1]})
                x += font.getlength(wd) + space
            y += line_h
        phrase = " ".join(" ".join(ln) for ln in lines)
        caption = self.choice((f"{phrase.title()} sign", f"A sign that says {phrase.lower()}",
                               f"Shop front lettering: {phrase.title()}"))
        return img, words, caption

    def photo(self, w: int | None = None, h: int | None = None) -> tuple[Image.Image, str]:
        """Smooth random texture (upsampled coarse noise + gradient + grain) so pHash bits are informative."""
        if w is None or h is None:
            w, h = self.size()
        gh, gw = self.randint(3, 7), self.randint(3, 7)
        coarse = Image.fromarray(self.rng.integers(0, 256, size=(gh, gw, 3)).astype(np.uint8), "RGB")
        arr = np.asarray(coarse.resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32)
        tint = self.rng.uniform(-40, 40, size=3).astype(np.float32)
        ramp = np.linspace(-1.0, 1.0, h, dtype=np.float32)[:, None, None]
        arr = arr + ramp * tint + 4.0 * self.rng.standard_normal(size=(h, w, 3), dtype=np.float32)
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
        return img, f"{self.choice(_PHOTO_STYLES)}{self.choice(_PHOTO_SUBJECTS)}".strip().capitalize()
