"""Colour arithmetic for the generated evaluation pictures: HSV colours, colours of the same grey (what
pHash and grey thumbnails cannot tell apart) and tints a given CIE76 delta E away at that grey."""

from __future__ import annotations

import colorsys
from functools import lru_cache

import numpy as np
from PIL import Image, ImageCms


def hsv(h: float, s: float, v: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, s, v)
    return round(r * 255), round(g * 255), round(b * 255)


def same_grey(colour: tuple[int, int, int], like: tuple[int, int, int]) -> tuple[int, int, int]:
    """``colour`` scaled to the grey level (PIL's ITU-R 601 luma) of ``like``: the grey thumbnail and
    pHash see the two as one."""
    def luma(c: tuple[int, int, int]) -> float:
        return 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]

    out = [float(v) for v in colour]
    for _ in range(8):  # scaling clips at 255: a few rounds settle it
        k = luma(like) / max(luma(tuple(round(v) for v in out)), 1.0)  # type: ignore[arg-type]
        out = [min(255.0, v * k) for v in out]
    return tuple(round(v) for v in out)  # type: ignore[return-value]


@lru_cache(maxsize=1)
def _to_lab() -> ImageCms.ImageCmsTransform:
    return ImageCms.buildTransformFromOpenProfiles(ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB"),
                                                   "RGB", "LAB")


def lab_of(colours: np.ndarray) -> np.ndarray:
    """(n, 3) sRGB colours -> CIE L*, a*, b* (littleCMS, PIL's 8-bit Lab: L* x 2.55, a*, b* signed bytes)."""
    img = Image.fromarray(np.asarray(colours, dtype=np.uint8).reshape(1, -1, 3), "RGB")
    lab = np.asarray(ImageCms.applyTransform(img, _to_lab()))[0]
    return np.stack([lab[:, 0] / 2.55, lab[:, 1].view(np.int8), lab[:, 2].view(np.int8)], axis=1).astype(float)


def tinted(colour: tuple[int, int, int], delta_e: tuple[float, float], rng: np.random.Generator,
            avoid: tuple[tuple[int, int, int], ...] = ()) -> tuple[int, int, int]:
    """``colour`` moved at constant luma by a delta E within ``delta_e`` (bisection), of 256 random
    directions and distances the one that gets there and lands farthest from the colours to ``avoid``
    (other families' pages)."""
    luma = np.array([0.299, 0.587, 0.114])
    d = rng.standard_normal((256, 3))
    d -= np.outer(d @ luma / (luma @ luma), luma)  # no change of grey: pHash and grey thumbnails see one picture
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    target = rng.uniform(*delta_e, size=len(d))
    base = lab_of(np.array([colour]))[0]

    def at(t: np.ndarray) -> np.ndarray:
        return np.clip(np.round(np.asarray(colour) + t[:, None] * d), 0, 255)

    lo, hi = np.zeros(len(d)), np.full(len(d), 64.0)
    for _ in range(20):
        mid = (lo + hi) / 2
        near = np.sqrt(((lab_of(at(mid)) - base) ** 2).sum(axis=1)) < target
        lo, hi = np.where(near, mid, lo), np.where(near, hi, mid)
    found = at(hi)
    labs = lab_of(found)
    gap = (np.sqrt(((labs[:, None] - lab_of(np.array(avoid))[None]) ** 2).sum(axis=2)).min(axis=1)
           if avoid else np.zeros(len(d)))
    reached = np.sqrt(((labs - base) ** 2).sum(axis=1)) >= target - 0.5  # not stopped by 0 or 255
    return tuple(int(v) for v in found[int(np.where(reached, gap, -1.0).argmax())])  # type: ignore[return-value]
