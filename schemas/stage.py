"""The stage contract: a pure batch transform that declares the resources it needs.

Engines (local, Ray Data, Beam) call ``setup()`` once per worker and then ``__call__`` per batch. A stage
never opens files or sockets, never knows which engine runs it and never drops a row: it sets
``drop_reason`` / ``drop_stage`` (and ``quarantined`` for bad input) and lets the writer route the row.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import pyarrow as pa


@dataclass(frozen=True)
class Resources:
    """What one worker of a stage needs; the Ray engine turns this into actor/task options."""

    cpus: float = 1.0
    gpus: float = 0.0  # fractional values co-locate several model stages on one GPU
    memory_gb: float = 0.0  # 0 = no reservation


@runtime_checkable
class Stage(Protocol):
    """Every hook an engine (``pipelines.engine.plan``, ``pipelines.executors.*``, ``pipelines.engine.shard_task``) may
    call on a stage; ``StageBase`` gives each a default. Engines read nothing else from a stage."""

    name: str
    version: str  # bumped whenever the stage's output for the same input changes; goes to the manifest
    resources: Resources
    loads_model: bool  # route it like a model: a worker pool that loads it once (Ray actors, Beam RunInference)
    writes_captions: bool  # appends a caption (a caption-hygiene stage before it may keep empty captions)
    recaption_follows: bool  # set by the planner: a later stage of the run writes captions
    uses_thumbnails: bool  # reads the ``thumb`` column (dedup's thumbnail signature) when an earlier stage filled it
    thumbnails_follow: bool  # set by the planner: a later stage of the same segment ``uses_thumbnails``
    run_started_at: Any  # set by the engine: the run's recorded start time (for timestamps in the output)

    @property
    def batch_size(self) -> int | None:
        """Rows per batch this stage wants from a distributed engine; None: the run's ``batch_size``."""

    @property
    def workers(self) -> int:
        """Model workers (Ray actor pool size) for a stage that loads a model."""

    def setup(self) -> None:
        """Load models once per worker."""

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Transform one batch; returns the same rows (same order, same count)."""

    def sidecars(self) -> dict[str, Callable[[dict[str, Any]], str | None]]:
        """Sidecar folder -> picklable function row -> text, written beside the shards (``pipelines.io.sidecar_plan``)."""


class StageBase:
    """The defaults of every ``Stage`` hook; stage classes derive from it and override what they need.

    ``resources``, ``batch_size`` and ``workers`` come from the config's ``runtime`` (a ``ModelRuntime``)
    when the config has one, so model stages get them without code; a stage whose runtime sits elsewhere
    in its config overrides ``runtime``.
    """

    name: str = ""
    version: str = "1"
    default_resources: Resources = Resources()  # one worker's ask when the stage has no model runtime
    loads_model: bool = False
    writes_captions: bool = False
    recaption_follows: bool = False
    thumbnails_follow: bool = False
    uses_thumbnails: bool = False
    run_started_at: Any = None
    cfg: Any = None

    @property
    def runtime(self) -> Any:
        """The config's ``ModelRuntime``, or None (configs without one have no field)."""
        return getattr(self.cfg, "runtime", None)

    @property
    def resources(self) -> Resources:
        """One worker's ask: the runtime's CPUs, GPUs and memory, else ``default_resources``."""
        rt = self.runtime
        if rt is None:
            return self.default_resources
        return Resources(cpus=rt.cpus, gpus=rt.gpus, memory_gb=rt.memory_gb)

    @property
    def batch_size(self) -> int | None:
        return self.runtime.batch_size if self.runtime is not None else None

    @property
    def workers(self) -> int:
        return self.runtime.workers if self.runtime is not None else 1

    def setup(self) -> None:
        return None

    def sidecars(self) -> dict[str, Callable[[dict[str, Any]], str | None]]:
        return {}

    def summarize(self, decisions: pa.Table, signatures: pa.Table) -> dict[str, Any]:
        """A global stage's summary (summaries.json), from every decision and signature of a small run."""
        return {}

    # optional step 0 of ``PartitionedDecide``: only a stage with ``fits_on_sample`` is fitted
    fits_on_sample: bool = False

    def sample(self, signatures: pa.Table) -> pa.Table | None:
        """At most M rows of one shard's signatures for ``fit`` (a deterministic bottom-M sample)."""
        return None

    def fit(self, samples: Iterable[pa.Table]) -> None:
        """Consume every shard's sample (keep at most M rows) before step 1."""
        return None


@runtime_checkable
class GlobalStage(Protocol):
    """A decision that needs the whole dataset, done in two passes (ARCHITECTURE.md, "The stage contract").

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

    def summarize(self, decisions: pa.Table, signatures: pa.Table) -> dict[str, Any]: ...


SHARD_COL = "input_shard"  # "<source>/<shard_id>": the input shard a signature (and so a decision) belongs to;
# rows keep their own "shard" column (the shard_id alone)
PARTITION_COL = "partition"  # int64 group key of the partitioned decide
NODE_COL = "node"  # int64 node of a signature row: input shard index << 32 | row (engines add it with SHARD_COL)
NODE_SHARD_BITS = 32  # 4 billion rows a shard, 2^31 shards


def node_ids(shard_index: int, rows: int) -> np.ndarray:
    """The integer node of each signature row of input shard ``shard_index``: unique in the run with no
    table of ids anywhere, and it says which shard holds the row's attributes (``node >> 32``)."""
    return (np.int64(shard_index) << np.int64(NODE_SHARD_BITS)) + np.arange(rows, dtype=np.int64)



