"""Offline sample dataset in the three real source layouts, with a ground truth of what curation must do.

``write_sample(out_dir)`` draws every image with PIL (no downloads) and writes, under ``out_dir``::

    img2dataset/00000.tar .parquet _stats.json, 00001.*   as ``img2dataset --output_format webdataset
                                                           --resize_mode no --skip_reencode True
                                                           --save_additional_columns '["similarity","NSFW",
                                                           "LICENSE"]' --caption_col TEXT`` writes them
    coyo/part-00000.parquet                               COYO-700M columns + ``image`` (encoded bytes)
    coyo/part-00001.parquet, coyo/images/*                COYO-700M columns + ``image_path`` (relative to coyo/)
    mmc4/docs_shard_00000_v2.jsonl, ..._00001_v2.jsonl.gz MMC4 documents; images beside them by image_name
    ground_truth.json                                     per (source, key): kind, expected outcome, groups...

Why synthetic but faithful: tests and the README quickstart need a dataset that exercises every reader,
every drop reason and every dedup path without network access, and whose right answers are known.

Real-format details reproduced (img2dataset ``writer.py``/``downloader.py``/``logger.py``, webdataset
``TarWriter``, MMC4 README, COYO-700M card):

- tar members are written like ``webdataset.TarWriter``: ``tarfile`` stream mode ``"w|"`` in the default
  (PAX) format, extensions in sorted order (``jpg``, ``json``, ``txt``), mode 0o444, user/group
  ``bigdata``; img2dataset leaves ``mtime`` at ``time.time()``, a float, so every member is preceded by a
  pax extended header holding the exact mtime (we use fixed floats to stay byte-deterministic).
- keys are ``compute_key``: ``10**oom_sample_per_shard * shard_id + index`` zero-padded to
  ``oom_sample_per_shard + oom_shard_count`` digits (4 + 5 = 9 with 10000 samples per shard).
- the parquet holds every row (failures too); its schema is the input columns in the order
  ``save_additional_columns + [caption, url]``, then ``key, status, error_message, width, height,
  original_width, original_height`` (+ ``exif`` with extract_exif, + ``sha256`` with compute_hash);
  failed rows have null width/height/exif/sha256. Rows are in download-completion order (not sorted).
- the tar ``.json`` is ``json.dumps(meta, indent=4)`` of the same row (it repeats ``caption``), the
  ``.txt`` is the caption; failed rows are only in the parquet.
- ``_stats.json``: count, successes, failed_to_download, failed_to_resize, duration, start_time,
  end_time, status_dict (a counter of "success" and of each error message).

Deliberate departures, each a case that real data produces by other routes, recorded in ground truth:
a truncated JPEG in a tar (``--skip_reencode`` keeps bytes cv2 can still half-decode), a ``.txt`` in
cp1252 instead of UTF-8 (a user re-pack), and one sample re-packed with a version suffix,
``000010030.v2.jpg/.json/.txt`` with ``"key": "000010030.v2"`` in json and parquet (COYO ids are int64
and MMC4 has no keys, so the tar is the only place a dotted key can honestly appear; a reader that
splits at the first dot sees key ``000010030`` with extensions ``v2.jpg``..., one that takes the last
known suffix recovers ``000010030.v2`` and must rewrite it to a safe key).

Text is as distinct as the web's: MMC4 documents are 3-12 sentences from a combinatorial grammar (unrelated
documents share < 0.3 of their word trigrams, in practice < 0.1), and pair captions are made distinct
(trigram Jaccard < CAPTION_MAX_JACCARD) except where the ground truth says they repeat: copies of one
picture (``exact_groups``, ``near_groups``) and the boilerplate caption. The only near-duplicate documents
are DOC_NEAR_GROUPS planted re-crawls (``doc_near_groups``: an original and its AMP copy with one number
edited and one sentence added, trigram Jaccard ~0.85-0.9; each document's ``doc_near_group`` names its
group). Text draws use their own seeded stream, so they do not move image bytes.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import json
import re
import struct
import tarfile
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageEnhance, ImageFont

SOURCES = ("img2dataset", "coyo_bytes", "coyo_paths", "mmc4")
BOILERPLATE_CAPTION = "Stock photo - image may contain: outdoor"
# Hostile captions as crawls deliver them (issue 10); each kind's text cleans back to ``caption_intended``
# (recorded in the ground truth) under caption hygiene. Applied to a few plain items, after their caption
# is settled, so no other caption or image of the sample changes.
HOSTILE_KINDS = ("control_chars", "invisible_chars", "special_tokens", "mojibake", "replacement_char",
                 "long_caption")
_LONG_FILLER = "Detail {i}: the listing repeats its product description for search engines."


def hostile_caption(kind: str, caption: str) -> tuple[str, str]:
    """(the caption as stored in the sample, what a clean caption of it is)."""
    if kind == "control_chars":  # NUL, BEL and ESC between words, DEL at the end, a tab
        return caption.replace(" ", " \x00\x07\x1b ", 1).replace(" ", "\t", 1) + "\x7f", caption
    if kind == "invisible_chars":  # BOM, a right-to-left override, a zero-width space inside a word
        return "\ufeff\u202e" + caption[:3] + "\u200b" + caption[3:] + "\u2069", caption
    if kind == "special_tokens":  # VILA's image token and a chat token
        return f"<image> {caption} <|endoftext|>", caption
    if kind == "mojibake":  # UTF-8 bytes decoded as Windows-1252 somewhere upstream
        intended = f"{caption} \u2014 café crème"
        return intended.encode("utf-8").decode("cp1252"), intended
    if kind == "replacement_char":  # bytes lost before we got them: flagged, the U+FFFD removed
        return f"{caption} \ufffd\ufffd", caption
    if kind == "long_caption":  # SEO alt-text over 5,000 characters
        filler = " ".join(_LONG_FILLER.format(i=i) for i in range(80))
        return f"{caption}. {filler}", f"{caption}. {filler}"
    raise ValueError(f"unknown hostile caption kind {kind!r}")
DOC_NEAR_GROUPS = 2  # planted re-crawled MMC4 page pairs (the only near-duplicate documents)
BOMB_SIDE = 30_000  # 900 Mpx declared: > 2x PIL's MAX_IMAGE_PIXELS, so Image.open raises
TEXT_FONT_SIZE = 52  # upper-case glyphs ~38 px tall: comfortably OCR-readable

_COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 35), "green": (30, 160, 60), "blue": (30, 70, 210), "yellow": (240, 205, 20),
    "orange": (245, 130, 20), "purple": (130, 40, 170), "black": (15, 15, 15), "cyan": (20, 190, 210),
}
_SHAPES = ("rectangle", "ellipse", "triangle")
_WORDS = (
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
_LAION_LICENSES = ("?", "?", "?", "cc-by", "cc-by-sa")
_DOWNLOAD_ERRORS = (
    "HTTP Error 404: Not Found",
    "<urlopen error [Errno -2] Name or service not known>",
    "The read operation timed out",
    "HTTP Error 403: Forbidden",
)
# Documents: every sentence is drawn from a combinatorial grammar (topic vocabulary x shared slots), so two
# unrelated documents share almost no word trigrams, as distinct web pages do; see _Text.
_DOC_TOPICS: dict[str, dict[str, tuple[str, ...]]] = {
    "baking": {
        "nouns": ("sourdough loaf", "rye starter", "pie crust", "focaccia", "brioche dough", "lemon tart",
                  "cinnamon roll", "baguette", "banana bread", "shortbread", "croissant", "bagel"),
        "verbs": ("knead/kneaded", "proof/proofed", "bake/baked", "fold/folded", "glaze/glazed",
                  "shape/shaped", "score/scored", "chill/chilled"),
        "adjs": ("golden", "crusty", "airy", "buttery", "dense", "flaky", "tangy", "sticky"),
    },
    "travel": {
        "nouns": ("harbour walk", "night train", "hostel", "ferry crossing", "old quarter", "cable car",
                  "street market", "mountain pass", "river cruise", "cathedral tower", "museum pass",
                  "coastal road"),
        "verbs": ("visit/visited", "explore/explored", "book/booked", "cross/crossed", "photograph/photographed",
                  "skip/skipped", "recommend/recommended", "revisit/revisited"),
        "adjs": ("crowded", "quiet", "charming", "pricey", "windy", "sunlit", "remote", "lively"),
    },
    "garden": {
        "nouns": ("tomato bed", "herb spiral", "compost heap", "rose hedge", "bean trellis", "potato patch",
                  "apple tree", "pond liner", "strawberry row", "greenhouse", "lavender border", "seed tray"),
        "verbs": ("prune/pruned", "water/watered", "mulch/mulched", "sow/sowed", "harvest/harvested",
                  "repot/repotted", "weed/weeded", "fertilise/fertilised"),
        "adjs": ("leafy", "shaded", "waterlogged", "sunny", "overgrown", "fragrant", "sheltered", "sandy"),
    },
    "design": {
        "nouns": ("poster grid", "logo sketch", "colour palette", "type specimen", "landing page",
                  "brand guide", "icon set", "book cover", "mood board", "wireframe", "letterhead", "zine layout"),
        "verbs": ("sketch/sketched", "refine/refined", "print/printed", "crop/cropped", "align/aligned",
                  "review/reviewed", "iterate/iterated", "export/exported"),
        "adjs": ("minimal", "bold", "playful", "cluttered", "elegant", "muted", "geometric", "retro"),
    },
    "cycling": {
        "nouns": ("gravel bike", "chain ring", "climb", "saddle bag", "tubeless tyre", "descent",
                  "rain jacket", "bike path", "brake pad", "group ride", "headwind", "gear cable"),
        "verbs": ("ride/rode", "climb/climbed", "service/serviced", "patch/patched", "tune/tuned",
                  "race/raced", "pack/packed", "replace/replaced"),
        "adjs": ("muddy", "steep", "smooth", "punishing", "scenic", "gusty", "fast", "rough"),
    },
    "photography": {
        "nouns": ("prime lens", "tripod", "light meter", "film roll", "long exposure", "portrait session",
                  "darkroom print", "golden hour", "street scene", "flash unit", "contact sheet", "viewfinder"),
        "verbs": ("shoot/shot", "develop/developed", "frame/framed", "meter/metered", "edit/edited",
                  "scan/scanned", "expose/exposed", "test/tested"),
        "adjs": ("grainy", "sharp", "overexposed", "moody", "contrasty", "soft", "vivid", "washed-out"),
    },
}
_NAMES = ("Amira", "Bruno", "Chen", "Dana", "Emeka", "Freya", "Goran", "Hana", "Ivo", "Jules", "Kofi", "Lena",
          "Mateo", "Nadia", "Oskar", "Priya", "Quinn", "Rosa", "Sami", "Tove", "Ugo", "Vera", "Wim", "Yusuf",
          "Zofia", "Ines", "Marek", "Aiko", "Tariq", "Elsa")
_PLACES = ("Porto", "Ghent", "Kraków", "Lyon", "Bergen", "Trieste", "Bilbao", "Tallinn", "Malmö", "Graz",
           "Cork", "Utrecht", "Brno", "Nantes", "Aarhus", "Split", "Bologna", "Leipzig", "Sintra", "Zadar",
           "Lucerne", "Ljubljana", "Turku", "Girona", "Innsbruck", "Plovdiv", "Galway", "Freiburg")
_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December")
_UNITS = ("minutes", "hours", "days", "weeks")
_SHOPS = ("hardware store", "corner bakery", "flea market", "bookshop", "farm stall", "camera shop",
          "bike shop", "co-op")
_STREETS = ("Elm", "Harbour", "Mill", "Chapel", "Orchard", "Station", "Bridge", "Market", "Linden", "Quarry")
_ADVS = ("slightly", "far", "noticeably", "a little", "much", "somewhat")
_ADJ2 = ("worth it", "tricky", "surprisingly easy", "rewarding", "exhausting", "a bargain", "disappointing",
         "better than expected")
_SEASONS = ("spring", "summer", "autumn", "winter")
_TRANSPORT = ("bus", "train", "bike", "car", "ferry", "tram")
_ORDINALS = ("first", "second", "third", "fourth", "fifth")
_SENTENCES = (
    "{name} {ved} the {adj} {noun} in {place} last {month}.",
    "Last {month} {name} and {name2} {ved} {num} times near {place}.",
    "It took {num} {unit} to {v} the {noun}, which {name} found {adj2}.",
    "{place} is {num} km from {place2}, so {name} went by {transport}.",
    "Our {noun} cost {num} euros at the {shop} on {street} Street.",
    "If you {v} a {noun} in {month}, keep it {adj} for {num} {unit}.",
    "{name} says the {noun} at {place} is {adv} more {adj} than last {season}.",
    "We {ved} {noun2} until it looked {adj}, about {num} {unit} in total.",
    "According to {name}, a {adj} {noun} from {place} is {adj2} in {season}.",
    "The {ordinal} time we {ved} there, the {noun} was {adj} and the {noun2} {adj3}.",
    "Tip {num}: never {v} a {adj} {noun} without asking {name} about the {noun2}.",
    "In {year} {name} {ved} a {noun} for {num} friends from {place}.",
    "The {noun2} at {street} Street stays {adj} until {month}, {name} told us.",
    "Bring a {adj} {noun} if you plan to {v} anything around {place} in {season}.",
    "{name} prefers to {v} the {noun} by hand, which takes {num} {unit} longer.",
    "By {month} {year} the {noun} near {place} had become {adj} again.",
    "{num} readers asked {name} how to {v} a {noun}; the short answer is {adj2}.",
    "On a {adj} {season} morning in {place}, {name2} {ved} the {noun2} twice.",
    "The {shop} in {place} sold out of {noun} kits after {num} {unit}.",
    "Ask {name} whether the {adj3} {noun2} from {place2} was {adj2} in the end.",
)
_PHOTO_DETAILS = (
    ", {place}, {month} {year}", " near {place}", " - photo by {name}, {place2}",
    " seen from {street} Street in {place}", " on a trip to {place} in {season}", " ({place}, {year})",
)
_OTHER_DETAILS = (
    " - uploaded by {name}, {month} {year}", " ({place} collection, {year})", " #{num} in {name}'s set",
    ", item {num} from the {place} archive", " for the {place2} {season} fair",
)
CAPTION_MAX_JACCARD = 0.5  # word-trigram Jaccard any two unrelated pair captions stay below


class _Text:
    """Seeded sentence and caption-detail generator, separate from the image stream so text changes leave
    image bytes alone."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng([seed, 0x7E47])

    def pick(self, seq: Any) -> Any:
        return seq[int(self.rng.integers(0, len(seq)))]

    def _slots(self, topic: str) -> dict[str, str]:
        voc = _DOC_TOPICS[topic]
        verb = self.pick(voc["verbs"]).split("/")
        name, name2 = (str(x) for x in self.rng.choice(_NAMES, size=2, replace=False))
        place, place2 = (str(x) for x in self.rng.choice(_PLACES, size=2, replace=False))
        noun, noun2 = (str(x) for x in self.rng.choice(voc["nouns"], size=2, replace=False))
        adj, adj3 = (str(x) for x in self.rng.choice(voc["adjs"], size=2, replace=False))
        return {"name": name, "name2": name2, "place": place, "place2": place2, "noun": noun, "noun2": noun2,
                "adj": adj, "adj3": adj3, "v": verb[0], "ved": verb[1], "adj2": self.pick(_ADJ2),
                "month": self.pick(_MONTHS), "year": str(int(self.rng.integers(1995, 2024))),
                "num": str(int(self.rng.integers(2, 98))), "unit": self.pick(_UNITS), "shop": self.pick(_SHOPS),
                "street": self.pick(_STREETS), "adv": self.pick(_ADVS), "season": self.pick(_SEASONS),
                "transport": self.pick(_TRANSPORT), "ordinal": self.pick(_ORDINALS)}

    def document(self, topic: str, n_sentences: int) -> list[str]:
        """``n_sentences`` (<= len(_SENTENCES)) sentences on ``topic``, each template at most once: a page
        does not repeat its own phrasing, and shared template words stay a small share of any two pages."""
        out = []
        for t in self.rng.choice(len(_SENTENCES), size=n_sentences, replace=False):
            s = _SENTENCES[int(t)].format(**self._slots(topic))
            out.append(s[0].upper() + s[1:])
        return out

    def edit_number(self, sentence: str) -> str:
        """The sentence with its first number changed: the small edit a re-crawled page typically shows."""
        m = re.search(r"\d+", sentence)
        if m is None:
            return sentence.rstrip(".") + " again."
        old = int(m.group())
        new = old + int(self.rng.integers(1, 9))
        return sentence[:m.start()] + str(new) + sentence[m.end():]

    def caption_detail(self, photo: bool) -> str:
        return self.pick(_PHOTO_DETAILS if photo else _OTHER_DETAILS).format(**self._slots("travel"))


