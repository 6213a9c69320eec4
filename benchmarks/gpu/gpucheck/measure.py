"""Timing, GPU utilisation and memory around one run, synthetic inputs, and the engine's batch path."""

from __future__ import annotations

import contextlib
import io
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

GIB = 1 << 30


class UtilSampler:
    """GPU utilisation (NVML's percent of time a kernel ran) sampled every ``period_s`` while active.

    NVML through ``pynvml`` (nvidia-ml-py, one of the brought wheels), else ``nvidia-smi``; on CPU, or
    when neither answers, the mean is None.
    """

    def __init__(self, device: Any, period_s: float = 0.05) -> None:
        self.device, self.period_s = device, period_s
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._read = self._reader() if getattr(device, "type", "cpu") == "cuda" else None

    def _reader(self) -> Callable[[], float] | None:
        import torch

        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            return lambda: float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        except Exception:  # noqa: BLE001 - no NVML binding: ask nvidia-smi (slower, fewer samples)
            if shutil.which("nvidia-smi") is None:
                return None
            cmd = ["nvidia-smi", f"--id={index}", "--query-gpu=utilization.gpu",
                   "--format=csv,noheader,nounits"]
            return lambda: float(subprocess.run(cmd, capture_output=True, text=True, timeout=5).stdout)

    def __enter__(self) -> UtilSampler:
        if self._read is not None:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.period_s):
            with contextlib.suppress(Exception):  # a missed sample is not a failed run
                self.samples.append(self._read())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    @property
    def mean(self) -> float | None:
        return round(sum(self.samples) / len(self.samples), 1) if self.samples else None


def sync(device: Any) -> None:
    import torch

    if getattr(device, "type", "cpu") == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Run:
    """One timed run: seconds, peak device memory, mean utilisation, and what the run returned."""

    seconds: float
    peak_gib: float | None = None
    util_pct: float | None = None
    value: Any = field(default=None, repr=False)


def timed(fn: Callable[[], Any], device: Any, sample_util: bool = False) -> Run:
    """Run ``fn`` once between device synchronisations; peak memory and utilisation of that run only."""
    import torch

    cuda = getattr(device, "type", "cpu") == "cuda"
    sync(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    with UtilSampler(device if sample_util else None) as util:
        t = time.perf_counter()
        value = fn()
        sync(device)
        seconds = time.perf_counter() - t
    peak = round(torch.cuda.max_memory_allocated(device) / GIB, 2) if cuda else None
    return Run(seconds, peak, util.mean, value)


def photo_jpegs(n: int, size: tuple[int, int], unique: int = 64, seed: int = 0, threads: int = 8
                ) -> list[bytes]:
    """``n`` JPEGs of smooth random texture (photo-like entropy), ``unique`` distinct ones repeated:
    decoding cost is per row, and encoding thousands of 720p images would eat the check's time."""
    w, h = size

    def one(i: int) -> bytes:
        rng = np.random.default_rng(seed + i)
        small = rng.integers(0, 255, size=(max(1, h // 24), max(1, w // 24), 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC).save(buf, format="JPEG", quality=90)
        return buf.getvalue()

    with ThreadPoolExecutor(max_workers=threads) as pool:
        distinct = list(pool.map(one, range(min(n, unique))))
    return [distinct[i % len(distinct)] for i in range(n)]


def captions(n: int) -> list[str]:
    """Distinct captions in the demo vocabulary, 20-40 words, with groundable noun phrases."""
    colours = ("red", "blue", "green", "black", "purple")
    things = ("ellipse", "triangle", "rectangle", "sign", "dog")
    places = ("on a sandy beach at sunset", "next to a small white house", "in a busy street at night",
              "under a clear blue sky", "on a wooden table near the window")
    out = []
    for i in range(n):
        a, b, c = (colours[(i + k) % 5] + " " + things[(i * 3 + k) % 5] for k in range(3))
        out.append(f"A {a} next to a {b} and a {c} {places[i % 5]}, photo number {i}; "
                   f"the {b} is on the left and the {c} stands behind it while people walk past.")
    return out


def synthetic_pairs(n: int, size: tuple[int, int], cpus: int) -> tuple[list[bytes], list[str], pa.Table]:
    """``n`` photo-like JPEGs with captions, and the pair rows a reader would yield for them."""
    jpegs, texts = photo_jpegs(n, size, threads=max(1, cpus)), captions(n)
    return jpegs, texts, pair_table(jpegs, texts)


def pair_table(images: list[bytes], texts: list[str]) -> pa.Table:
    """Pair rows as a reader yields them (schemas.rows.PAIR_SCHEMA)."""
    from vila2_curate.schemas.rows import PAIR_SCHEMA, make_table

    return make_table([{"key": f"k{i:06d}", "source": "gpu-check", "shard": "s0", "image": b, "text": t,
                        "quarantined": False} for i, (b, t) in enumerate(zip(images, texts, strict=True))],
                      PAIR_SCHEMA)


def engine_path(stage: Any, table: pa.Table, rows_per_batch: int) -> list[pa.Table]:
    """The local engine's batch path: ``apply_guarded`` (bisect-and-quarantine) per engine batch."""
    from vila2_curate.pipelines.engine.guard import apply_guarded

    return [apply_guarded(stage, table.slice(s, rows_per_batch))
            for s in range(0, table.num_rows, rows_per_batch)]


def check_alive(outputs: list[pa.Table], stage: str) -> None:
    """A throughput figure means nothing if the stage quarantined its rows: fail loudly instead."""
    reasons = [r for t in outputs for r in t.column("drop_reason").to_pylist() if r is not None]
    if reasons:
        raise RuntimeError(f"{stage}: {len(reasons)} rows dropped during the check, first: {reasons[0]}")


def point(batch_size: int, n: int, stage: Run, bare: Run, tokens: int | None = None,
          extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """One sweep point: rates of the stage and the bare model on the same work, and their ratio."""
    out: dict[str, Any] = {
        "batch_size": batch_size,
        "items_per_s": round(n / stage.seconds, 2),
        "bare_items_per_s": round(n / bare.seconds, 2),
        "ratio_vs_bare": round(bare.seconds / stage.seconds, 3),
        "peak_gpu_mem_gib": stage.peak_gib,
        "bare_peak_gpu_mem_gib": bare.peak_gib,
        "gpu_util_pct": stage.util_pct,
        "bare_gpu_util_pct": bare.util_pct,
    }
    if tokens is not None:
        out["tokens_per_s"] = round(tokens / stage.seconds, 1)
        out["bare_tokens_per_s"] = round(tokens / bare.seconds, 1)
    return out | (extra or {})


def summary(name: str, sweep: list[dict[str, Any]], **fields: Any) -> dict[str, Any]:
    """The stage's JSON line: the best sweep point's figures on top, every point under ``sweep``."""
    best = max(sweep, key=lambda p: p["items_per_s"])
    top = {k: best[k] for k in ("items_per_s", "bare_items_per_s", "ratio_vs_bare", "peak_gpu_mem_gib",
                                "gpu_util_pct", "tokens_per_s", "bare_tokens_per_s") if k in best}
    return {"stage": name, "best_batch_size": best["batch_size"], **top, **fields, "sweep": sweep,
            "demo": True}
