"""Shared helpers for benchmarks: each one prints a ratio against a baseline measured in the same run."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]  # the checkout: configs/ (the code is imported as vila2_curate)


def best_of(fn: Callable[[], object], repeats: int = 3) -> float:
    """Best wall time of ``repeats`` runs: the least noisy estimate on a shared machine."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def photo_like_jpegs(n: int, size: tuple[int, int] = (1280, 720), seed: int = 0, quality: int = 90) -> list[bytes]:
    """Smooth random textures encoded as JPEG: realistic entropy, deterministic."""
    rng = np.random.default_rng(seed)
    out = []
    w, h = size
    for _ in range(n):
        small = rng.integers(0, 255, size=(h // 24, w // 24, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


def report(name: str, **fields: object) -> None:
    print(json.dumps({"benchmark": name, **fields}))