@runtime_checkable
class PartitionedDecide(Protocol):
    """The scale path of a global stage: ``decide`` split into independent, bounded groups.

    ``decide(all signatures)`` above stays the single-process reference; for the same signatures the
    partitioned path must give the same decisions (same kept rows, same reasons).
    ``pipelines.engine.runner.decide_signatures`` runs these steps on every engine (in one process:
    ``pipelines.executors.local.decide_in_process``). The engine runs:

    0. only when the stage sets ``fits_on_sample`` (dedup, for the k-means centroids of thumbnail
       neighbours and SemDeDup; ``StageBase`` gives the hooks no-op defaults):
       ``stage.fit(stage.sample(sig) for each shard's sig)``. ``sample`` returns at
       most M rows per shard (the M smallest hashes of the item id: a deterministic bottom-M sample,
       independent of sharding and order); ``fit`` consumes the iterable and keeps the M smallest
       overall, so the driver holds one sample, never all rows. Workers of steps 1-2 must use the
       fitted stage (pickle it after ``fit``).
    1. per input shard (map side): the shard's signatures, with a ``shard`` column added by the engine,
       go through ``partition(sig)``, which returns the rows to shuffle with an int64 ``partition``
       column (a non-negative hash); a signature may be emitted under several partitions (pHash bands,
       LSH bands) and the rows may be a projection of the signature columns. All rows with the same
       ``partition`` value must reach the same group, normally ``partition % P`` for P groups:
       ``decide_partition`` accepts any union of whole ``partition`` values.
    2. per partition (in parallel; memory bounded by the partition's size): ``decide_partition(rows)``
       returns partial results (dedup: edges carrying what the keeper rule needs of both endpoints and
       their ``shard``; cut-offs: a serialized mergeable sketch per subset). Some edges may be pending
       (dedup's pHash candidates): ``CombinesOnEngine`` confirms them before its components.
    3. once (one process, holding only partial results: edges and group members, one sketch per
       subset; never all rows): ``combine(partials)`` returns the combined result. When it has a
       ``shard`` column (dedup: one decision row per group member), the engine hands each shard only
       its own rows; otherwise (thresholds per subset) every shard gets the whole small table.
    4. per input shard: ``shard_decisions(combined_for_shard, shard_signatures)`` returns that shard's
       decisions in DECISION_SCHEMA; the engine stores them per input shard.
    """

    def partition(self, signatures: pa.Table) -> pa.Table: ...

    def decide_partition(self, rows: pa.Table) -> pa.Table: ...

    def combine(self, partials: list[pa.Table]) -> pa.Table: ...

    def shard_decisions(self, combined: pa.Table, signatures: pa.Table) -> pa.Table: ...


@runtime_checkable
class CombinesOnEngine(Protocol):
    """Step 3 of ``PartitionedDecide`` without one process: the edges of step 2 become connected
    components by rounds of engine group-bys, and each component is decided where its members meet.

    The engine (``pipelines.engine.components``) keeps every step bounded by a group or a shard:

    a. each step-2 group's edges, pending candidates confirmed first (their test needs a payload the
       partition rows do not carry: dedup's pHash band rows hold no thumbnail or embedding, since each
       item goes to k+1 bands; each pending edge names its endpoints' shards ``a_input_shard``, ``b_input_shard``):
       ``split_pending(edges)`` -> (ready, pending) per a-endpoint shard; per input shard s
       ``attach_pending(edges with a_input_shard == s, s's signatures, "a")``, routed on by ``b_input_shard``; per
       input shard t ``confirm_pending(attach_pending(edges with b_input_shard == t, t's signatures, "b"))``
       (memory per task: one shard's signatures and the pending edges that touch it). Ready and
       confirmed edges go through ``component_edges`` -> (layer, u, v) rows over the integer ``node``
       column (u > v);
    b. rounds of group-by (layer, node) run the large-star / small-star steps until every group reports
       a star forest; each node then has its component's ``root`` (the smallest node), per layer;
    c. for each phase of ``component_phases`` in order, per input shard ``phase_members(phase, labels of
       its nodes, its signatures, its decisions of the earlier phases)`` joins the members' attributes,
       the rows meet per component (``root``) and ``decide_components(phase, members)`` returns decision
       rows with each member's ``node``;
    d. per input shard ``merge_decisions(its decision rows of every phase)`` gives its DECISION_SCHEMA
       rows. ``large_component`` members or more in one component is reported in the stage's summary.
    """

    large_component: int

    def split_pending(self, partial: pa.Table) -> tuple[pa.Table, pa.Table]: ...

    def attach_pending(self, pending: pa.Table, signatures: pa.Table, end: str) -> pa.Table: ...

    def confirm_pending(self, attached: pa.Table) -> pa.Table: ...

    def component_edges(self, confirmed: pa.Table) -> pa.Table: ...

    def component_phases(self) -> tuple[str, ...]: ...

    def phase_members(self, phase: str, labels: pa.Table, signatures: pa.Table,
                      earlier: pa.Table | None) -> pa.Table | None: ...

    def decide_components(self, phase: str, members: pa.Table) -> pa.Table: ...

    def merge_decisions(self, parts: list[pa.Table]) -> pa.Table: ...
