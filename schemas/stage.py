"""The stage contract: a pure batch transform that declares the resources it needs.

Engines (local, Ray Data, Beam) call ``setup()`` once per worker and then ``__call__`` per batch. A stage
never opens files or sockets, never knows which engine runs it and never drops a row: it sets
``drop_reason`` / ``drop_stage`` (and ``quarantined`` for bad input) and lets the writer route the row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import pyarrow as pa


@dataclass(frozen=True)
class Resources:
    """What one worker of a stage needs; the Ray engine turns this into actor/task options."""

    cpus: float = 1.0
    gpus: float = 0.0  # fractional values co-locate several model stages on one GPU
    memory_gb: float = 0.0  # 0 = no reservation

    def ray_options(self) -> dict:
        opts: dict = {"num_cpus": self.cpus}
        if self.gpus:
            opts["num_gpus"] = self.gpus
        if self.memory_gb:
            opts["memory"] = int(self.memory_gb * 1024**3)
        return opts


@runtime_checkable
class Stage(Protocol):
    name: str
    version: str  # bumped whenever the stage's output for the same input changes; goes to the manifest
    resources: Resources

    def setup(self) -> None:
        """Load models once per worker."""

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Transform one batch; returns the same rows (same order, same count)."""


@runtime_checkable
class GlobalStage(Protocol):
    """A decision that needs the whole dataset, done in two passes (DESIGN.md, "The stage contract").

    1. map: ``signatures(batch)`` returns a small table (``source``, ``key``, ``image_index`` and what the
       decision needs) for the alive rows of a batch; it may use models loaded in ``setup()``.
    2. aggregate: the engine groups all signatures by ``group_by`` (None: one group holding everything)
       with its own primitive (local dict, Ray groupby, Beam GroupByKey) and calls ``decide(group)``,
       which returns rows in DECISION_SCHEMA. ``decide`` must give the same answer for the same rows in
       any order, so every engine reaches the same decision.
    3. map: the engine applies the decisions to the data rows (drop_reason / drop_stage / flags).
    """

    name: str
    version: str
    resources: Resources
    group_by: str | None

    def setup(self) -> None: ...

    def signatures(self, batch: pa.Table) -> pa.Table: ...

    def decide(self, signatures: pa.Table) -> pa.Table: ...
