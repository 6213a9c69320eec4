"""Shared helpers for benchmarks: each one prints a ratio against a baseline measured in the same run."""

from __future__ import annotations

import io
import json
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from fsspec.implementations.local import LocalFileOpener, LocalFileSystem
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


def distinct_photo_jpeg(seed: int, size: tuple[int, int] = (1280, 720), quality: int = 90) -> bytes:
    """One photo-like JPEG per seed that dedup tells apart from every other seed's: a coarse colour layout
    (3-7 cells a side) and a colour ramp under ``photo_like_jpegs``' texture, mixed on the small grid and
    upsampled once. ``photo_like_jpegs`` alone are statistically one grey texture, which dedup's
    thumbnails rightly take for copies of each other."""
    rng = np.random.default_rng(seed)
    w, h = size
    sw, sh = max(w // 24, 2), max(h // 24, 2)
    gh, gw = (int(v) for v in rng.integers(3, 8, size=2))
    layout = Image.fromarray(rng.integers(0, 256, size=(gh, gw, 3), dtype=np.uint8)).resize((sw, sh), Image.Resampling.BICUBIC)
    texture = rng.integers(0, 256, size=(sh, sw, 3)).astype(np.float32)
    ramp = np.linspace(-1.0, 1.0, sh, dtype=np.float32)[:, None, None] * rng.uniform(-40, 40, size=3).astype(np.float32)
    small = np.clip(0.7 * np.asarray(layout, dtype=np.float32) + 0.3 * texture + ramp, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def report(name: str, **fields: object) -> None:
    print(json.dumps({"benchmark": name, **fields}))


# ---- a filesystem that counts bytes ---------------------------------------------------------------------
PROTOCOL = "counting"
COUNTS_ENV = "BENCH_FS_COUNTS"  # folder every process writes its byte counts to
ROOTS_ENV = "BENCH_FS_ROOTS"  # JSON {"work": ..., "output": ..., "input": ...}: how a path is classified


class _Counts:
    """Bytes read and written in this process by class of path, rewritten to this process's own file at
    each close: a Ray worker is killed, not exited, so nothing may wait for its exit."""

    def __init__(self) -> None:
        self.read: dict[str, int] = {}
        self.written: dict[str, int] = {}
        roots = json.loads(os.environ.get(ROOTS_ENV, "{}"))
        # longest root first: _work/ lies inside the output folder
        self.roots = sorted(((k, v.rstrip("/") + "/") for k, v in roots.items()), key=lambda kv: -len(kv[1]))
        folder = os.environ.get(COUNTS_ENV)
        self.path = os.path.join(folder, f"{os.getpid()}-{uuid.uuid4().hex[:8]}.json") if folder else None

    def kind(self, path: str) -> str:
        return next((k for k, root in self.roots if path.startswith(root)), "other")

    def add(self, table: dict[str, int], path: str, n: int) -> None:
        k = self.kind(path)
        table[k] = table.get(k, 0) + n

    def flush(self) -> None:
        if self.path is None:
            return
        tmp = f"{self.path}.tmp"
        with open(tmp, "w") as f:  # noqa: PTH123 - plain open: these bytes are not the pipeline's
            json.dump({"read": self.read, "written": self.written}, f)
        os.replace(tmp, self.path)


class _CountingFile(LocalFileOpener):
    """A local file that adds every byte read or written to its filesystem's counts."""

    counts: _Counts

    def read(self, *args: Any, **kwargs: Any) -> bytes:
        data = self.f.read(*args, **kwargs)
        self.counts.add(self.counts.read, self.path, len(data))
        return data

    def readinto(self, buffer: Any) -> int:
        n = self.f.readinto(buffer) or 0
        self.counts.add(self.counts.read, self.path, n)
        return n

    def readline(self, *args: Any, **kwargs: Any) -> bytes:
        data = self.f.readline(*args, **kwargs)
        self.counts.add(self.counts.read, self.path, len(data))
        return data

    def readlines(self, *args: Any, **kwargs: Any) -> list[bytes]:
        lines = self.f.readlines(*args, **kwargs)
        self.counts.add(self.counts.read, self.path, sum(len(x) for x in lines))
        return lines

    def __iter__(self) -> Any:
        return iter(self.readline, b"")

    def write(self, data: Any) -> int:
        n = self.f.write(data)
        self.counts.add(self.counts.written, self.path, memoryview(data).nbytes if n is None else n)
        return n

    def close(self) -> None:
        self.f.close()
        self.counts.flush()

    def __exit__(self, *exc: Any) -> None:
        self._incontext = False
        self.close()


class CountingFileSystem(LocalFileSystem):
    """``counting:///abs/path``: the local filesystem, counting the bytes through every file it opens."""

    protocol = (PROTOCOL,)
    counts_io = True  # what ``_NotCounting`` looks for

    def _open(self, path: str, mode: str = "rb", block_size: Any = None, **kwargs: Any) -> _CountingFile:
        path = self._strip_protocol(path)
        if self.auto_mkdir and ("w" in mode or "x" in mode or "a" in mode):
            self.makedirs(self._parent(path), exist_ok=True)
        f = _CountingFile(path, mode, fs=self, **kwargs)
        f.counts = process_counts()
        return f


_COUNTS: list[_Counts] = []


def process_counts() -> _Counts:
    if not _COUNTS:
        _COUNTS.append(_Counts())
    return _COUNTS[0]


class _NotCountingMeta(type):
    def __instancecheck__(cls, obj: object) -> bool:
        return isinstance(obj, LocalFileSystem) and not getattr(type(obj), "counts_io", False)


class _NotCounting(metaclass=_NotCountingMeta):
    """Stands for LocalFileSystem in ``atomic``: its parquet reads on a local filesystem open the file with
    Arrow directly, past fsspec; for the counting filesystem they go through fsspec (as on S3) and count."""


def install_counting_fs() -> None:
    """Register ``counting://`` in this process (the driver, and every Ray worker through a setup hook)."""
    import fsspec

    from vila2_curate.pipelines.io.writers import atomic

    fsspec.register_implementation(PROTOCOL, CountingFileSystem, clobber=True)
    atomic.LocalFileSystem = _NotCounting
