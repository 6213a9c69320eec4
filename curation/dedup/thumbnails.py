"""Small content thumbnails: the second signal that confirms (or rejects) a perceptual candidate pair.

pHash keeps only the signs of low DCT frequencies of a grey image, so flat, low-texture pictures
collide, and it is blind to colour: a green and a grey-green label card, one shape on a cream and on a
grey background, one product in two colours of the same lightness all hash alike. The thumbnail keeps
what pHash drops, in 1480 bytes:

* a 16x16 grey grid (absolute grey levels; pooled to 8x8, with the content box and the mean colour, also
  the key for nearest-neighbour candidates: :func:`knn_key`),
* an 8x8 colour grid in CIE Lab (a perceptual space: a Euclidean distance there, CIE76 delta E, is
  about how different two colours look; ~2.3 is a just-noticeable difference),
* the content box and the background colour (Lab) when the picture sits on a flat background,
* a 32x32 grey detail grid, compared cell by cell when both pictures were cropped to a content box
  of at least 40% of their size (then they are aligned to under a cell; 40-60% boxes at the best
  half-cell shift), or, when a crop cut into one copy's border (no box found there), after aligning the
  whole picture onto the other's box by a small crop search: other words on the same card differ there.

Before shrinking, the picture is cropped to its content box when most of its border is one colour: a
word or a shape on a page then fills the grids, so re-encoded, resized or slightly cropped copies line
up, while the box (where the content sits) and the background colour (what was cropped away) are kept
and compared on their own: a shape moved across the page, or put on another background, is another
picture.

How two thumbnails are compared: ``thumb_match``.
"""

from __future__ import annotations

import io
import itertools
from functools import lru_cache

import numpy as np
from PIL import Image, ImageChops, ImageCms

GREY_SIDE = 16
RGB_SIDE = 8  # side of the colour grid (stored as Lab)
GREY_N = GREY_SIDE * GREY_SIDE
LAB_N = RGB_SIDE * RGB_SIDE * 3
BOX_AT = GREY_N + LAB_N  # 4 bytes: content box x0, y0, x1, y1 as fractions of the side * 255
BG_AT = BOX_AT + 4  # 3 bytes: background Lab; 1 byte: 1 when the picture was cropped to its content
DETAIL_SIDE = 32  # grey detail grid, compared cell by cell when both pictures are aligned by their content box
DETAIL_AT = BG_AT + 4
THUMB_BYTES = DETAIL_AT + DETAIL_SIDE * DETAIL_SIDE  # 256 grey + 192 Lab + 4 box + 4 background + 1024 detail
_WORK_SIDE = 256  # decode size: keeps small text legible for the content box
_BG_MATCH = 12  # max channel difference from the border's median colour that still counts as background
_BG_SHARE = 0.7  # share of border pixels that must match for the border to be a background
_SIDE_SHARE = 0.9  # share of one side's pixels that must match for that side alone to be flat
_SHARP_EDGE = 80  # median max-channel step from the background just inside a content edge
_CONTENT = 32  # max channel difference from the background that makes a pixel content
L_SCALE = 255.0 / 100.0  # Lab L* in [0, 100] stored in a byte


@lru_cache(maxsize=1)
def _srgb_to_lab() -> ImageCms.ImageCmsTransform:
    """littleCMS sRGB -> CIE Lab (D50) transform, built once per process."""
    return ImageCms.buildTransformFromOpenProfiles(ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB"),
                                                   "RGB", "LAB")


