"""What every stage check shares: the device, sizes, time left, and the sweep over batch sizes."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Ctx:
    device: Any  # torch.device
    tiny: bool  # the tests' demo models on CPU (CI) instead of full-size ones
    work: Path  # scratch folder for model checkpoints
    cpus: int  # decode / prepare threads a model stage gets (runtime.cpus)
    image_size: tuple[int, int]
    rows_per_batch: int  # the engine's batch (RunConfig.batch_size) the stages are called with
    deadline: float = float("inf")  # time.monotonic() by which this stage must have finished
    skipped: list[str] = field(default_factory=list)

    @property
    def build_device(self) -> str:
        """Where random weights are drawn: full-size ones on the GPU (seconds instead of minutes)."""
        return "cuda" if self.device.type == "cuda" and not self.tiny else "cpu"

    def left(self) -> float:
        return self.deadline - time.monotonic()


def sweep(ctx: Ctx, stage: str, sizes: list[int], run_point: Callable[[int], dict[str, Any]]
          ) -> list[dict[str, Any]]:
    """``run_point(batch_size)`` for each size, smallest first, while the stage's time allows another
    point as long as the last one took (larger batches are rarely slower); skipped sizes are noted."""
    out: list[dict[str, Any]] = []
    last = 0.0
    for b in sizes:
        if out and ctx.left() < 1.3 * last:
            ctx.skipped.append(f"{stage}: batch_size {b} (time budget)")
            continue
        t = time.monotonic()
        out.append(run_point(b))
        last = time.monotonic() - t
    return out
