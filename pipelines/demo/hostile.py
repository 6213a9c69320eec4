"""Broken records of the sample dataset: hostile captions and payloads curation must refuse or repair.

Each is a case real crawls produce, recorded in the ground truth with the outcome curation must reach:
truncated and random-byte JPEGs, empty payloads, a decompression bomb, missing files, failed downloads,
a cp1252 caption, a dotted (re-packed) tar key, an out-of-range MMC4 text index, and captions with control
characters, invisible characters, special tokens, mojibake, replacement characters or SEO-length text.
"""

from __future__ import annotations

import functools
import struct
import zlib

import numpy as np

from vila2_curate.pipelines.demo.items import ItemFactory, SampleItem
from vila2_curate.pipelines.demo.pictures import PictureGenerator, encode_jpeg

BOMB_SIDE = 30_000  # 900 Mpx declared: > 2x PIL's MAX_IMAGE_PIXELS, so Image.open raises

# Hostile captions as crawls deliver them; each kind's text cleans back to ``caption_intended``
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


def truncated_jpeg_item(g: PictureGenerator) -> SampleItem:
    """A JPEG cut at 60%: the header parses, decoding fails part-way (kept by --skip_reencode)."""
    img, cap = g.photo()
    data = encode_jpeg(img, 90)
    return SampleItem("truncated_jpeg", data[: len(data) * 6 // 10], cap, expected="corrupt",
                      width=img.width, height=img.height, notes="first 60% of a valid JPEG; header parses")


def corrupt_bytes_item(g: PictureGenerator) -> SampleItem:
    """JPEG magic then random bytes: sniffs as a JPEG, never decodes."""
    junk = bytes(g.rng.integers(0, 256, size=4096, dtype=np.uint8))
    return SampleItem("corrupt_bytes", b"\xff\xd8\xff\xe0" + junk, "Image of a red car parked outside",
                      expected="corrupt", notes="JPEG magic followed by random bytes")


def zero_byte_item() -> SampleItem:
    """An empty payload, as a failed write or an empty HTTP body leaves it."""
    return SampleItem("zero_bytes", b"", "Wedding photography in the park", expected="corrupt",
                      notes="empty payload")


def bomb_item() -> SampleItem:
    """A small PNG declaring more pixels than PIL will open: must be refused before decoding."""
    return SampleItem("bomb", _bomb_png(), "Huge black poster background", expected="bomb", fmt="png",
                      width=BOMB_SIDE, height=BOMB_SIDE,
                      notes=f"valid 1-bit PNG declaring {BOMB_SIDE}x{BOMB_SIDE}; "
                            "exceeds PIL MAX_IMAGE_PIXELS")


def missing_file_item(caption: str, notes: str) -> SampleItem:
    """A row whose image file is absent (COYO image_path, MMC4 image_name)."""
    return SampleItem("missing_file", None, caption, expected="missing_image", notes=notes)


def failed_fetch(g: PictureGenerator, kind: str, message: str) -> tuple[SampleItem, str]:
    """An img2dataset row that failed (``kind`` failed_to_download or failed_to_resize, with its error
    message): only its caption is kept; the picture drawn for it is discarded."""
    img, cap = g.photo(64, 64)
    return SampleItem(kind, None, cap, expected=kind, fmt="jpg"), f"{kind}:{message}"


def not_utf8_item(make: ItemFactory) -> SampleItem:
    """A photo whose .txt caption is cp1252 (a user re-pack); parquet and json keep the intended text."""
    it = make.photo_item()
    it.caption = "Café au lait on a wooden table"
    it.caption_bytes = it.caption.encode("cp1252")
    it.kind, it.expected = "not_utf8_caption", "not_utf8"
    it.notes = ".txt member is cp1252, not UTF-8 (parquet/json hold the intended text)"
    return it


def dotted_key_item(make: ItemFactory) -> SampleItem:
    """A shape re-packed under key ``<key>.v2``: the img2dataset writer appends the suffix."""
    it = make.shape_item()
    it.kind = "dotted_key"
    it.notes = "members <key>.v2.jpg/.json/.txt: split at the first dot the key would be lost"
    return it


def bad_matched_index_item(make: ItemFactory) -> SampleItem:
    """An MMC4 image whose matched_text_index points past the document's last sentence."""
    it = make.shape_item()
    it.expected, it.kind = "matched_text_index_out_of_range", "bad_matched_index"
    return it