def _lab_bytes(img: Image.Image) -> np.ndarray:
    """uint8 (h, w, 3): L* x 2.55, a* + 128, b* + 128 (PIL's LAB mode stores a*, b* as signed bytes)."""
    lab = np.asarray(ImageCms.applyTransform(img, _srgb_to_lab()), dtype=np.uint8)
    out = lab.copy()
    out[..., 1:] = (lab[..., 1:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    return out


def _channel_max(a: np.ndarray) -> np.ndarray:
    """The largest of the three channels (last axis): ``a.max(axis=-1)`` over three contiguous values is
    ~30x slower than two elementwise maxima, and this runs on every pixel of every thumbnail."""
    return np.maximum(np.maximum(a[..., 0], a[..., 1]), a[..., 2])


def _side_pairs(small: np.ndarray) -> list[tuple[np.ndarray, tuple[int, int]]]:
    """(colour, sides) for every two sides that are each flat and of one colour (a crop cut into the
    content on the other sides). Sides: 0 top, 1 bottom, 2 left, 3 right."""
    medians: list[np.ndarray] = []
    flat: list[bool] = []
    for pair in (small[[0, -1]], np.swapaxes(small[:, [0, -1]], 0, 1)):  # top, bottom; left, right
        med = np.median(pair, axis=1)  # one call per two sides: the call overhead is most of the cost
        medians += list(med)
        flat += list((_channel_max(np.abs(pair - med[:, None])) <= _BG_MATCH).mean(axis=1) >= _SIDE_SHARE)
    if sum(flat) < 2:
        return []
    return [((medians[a] + medians[b]) / 2, (a, b)) for a, b in itertools.combinations(range(4), 2)
            if flat[a] and flat[b] and np.abs(medians[a] - medians[b]).max() <= 2 * _BG_MATCH]


def _box(img: Image.Image, bg: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int, int]] | None:
    """(difference from ``bg``, content box) at full resolution (the box must be exact to a pixel for
    the detail grid); rows/columns count with at least two content pixels, so stray noise does not."""
    flat = Image.new("RGB", img.size, tuple(int(v) for v in np.round(bg)))
    diff = _channel_max(np.asarray(ImageChops.difference(img, flat)))
    mask = diff > _CONTENT
    ys, xs = np.flatnonzero(mask.sum(1) >= 2), np.flatnonzero(mask.sum(0) >= 2)
    if not ys.size or not xs.size:
        return None
    return diff, (int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1)


def _sharp_edges(diff: np.ndarray, box: tuple[int, int, int, int], sides: tuple[int, int]) -> bool:
    """Content starts with a sharp step from the background just inside the box on ``sides``."""
    h, w = diff.shape
    x0, y0, x1, y1 = box
    inside = 2  # pixels in from the box edge: past the antialiased edge
    lines = {0: diff[min(y0 + inside, h - 1), x0:x1], 1: diff[max(y1 - 1 - inside, 0), x0:x1],
             2: diff[y0:y1, min(x0 + inside, w - 1)], 3: diff[y0:y1, max(x1 - 1 - inside, 0)]}
    return all(lines[s].size and float(np.median(lines[s])) >= _SHARP_EDGE for s in sides)


def _content_box(img: Image.Image) -> tuple[tuple[int, int, int, int], np.ndarray] | None:
    """(box, background RGB) when the picture sits on a flat background and something else is inside.

    The background is judged on a 2x2-averaged copy, so grain and JPEG noise neither break a flat
    background nor count as content. It is most of the border, or else two sides that are flat and
    alike (a crop cut into the content on the others) where the content then starts with a sharp edge
    (a card's border): the flat side strips of a vignette fade into the picture and are not a
    background (they would be cropped in some copies and not in others).
    """
    small = np.asarray(img.reduce(2), dtype=np.float32)  # 2x2 box average
    border = np.concatenate([small[0], small[-1], small[:, 0], small[:, -1]])
    bg = np.median(border, axis=0)
    if (_channel_max(np.abs(border - bg)) <= _BG_MATCH).mean() >= _BG_SHARE:
        found = _box(img, bg)
        return (found[1], np.round(bg).astype(np.uint8)) if found else None
    for colour, sides in _side_pairs(small):
        found = _box(img, colour)
        if found and _sharp_edges(found[0], found[1], sides):
            return found[1], np.round(colour).astype(np.uint8)
    return None


def open_for_thumbnail(data: bytes) -> Image.Image:
    """``data`` opened (not yet decoded) with the draft :func:`thumbnail` decodes at."""
    img = Image.open(io.BytesIO(data))
    if img.format in ("JPEG", "MPO"):
        img.draft("RGB", (_WORK_SIDE, _WORK_SIDE))  # DCT-domain downscale: 2-8x faster decode
    return img


def thumbnail(data: bytes) -> bytes:
    """The THUMB_BYTES signature of encoded image bytes (see the module docstring for the layout)."""
    return thumbnail_of(open_for_thumbnail(data))


def thumbnail_of_decoded(img: Image.Image) -> bytes | None:
    """:func:`thumbnail_of` an image another step already decoded (normalize's pHash draft, EXIF applied),
    or None when its long side is under the work size (the caller then decodes the bytes itself). Saves
    the second decode, most of a thumbnail's cost; the detector's thresholds hold on such thumbnails
    (benchmarks/bench_dedup_recall.py)."""
    return thumbnail_of(img) if max(img.size) >= _WORK_SIDE else None


def _border_strips(img: Image.Image) -> list[np.ndarray]:
    """The picture's outer ring as ``_content_box`` sees it (2x2 averages), from 2-pixel strips only:
    (top, bottom, left, right), each (n, 3) float32."""
    w, h = img.size
    strips = [img.crop(b).reduce(2) for b in ((0, 0, w, 2), (0, h - 2, w, h), (0, 0, 2, h), (w - 2, 0, w, h))]
    return [np.asarray(s, dtype=np.float32).reshape(-1, 3) for s in strips]


def _border_may_be_flat(img: Image.Image) -> bool:
    """A looser form of ``_content_box``'s background tests, on the decoded picture's own border: False
    for a photo, whose border is texture, which then needs neither the box search nor the work-size
    copy. Looser (twice the colour tolerance, 0.8x the shares) so that every picture the exact test
    would crop still reaches it."""
    if min(img.size) < 4:
        return True
    sides = _border_strips(img)
    border = np.concatenate(sides)
    near = _channel_max(np.abs(border - np.median(border, axis=0))) <= 2 * _BG_MATCH
    if near.mean() >= 0.8 * _BG_SHARE:
        return True
    flat = [(_channel_max(np.abs(s - np.median(s, axis=0))) <= 2 * _BG_MATCH).mean() >= 0.8 * _SIDE_SHARE
            for s in sides]
    return sum(flat) >= 2


def thumbnail_of(img: Image.Image) -> bytes:
    """:func:`thumbnail` of an image opened by :func:`open_for_thumbnail` (or decoded exactly as it would).

    A picture up to twice the work size whose border is not flat (a photo: most of a crawl) is averaged
    into the grids as decoded; the rest go through the work-size copy and the content-box search. The
    grids are box averages either way, so the two paths differ by rounding (benchmarks/bench_dedup_recall.py
    measures the detector on both); the copy was most of a thumbnail's cost."""
    img = img.convert("RGB")
    box_bytes = np.array([0, 0, 255, 255], dtype=np.uint8)
    background = np.zeros(4, dtype=np.uint8)
    found = None
    if max(img.size) > 2 * _WORK_SIDE or _border_may_be_flat(img):
        img.thumbnail((_WORK_SIDE, _WORK_SIDE), Image.Resampling.BILINEAR)
        found = _content_box(img)
    w, h = img.size
    if found is not None:
        box, bg = found
        img = img.crop(box)
        box_bytes = np.round(np.array([box[0] / w, box[1] / h, box[2] / w, box[3] / h]) * 255).astype(np.uint8)
        background[:3] = _lab_bytes(Image.new("RGB", (1, 1), tuple(int(v) for v in bg)))[0, 0]
        background[3] = 1
    grey = img.convert("L")
    g = grey.resize((GREY_SIDE, GREY_SIDE), Image.Resampling.BOX)
    c = img.resize((RGB_SIDE, RGB_SIDE), Image.Resampling.BOX)  # averaged in sRGB, then to Lab
    d = grey.resize((DETAIL_SIDE, DETAIL_SIDE), Image.Resampling.BOX)
    return b"".join([np.asarray(g, dtype=np.uint8).tobytes(), _lab_bytes(c).tobytes(), box_bytes.tobytes(),
                     background.tobytes(), np.asarray(d, dtype=np.uint8).tobytes()])