def _shingles(text: str, k: int = 3) -> set[tuple[str, ...]]:
    """Lower-cased word k-shingles, as curation.dedup.minhash builds them (a short text is one shingle)."""
    w = text.lower().split()
    return {tuple(w[i:i + k]) for i in range(max(1, len(w) - k + 1))} if w else set()


def _jaccard(a: set[Any], b: set[Any]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _jpeg(img: Image.Image, quality: int = 90, exif: bytes | None = None) -> bytes:
    buf = io.BytesIO()
    kw: dict[str, Any] = {"quality": quality}
    if exif is not None:
        kw["exif"] = exif
    img.convert("RGB").save(buf, "JPEG", **kw)
    return buf.getvalue()


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _phash_hex(img: Image.Image) -> str:
    """imagehash.phash's algorithm (32x32 grey, 2-D DCT-II, 8x8 low band > median) in numpy, hex string."""
    a = np.asarray(img.convert("L").resize((32, 32), Image.Resampling.LANCZOS), dtype=np.float64)
    k = np.arange(32)
    m = np.cos(np.pi * (2 * k[None, :] + 1) * k[:, None] / 64.0)
    low = (m @ a @ m.T)[:8, :8]
    bits = (low > np.median(low)).flatten()
    return f"{int(''.join('1' if b else '0' for b in bits), 2):016x}"


@functools.lru_cache(maxsize=2)
def _bomb_png(side: int = BOMB_SIDE) -> bytes:
    """A valid 1-bit greyscale PNG of ``side``x``side`` black pixels: ~110 KB on disk, 900 Mpx declared."""
    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed bits
    comp = zlib.compressobj(9)
    block = row * 256
    parts = [comp.compress(block) for _ in range(side // 256)]
    parts += [comp.compress(row * (side % 256)), comp.flush()]

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


class _Gen:
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
            color = self.choice([c for c in _COLORS if c not in {s["color"] for s in shapes}])
            self._draw_shape(draw, label, box, _COLORS[color])
            shapes.append(self._shape_record(label, color, box, w, h))
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
    def _draw_shape(draw: ImageDraw.ImageDraw, label: str, box: list[int], rgb: tuple[int, int, int]) -> None:
        x0, y0, x1, y1 = box
        if label == "rectangle":
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=rgb)
        elif label == "ellipse":
            draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=rgb)
        else:
            draw.polygon([(x0, y1 - 1), ((x0 + x1 - 1) / 2, y0), (x1 - 1, y1 - 1)], fill=rgb)

    @staticmethod
    def _shape_record(label: str, color: str, box: list[int], w: int, h: int) -> dict[str, Any]:
        return {"label": label, "color": color, "rgb": list(_COLORS[color]), "box": box,
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
        lines = [[self.choice(_WORDS) for _ in range(self.randint(1, 2))] for _ in range(n_lines)]
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


class _Item:
    """One image (or its absence) with everything the ground truth says about it."""

    def __init__(self, kind: str, data: bytes | None, caption: str, *, expected: str = "keep",
                 fmt: str = "jpg", width: int | None = None, height: int | None = None,
                 shapes: list[dict[str, Any]] | None = None, words: list[dict[str, Any]] | None = None,
                 boilerplate: bool = False, notes: str = "", phash_img: Image.Image | None = None) -> None:
        self.kind, self.data, self.caption, self.expected, self.fmt = kind, data, caption, expected, fmt
        self.width, self.height, self.shapes, self.words = width, height, shapes, words
        self.boilerplate, self.notes = boilerplate, notes
        self.exact_group: str | None = None
        self.near_group: str | None = None
        self.near_transform: str | None = None
        self.similar_group: str | None = None
        self.phash = _phash_hex(phash_img) if phash_img is not None else None
        self.caption_bytes: bytes | None = None  # set when the stored caption is not UTF-8
        self.caption_final = False  # set once _Sample.settle_caption has made it distinct
        self.hostile: str | None = None  # a HOSTILE_KINDS entry: the stored caption is made hostile
        self.caption_intended: str | None = None

    def copy(self) -> _Item:
        new = _Item.__new__(_Item)
        new.__dict__.update(self.__dict__)
        return new


class _Sample:
    """Builds the item pools, assigns them to sources and writes files plus ground truth."""

    def __init__(self, out: Path, seed: int, scale: int) -> None:
        self.out, self.seed, self.scale = out, seed, max(1, int(scale))
        self.g = _Gen(seed)
        self.records: list[dict[str, Any]] = []
        self.documents: list[dict[str, Any]] = []
        self.t = _Text(seed)
        self._caption_shingles: list[set[tuple[str, ...]]] = []
        self._group_captions: dict[str, str] = {}
        self.doc_near_groups: dict[str, list[dict[str, Any]]] = {}

    # -- item factories ----------------------------------------------------------------------------
    def shape_item(self) -> _Item:
        img, shapes, cap = self.g.shapes()
        return _Item("shape", _jpeg(img, 92), cap, width=img.width, height=img.height, shapes=shapes,
                     phash_img=img)

    def text_item(self) -> _Item:
        img, words, cap = self.g.text()
        return _Item("text", _png(img), cap, fmt="png", width=img.width, height=img.height, words=words,
                     phash_img=img)

    def photo_item(self, boilerplate: bool = False) -> _Item:
        img, cap = self.g.photo()
        return _Item("photo", _jpeg(img, 90), BOILERPLATE_CAPTION if boilerplate else cap,
                     width=img.width, height=img.height, boilerplate=boilerplate, phash_img=img)

    def plain_items(self, n: int) -> list[_Item]:
        out: list[_Item] = []
        for i in range(n):
            r = i % 3
            out.append(self.shape_item() if r == 0 else self.text_item() if r == 1 else self.photo_item())
        return out

    def exact_group(self, gid: str, n: int) -> list[_Item]:
        base = self.photo_item() if gid.endswith("1") else self.shape_item()
        base.exact_group = gid
        return [base.copy() for _ in range(n)]

    def near_group(self, gid: str) -> list[_Item]:
        """Same picture: original, re-encoded q=60, resized 0.9x, cropped 3% (1.5% a side), brightness +5%."""
        img, cap = self.g.photo(self.g.randint(420, 560), self.g.randint(330, 420))
        w, h = img.size
        dx, dy = int(w * 0.015), int(h * 0.015)
        variants = [
            ("original_q90", img, 90),
            ("reencode_q60", img, 60),
            ("resize_0.9x", img.resize((int(w * 0.9), int(h * 0.9)), Image.Resampling.LANCZOS), 90),
            ("crop_3pct", img.crop((dx, dy, w - dx, h - dy)), 90),
            ("brightness_+5pct", ImageEnhance.Brightness(img).enhance(1.05), 90),
        ]
        items = []
        for name, im, q in variants:
            it = _Item("photo", _jpeg(im, q), cap, width=im.width, height=im.height, phash_img=im,
                       notes=f"near-duplicate variant {name}")
            it.near_group, it.near_transform = gid, name
            items.append(it)
        return items

    def similar_pair(self, gid: str, variant: str) -> list[_Item]:
        """Distinct pictures whose pHash collides (flat images): dedup must NOT merge them."""
        w, h = 400, 300
        items = []
        if variant == "flat":
            for color in ("red", "blue"):
                img = Image.new("RGB", (w, h), _COLORS[color])
                it = _Item("flat", _jpeg(img, 92), f"Plain {color} background, solid colour", width=w,
                           height=h, phash_img=img, notes="flat colour; pHash is uninformative")
                it.similar_group = gid
                items.append(it)
        else:
            for label in ("ellipse", "rectangle"):
                img = Image.new("RGB", (w, h), (255, 255, 255))
                box = [140, 90, 260, 210]
                _Gen._draw_shape(ImageDraw.Draw(img), label, box, _COLORS["black"])
                it = _Item("shape", _jpeg(img, 92), f"Black {label} icon on white", width=w, height=h,
                           shapes=[_Gen._shape_record(label, "black", box, w, h)], phash_img=img,
                           notes="simple shape on white; different shape from its pair")
                it.similar_group = gid
                items.append(it)
        return items

    def exif6_item(self) -> _Item:
        """Displayed upright WxH with known shapes; stored rotated 90 CCW with EXIF Orientation=6."""
        img, shapes, cap = self.g.shapes(520, 340, n=2, bg="plain")
        stored = img.transpose(Image.Transpose.ROTATE_90)
        exif = Image.Exif()
        exif[0x0112] = 6
        return _Item("exif_rotated", _jpeg(stored, 92, exif=exif.tobytes()), cap, width=img.width,
                     height=img.height, shapes=shapes, phash_img=img,
                     notes=f"stored {stored.width}x{stored.height} with EXIF Orientation=6; width/height/"
                           "boxes are after exif_transpose")

    def too_small_item(self) -> _Item:
        img, shapes, cap = self.g.shapes(self.g.randint(120, 180), self.g.randint(100, 190), n=1, bg="plain")
        return _Item("too_small", _jpeg(img, 90), cap, expected="too_small", width=img.width,
                     height=img.height, shapes=shapes, phash_img=img)

    def aspect_item(self) -> _Item:
        img, cap = self.g.photo(self.g.randint(900, 1000), self.g.randint(210, 250))
        return _Item("elongated", _jpeg(img, 90), "Panoramic banner " + cap.lower(), expected="aspect",
                     width=img.width, height=img.height, phash_img=img, notes="aspect ratio > 3")

    def truncated_item(self) -> _Item:
        img, cap = self.g.photo()
        data = _jpeg(img, 90)
        return _Item("truncated_jpeg", data[: len(data) * 6 // 10], cap, expected="corrupt",
                     width=img.width, height=img.height, notes="first 60% of a valid JPEG; header parses")

    def corrupt_item(self) -> _Item:
        junk = bytes(self.g.rng.integers(0, 256, size=4096, dtype=np.uint8))
        return _Item("corrupt_bytes", b"\xff\xd8\xff\xe0" + junk, "Image of a red car parked outside",
                     expected="corrupt", notes="JPEG magic followed by random bytes")

    def zero_byte_item(self) -> _Item:
        return _Item("zero_bytes", b"", "Wedding photography in the park", expected="corrupt",
                     notes="empty payload")

    def bomb_item(self) -> _Item:
        return _Item("bomb", _bomb_png(), "Huge black poster background", expected="bomb", fmt="png",
                     width=BOMB_SIDE, height=BOMB_SIDE,
                     notes=f"valid 1-bit PNG declaring {BOMB_SIDE}x{BOMB_SIDE}; exceeds PIL MAX_IMAGE_PIXELS")

    # -- captions ----------------------------------------------------------------------------------
    def settle_caption(self, it: _Item) -> None:
        """Give ``it`` a caption no unrelated pair caption is a near-duplicate of (trigram Jaccard below
        CAPTION_MAX_JACCARD): copies of one picture (exact/near groups) share theirs, the boilerplate is
        repeated on purpose. Small template pools otherwise repeat captions, and a caption repeated on
        ``boilerplate_min_images`` images would be flagged as boilerplate the ground truth never planted."""
        if it.caption_final:
            return
        group = it.exact_group or it.near_group
        if group is not None and group in self._group_captions:
            it.caption, it.caption_final = self._group_captions[group], True
            return
        if it.boilerplate:
            if not any(_jaccard(_shingles(it.caption), s) == 1.0 for s in self._caption_shingles):
                self._caption_shingles.append(_shingles(it.caption))
        else:
            cap = it.caption
            for attempt in range(50):
                sh = _shingles(cap)
                if all(_jaccard(sh, s) < CAPTION_MAX_JACCARD for s in self._caption_shingles):
                    break
                cap = (it.caption if attempt < 25 else cap) + self.t.caption_detail(it.kind == "photo")
            if it.caption_bytes is None:  # a cp1252 caption stays exactly what its bytes say
                it.caption = cap
            self._caption_shingles.append(_shingles(it.caption))
        if group is not None:
            self._group_captions[group] = it.caption
        if it.hostile:
            it.caption, it.caption_intended = hostile_caption(it.hostile, it.caption)
        it.caption_final = True

    # -- recording ---------------------------------------------------------------------------------
    def record(self, source: str, file: str, key: str, it: _Item, **extra: Any) -> None:
        rec: dict[str, Any] = {
            "source": source, "file": file, "key": key, "kind": it.kind, "expected": it.expected,
            "sha256": _sha(it.data) if it.data is not None else None, "format": it.fmt if it.data else None,
            "nbytes": len(it.data) if it.data is not None else None, "width": it.width, "height": it.height,
            "caption": it.caption, "boilerplate": it.boilerplate, "exact_group": it.exact_group,
            "near_group": it.near_group, "near_transform": it.near_transform,
            "similar_group": it.similar_group, "shapes": it.shapes, "words": it.words, "notes": it.notes,
        }
        if it.caption_bytes is not None:
            rec["caption_bytes_hex"] = it.caption_bytes.hex()
        if it.hostile:
            rec["hostile_caption"], rec["caption_intended"] = it.hostile, it.caption_intended
        rec.update(extra)
        self.records.append(rec)

    # -- img2dataset -------------------------------------------------------------------------------
    def write_img2dataset(self, shards: list[list[tuple[_Item, str | None]]]) -> None:
        """``shards[i]`` lists (item, failure) with failure None, "failed_to_download:<msg>" or
        "failed_to_resize:<msg>"; index order is the input order, rows are written shuffled."""
        folder = self.out / "img2dataset"
        folder.mkdir(parents=True, exist_ok=True)
        schema = pa.schema([
            ("similarity", pa.float64()), ("NSFW", pa.string()), ("LICENSE", pa.string()),
            ("caption", pa.string()), ("url", pa.string()), ("key", pa.string()), ("status", pa.string()),
            ("error_message", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
            ("original_width", pa.int32()), ("original_height", pa.int32()), ("exif", pa.string()),
            ("sha256", pa.string()),
        ])
        for shard_id, rows in enumerate(shards):
            name = f"{shard_id:05d}"
            order = [int(i) for i in self.g.rng.permutation(len(rows))]  # imap_unordered completion order
            start = 1_700_000_000.0 + 3600.0 * shard_id + self.seed
            metas, samples, status = [], [], Counter()
            counts = Counter()
            for n, idx in enumerate(order):
                it, failure = rows[idx]
                self.settle_caption(it)
                original = it.data or b""
                if failure is None and it.fmt != "jpg":
                    # --skip_reencode keeps JPEG bytes only: anything else is re-encoded (cv2, quality 95),
                    # while the json sha256 stays the hash of the downloaded original.
                    it = it.copy()
                    it.data, it.fmt = _jpeg(Image.open(io.BytesIO(original)), 95), "jpg"
                    it.notes = (it.notes + "; " if it.notes else "") + "re-encoded PNG -> JPEG by img2dataset"
                key = f"{10**4 * shard_id + idx:09d}"  # compute_key(idx, shard_id, 4, 5)
                if it.kind == "dotted_key":
                    key = f"{key}.v2"
                url = f"https://img.example-{idx % 7}.com/{shard_id}/{idx}/{_sha(it.caption.encode())[:10]}.jpg"
                meta: dict[str, Any] = {
                    "similarity": round(float(self.g.rng.uniform(0.28, 0.4)), 6),
                    "NSFW": self.g.choice(("UNLIKELY", "UNLIKELY", "UNLIKELY", "UNSURE")),
                    "LICENSE": self.g.choice(_LAION_LICENSES), "caption": it.caption, "url": url,
                    "key": key, "status": None, "error_message": None, "width": None, "height": None,
                    "original_width": None, "original_height": None, "exif": None, "sha256": None,
                }
                if failure is not None:
                    st, msg = failure.split(":", 1)
                    meta["status"], meta["error_message"] = st, msg
                    status[msg] += 1
                    counts[st] += 1
                else:
                    w, h = (it.width or 0), (it.height or 0)
                    meta.update(status="success", width=w, height=h, original_width=w, original_height=h,
                                exif="{}", sha256=_sha(original))
                    status["success"] += 1
                    counts["success"] += 1
                    txt: bytes = it.caption_bytes if it.caption_bytes is not None else it.caption.encode()
                    samples.append((key, {"jpg": it.data or b"", "json": json.dumps(meta, indent=4).encode(),
                                          "txt": txt}, start + 0.25 + 0.0137 * n))
                metas.append(meta)
                self.record("img2dataset", f"img2dataset/{name}.tar" if failure is None
                            else f"img2dataset/{name}.parquet", key, it if failure is None else _failed(it, failure),
                            url=url, shard=name, source_sha256=_sha(original) if failure is None else None)
            _write_wds_tar(folder / f"{name}.tar", samples)
            _write_parquet(folder / f"{name}.parquet", metas, schema, row_group_size=100)
            stats = {
                "count": len(rows), "successes": counts["success"],
                "failed_to_download": counts["failed_to_download"],
                "failed_to_resize": counts["failed_to_resize"],
                "duration": 12.5 + shard_id, "start_time": start, "end_time": start + 12.5 + shard_id,
                "status_dict": dict(status),
            }
            (folder / f"{name}_stats.json").write_text(json.dumps(stats, indent=4))

    # -- COYO ----------------------------------------------------------------------------------------
    def write_coyo(self, part: int, items: list[_Item], mode: str) -> None:
        folder = self.out / "coyo"
        (folder / "images").mkdir(parents=True, exist_ok=True)
        source = "coyo_bytes" if mode == "bytes" else "coyo_paths"
        fname = f"part-{part:05d}.parquet"
        cols: dict[str, list[Any]] = {k: [] for k in _COYO_SCHEMA.names}
        extra_col = "image" if mode == "bytes" else "image_path"
        cols[extra_col] = []
        for it in items:
            self.settle_caption(it)
            cid = int(self.g.rng.integers(10**12, 10**13))
            text = it.caption
            words = text.split()
            nw = len(words)
            low = it.boilerplate or it.kind in {"flat", "corrupt_bytes", "zero_bytes", "bomb", "missing_file"}
            meta_w = it.width if it.width is not None else self.g.randint(300, 800)
            meta_h = it.height if it.height is not None else self.g.randint(300, 800)
            row = {
                "id": cid, "url": f"https://cdn.shop-{cid % 13}.net/media/{cid}.jpg", "text": text,
                "width": meta_w, "height": meta_h,
                "image_phash": it.phash or f"{int(self.g.rng.integers(0, 2**63)):016x}",
                "text_length": len(text), "word_count": nw,
                "num_tokens_bert": nw + sum(ch in ",.:-!?'\"" for ch in text) + self.g.randint(0, 2),
                "num_tokens_gpt": nw + sum(ch in ",.:-!?'\"" for ch in text) + self.g.randint(0, 3),
                "num_faces": 0,
                "clip_similarity_vitb32": float(self.g.rng.uniform(0.2, 0.25) if low
                                                else self.g.rng.uniform(0.27, 0.38)),
                "clip_similarity_vitl14": float(self.g.rng.uniform(0.18, 0.23) if low
                                                else self.g.rng.uniform(0.24, 0.34)),
                "nsfw_score_opennsfw2": float(self.g.rng.uniform(0.0, 0.08)),
                "nsfw_score_gantman": float(self.g.rng.uniform(0.0, 0.12)),
                "watermark_score": float(self.g.rng.uniform(0.3, 0.6) if it.boilerplate
                                         else self.g.rng.uniform(0.0, 0.25)),
                "aesthetic_score_laion_v2": float(self.g.rng.uniform(3.8, 6.2)),
            }
            if mode == "bytes":
                row["image"] = it.data
            else:
                ext = "png" if it.fmt == "png" else "jpg"
                rel = f"images/{cid}.{ext}"
                row["image_path"] = rel
                if it.kind != "missing_file":
                    (folder / rel).write_bytes(it.data or b"")
            for k, v in row.items():
                cols[k].append(v)
            self.record(source, f"coyo/{fname}", str(cid), it, coyo_id=cid,
                        image_path=row.get("image_path"), url=row["url"])
        fields = list(_COYO_SCHEMA) + [pa.field(extra_col, pa.binary() if mode == "bytes" else pa.string())]
        _write_parquet(folder / fname, [dict(zip(cols, vals, strict=True)) for vals in zip(*cols.values(),
                       strict=True)], pa.schema(fields), row_group_size=1000)

    # -- MMC4 ----------------------------------------------------------------------------------------
    def plan_documents(self, docs: list[list[_Item]], half: int) -> list[list[dict[str, Any]]]:
        """Text and URL of every document, per shard; plants DOC_NEAR_GROUPS re-crawled page pairs.

        Ordinary documents are 3-12 sentences from the combinatorial grammar (distinct pages). A planted
        pair is an original of 12 sentences and its re-crawl (the AMP copy of the same URL) with one
        number edited and one sentence added: word-trigram Jaccard ~0.85-0.95, what MinHash document dedup
        at 0.8 must catch. Both sides hold ordinary pool images, so image counts do not change.
        """
        topics = sorted(_DOC_TOPICS)
        plans: list[list[dict[str, Any]]] = [[], []]
        for d, images in enumerate(docs):
            shard, line = (0, d) if d < half else (1, d - half)
            topic = self.t.pick(topics)
            n_sent = int(self.t.rng.integers(max(3, len(images)), 13))
            plans[shard].append({
                "images": images, "topic": topic, "text_list": self.t.document(topic, n_sent),
                "url": f"https://www.{topic}-blog-{shard}.example.org/posts/{line}-{topic}.html",
                "doc_near_group": None, "doc_near_role": None,
            })

        def ordinary(plan: dict[str, Any]) -> bool:
            return all(it.kind in {"shape", "text", "photo"} and it.expected == "keep" and not (
                it.exact_group or it.near_group or it.similar_group) for it in plan["images"])

        plain = [[pl for pl in plans[sh] if ordinary(pl)] for sh in (0, 1)]
        for g in range(DOC_NEAR_GROUPS):
            gid = f"doc-near-{g + 1}"
            # group 1: original in the .jsonl, re-crawl in the .jsonl.gz; group 2 the other way round
            orig, dup = (plain[0][g], plain[1][g]) if g % 2 == 0 else (plain[1][g], plain[0][g])
            topic = orig["topic"]
            text = self.t.document(topic, 12)
            edited = [i for i, x in enumerate(text) if re.search(r"\d", x)] or [0]
            i_edit = edited[int(self.t.rng.integers(0, len(edited)))]
            i_add = int(self.t.rng.integers(1, len(text)))
            recrawl = list(text)
            recrawl[i_edit] = self.t.edit_number(recrawl[i_edit])
            extra = min(self.t.document(topic, 6), key=lambda x: (len(x.split()), x))  # a short update note
            recrawl.insert(i_add, extra)
            orig.update(text_list=text, doc_near_group=gid, doc_near_role="original")
            dup.update(topic=topic, text_list=recrawl, url=orig["url"] + "?output=amp",
                       doc_near_group=gid, doc_near_role="recrawl")
        return plans

    def write_mmc4(self, shard: int, plans: list[dict[str, Any]], gz: bool) -> None:
        folder = self.out / "mmc4"
        folder.mkdir(parents=True, exist_ok=True)
        fname = f"docs_shard_{shard:05d}_v2.jsonl" + (".gz" if gz else "")
        lines = []
        for line_no, plan in enumerate(plans):
            images, topic, text_list, doc_url = plan["images"], plan["topic"], plan["text_list"], plan["url"]
            n_sent = len(text_list)
            sim = self.g.rng.uniform(0.12, 0.3, size=(len(images), n_sent))
            image_info, doc_issues = [], []
            for i, it in enumerate(images):
                raw_url = f"https://www.{topic}-blog-{shard}.example.org/wp-content/uploads/{line_no}_{i}.jpg"
                name = hashlib.sha256(raw_url.encode()).hexdigest()[:12] + ".jpg"
                j = int(self.g.rng.integers(0, n_sent))
                sim[i, j] = float(self.g.rng.uniform(0.24, 0.34))
                matched_sim = float(sim[i, j])
                if it.expected == "matched_text_index_out_of_range":
                    j = n_sent + 2
                    doc_issues.append(it.expected)
                if it.kind == "missing_file":
                    doc_issues.append(it.expected)
                else:
                    (folder / name).write_bytes(it.data or b"")
                image_info.append({"image_name": name, "raw_url": raw_url, "matched_text_index": j,
                                   "matched_sim": matched_sim, "face_detections": None})
                self.record("mmc4", f"mmc4/{name}", name, it, doc_file=f"mmc4/{fname}", doc_line=line_no,
                            doc_url=doc_url, image_index=i, matched_text_index=j,
                            caption=text_list[j] if j < n_sent else None)
            could_dup = int(self.g.rng.random() < 0.1)
            doc = {"url": doc_url, "text_list": text_list, "image_info": image_info,
                   "similarity_matrix": [[float(v) for v in r] for r in sim],
                   "could_have_url_duplicate": 1 if plan["doc_near_group"] else could_dup}
            lines.append(json.dumps(doc))
            entry = {"source": "mmc4", "file": f"mmc4/{fname}", "line": line_no, "key": doc_url,
                     "n_images": len(images), "n_sentences": n_sent, "issues": sorted(set(doc_issues)),
                     "image_names": [x["image_name"] for x in image_info],
                     "doc_near_group": plan["doc_near_group"]}
            self.documents.append(entry)
            if plan["doc_near_group"]:
                member = {k: entry[k] for k in ("source", "file", "line", "key")}
                member["role"] = plan["doc_near_role"]
                member["text"] = " ".join(text_list)
                self.doc_near_groups.setdefault(plan["doc_near_group"], []).append(member)
        payload = ("\n".join(lines) + "\n").encode()
        path = folder / fname
        if gz:
            with path.open("wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as f:
                f.write(payload)
        else:
            path.write_bytes(payload)

    # -- orchestration -------------------------------------------------------------------------------
    def build(self) -> dict[str, Any]:
        s = self.scale
        ex1 = self.exact_group("exact-1", 4)  # photo across img2dataset x2, coyo_bytes, mmc4
        ex2 = self.exact_group("exact-2", 3)  # shape across coyo_bytes, coyo_paths, mmc4
        ex3 = self.exact_group("exact-3", 2)  # shape within img2dataset shard 0
        ex4 = self.exact_group("exact-4", 2)  # shape within mmc4 (two image names)
        near = [self.near_group(f"near-{i + 1}") for i in range(2 * s)]
        sim_flat = self.similar_pair("similar-1", "flat")
        sim_shape = self.similar_pair("similar-2", "shapes")

        def bp(n: int) -> list[_Item]:
            return [self.photo_item(boilerplate=True) for _ in range(n)]

        not_utf8 = self.photo_item()
        not_utf8.caption = "Café au lait on a wooden table"
        not_utf8.caption_bytes = not_utf8.caption.encode("cp1252")
        not_utf8.kind, not_utf8.expected = "not_utf8_caption", "not_utf8"
        not_utf8.notes = ".txt member is cp1252, not UTF-8 (parquet/json hold the intended text)"
        dotted = self.shape_item()
        dotted.kind = "dotted_key"
        dotted.notes = "members <key>.v2.jpg/.json/.txt: split at the first dot the key would be lost"

        def failed(kind: str, msg: str) -> tuple[_Item, str]:
            img, cap = self.g.photo(64, 64)
            return _Item(kind, None, cap, expected=kind, fmt="jpg"), f"{kind}:{msg}"

        i2d0: list[tuple[_Item, str | None]] = [(x, None) for x in (
            self.plain_items(22 * s) + bp(3) + [ex1[0], ex3[0], ex3[1], near[0][0], sim_flat[0],
                                                 self.too_small_item(), self.truncated_item()])]
        i2d0 += [failed("failed_to_download", _DOWNLOAD_ERRORS[i % 4]) for i in range(2 * s)]
        for (plain, _), kind in zip(i2d0, HOSTILE_KINDS, strict=False):  # the first entries are plain items
            plain.hostile = kind
        i2d1: list[tuple[_Item, str | None]] = [(x, None) for x in (
            self.plain_items(22 * s) + bp(2) + [ex1[1], near[0][1], sim_flat[1], sim_shape[0],
                                                 self.aspect_item(), not_utf8, dotted])]
        i2d1 += [failed("failed_to_download", _DOWNLOAD_ERRORS[(i + 2) % 4]) for i in range(s)]
        i2d1 += [failed("failed_to_resize", "Image decoding error")]
        for extra_near in near[1:]:
            i2d1.append((extra_near[0], None))

        coyo0 = (self.plain_items(20 * s) + bp(3) + [ex1[2], ex2[0], near[0][2], sim_shape[1], self.exif6_item(),
                                                     self.corrupt_item(), self.zero_byte_item(),
                                                     self.too_small_item()] + [n[1] for n in near[1:]])
        missing = _Item("missing_file", None, "Vintage poster of a seaside town", expected="missing_image",
                        notes="image_path points to a file that does not exist")
        zero_file = self.zero_byte_item()
        coyo1 = (self.plain_items(20 * s) + bp(3) + [ex2[1], near[0][3], self.bomb_item(), zero_file, missing,
                                                     self.aspect_item()] + [n[2] for n in near[1:]])

        mm_pool = self.plain_items(24 * s) + [n[3] for n in near[1:]] + [n[4] for n in near[1:]]
        special = [[ex1[3], near[0][4]], [ex2[2], ex4[0]], [ex4[1]], [self.exif6_item()]]
        miss_img = _Item("missing_file", None, "", expected="missing_image",
                         notes="image_info entry whose image file is absent")
        oor = self.shape_item()
        oor.expected, oor.kind = "matched_text_index_out_of_range", "bad_matched_index"
        special += [[self.shape_item(), miss_img], [oor, self.text_item()]]
        docs: list[list[_Item]] = [list(d) for d in special]
        while mm_pool:
            k = min(len(mm_pool), self.g.randint(1, 3))
            docs.append(mm_pool[:k])
            mm_pool = mm_pool[k:]
        order = [int(i) for i in self.g.rng.permutation(len(docs))]
        docs = [docs[i] for i in order]
        half = len(docs) // 2

        self.write_img2dataset([i2d0, i2d1])
        self.write_coyo(0, coyo0, "bytes")
        self.write_coyo(1, coyo1, "paths")
        plans = self.plan_documents(docs, half)
        self.write_mmc4(0, plans[0], gz=False)
        self.write_mmc4(1, plans[1], gz=True)
        return self.ground_truth()

    def ground_truth(self) -> dict[str, Any]:
        def groups(field: str) -> dict[str, list[dict[str, str]]]:
            out: dict[str, list[dict[str, str]]] = {}
            for r in self.records:
                if r[field]:
                    out.setdefault(r[field], []).append({"source": r["source"], "key": r["key"],
                                                          "sha256": r["sha256"]})
            return dict(sorted(out.items()))

        summary = {
            "rows": len(self.records),
            "rows_per_source": dict(sorted(Counter(r["source"] for r in self.records).items())),
            "by_expected": dict(sorted(Counter(r["expected"] for r in self.records).items())),
            "by_kind": dict(sorted(Counter(r["kind"] for r in self.records).items())),
            "keep": sum(r["expected"] == "keep" for r in self.records),
            "boilerplate_rows": sum(r["boilerplate"] for r in self.records),
            "documents": len(self.documents),
            "documents_with_issues": sum(bool(d["issues"]) for d in self.documents),
            "exact_groups": len(groups("exact_group")),
            "near_groups": len(groups("near_group")),
            "similar_groups": len(groups("similar_group")),
            "doc_near_groups": len(self.doc_near_groups),
        }
        doc_near: dict[str, list[dict[str, Any]]] = {}
        for gid, members in sorted(self.doc_near_groups.items()):
            members = sorted(members, key=lambda m: m["role"] != "original")
            base = _shingles(members[0]["text"])
            doc_near[gid] = [{**{k: v for k, v in m.items() if k != "text"},
                              "jaccard_to_original": round(_jaccard(base, _shingles(m["text"])), 4)}
                             for m in members]
        return {
            "version": 1, "seed": self.seed, "scale": self.scale, "boilerplate_caption": BOILERPLATE_CAPTION,
            "sources": {"img2dataset": "img2dataset/*.tar (+ .parquet, _stats.json)",
                        "coyo_bytes": "coyo/part-00000.parquet (column image)",
                        "coyo_paths": "coyo/part-00001.parquet (column image_path, relative to coyo/)",
                        "mmc4": "mmc4/docs_shard_*_v2.jsonl[.gz], images beside them"},
            "summary": summary,
            "exact_groups": groups("exact_group"), "near_groups": groups("near_group"),
            "similar_groups": groups("similar_group"), "doc_near_groups": doc_near,
            "records": self.records, "documents": self.documents,
        }


def _failed(it: _Item, failure: str) -> _Item:
    """The ground-truth view of a row img2dataset could not fetch: no bytes, no size."""
    out = it.copy()
    out.kind = out.expected = failure.split(":", 1)[0]
    out.data, out.width, out.height = None, None, None
    out.notes = failure.split(":", 1)[1]
    return out


_COYO_SCHEMA = pa.schema([
    ("id", pa.int64()), ("url", pa.string()), ("text", pa.string()), ("width", pa.int32()),
    ("height", pa.int32()), ("image_phash", pa.string()), ("text_length", pa.int32()),
    ("word_count", pa.int32()), ("num_tokens_bert", pa.int32()), ("num_tokens_gpt", pa.int32()),
    ("num_faces", pa.int32()), ("clip_similarity_vitb32", pa.float32()),
    ("clip_similarity_vitl14", pa.float32()), ("nsfw_score_opennsfw2", pa.float32()),
    ("nsfw_score_gantman", pa.float32()), ("watermark_score", pa.float32()),
    ("aesthetic_score_laion_v2", pa.float32()),
])


def _write_parquet(path: Path, rows: list[dict[str, Any]], schema: pa.Schema, row_group_size: int) -> None:
    """Like img2dataset's BufferedParquetWriter: one ParquetWriter, a row group per buffer of rows."""
    with pq.ParquetWriter(str(path), schema) as writer:
        for i in range(0, max(len(rows), 1), row_group_size):
            chunk = rows[i:i + row_group_size]
            writer.write_table(pa.Table.from_pylist(chunk, schema=schema))


def _write_wds_tar(path: Path, samples: list[tuple[str, dict[str, bytes], float]]) -> None:
    """Byte-for-byte what ``webdataset.TarWriter(fileobj).write`` produces (with a given float mtime)."""
    with path.open("wb") as f, tarfile.open(fileobj=f, mode="w|") as tar:
        for key, fields, mtime in samples:
            for ext in sorted(fields):
                data = fields[ext]
                ti = tarfile.TarInfo(f"{key}.{ext}")
                ti.size, ti.mtime, ti.mode, ti.uname, ti.gname = len(data), mtime, 0o444, "bigdata", "bigdata"
                tar.addfile(ti, io.BytesIO(data))


def write_sample(out_dir: str, seed: int = 0, scale: int = 1) -> dict[str, Any]:
    """Write the sample dataset under ``out_dir`` and return its ground truth (also ``ground_truth.json``).

    Same ``seed`` and ``scale`` give byte-identical files; ``scale`` multiplies the ordinary rows and
    near-duplicate groups (the edge cases stay one of each).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    truth = _Sample(out, seed, scale).build()
    (out / "ground_truth.json").write_text(json.dumps(truth, indent=1, ensure_ascii=False) + "\n")
    return truth
