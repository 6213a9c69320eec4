"""Whether a Ray cluster can run a plan's stages, checked before a Ray run starts.

Ray Data runs every operator of a segment's pipeline at the same time, and an actor pool keeps its actors
for the whole segment. A worker that no node can hold, or pools that cannot all be placed together, leave
a run waiting forever with nothing but ``Pending Demands`` in ``ray status``. This module turns that into
one error line naming the stage, its ask and what the cluster has (``PlacementError``, a configuration
error: exit 2), or, where an autoscaler may add nodes, into a bounded wait that says what it waits for
(``ray.placement_timeout_s``).

The packing works on plain dicts of node resources, as Ray's ``ray.nodes()`` reports them (``CPU``,
``GPU``, ``memory`` in bytes), so it is testable without a cluster; ``cluster_nodes`` reads the real ones.
It is a necessary condition, not a sufficient one: it counts the workers a segment cannot start without.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any

from vila2_curate.pipelines.engine.exchange import runs_whole_shards, uses_model
from vila2_curate.pipelines.engine.plan import Plan, Segment
from vila2_curate.schemas.config import ConfigError

EPS = 1e-6
GIB = 1024**3

Node = Mapping[str, float]  # a node's total resources: {"CPU": 8.0, "GPU": 1.0, "memory": 6.4e10, ...}


class PlacementError(ConfigError):
    """The plan asks for more than the Ray cluster can place: a configuration error, reported in one line."""


def _num(x: float) -> str:
    return f"{x:g}"


def _gib(nbytes: float) -> str:
    return f"{nbytes / GIB:.1f} GiB"


@dataclass(frozen=True)
class Operator:
    """One operator of a segment's Ray Data pipeline: ``count`` workers of one ask that run at the same time."""

    name: str  # "the reader", "stage 'ocr'"
    cpus: float
    gpus: float = 0.0
    memory: float = 0.0  # bytes; 0 = no reservation
    count: int = 1

    def ask(self) -> str:
        """One worker's ask, e.g. ``1 CPU + 0.5 GPU``."""
        parts = [f"{_num(self.cpus)} CPU"]
        if self.gpus > EPS:
            parts.append(f"{_num(self.gpus)} GPU")
        if self.memory > EPS:
            parts.append(f"{_gib(self.memory)} memory")
        return " + ".join(parts)

    def describe(self) -> str:
        workers = f"{self.count} workers" if self.count != 1 else "1 worker"
        return f"{self.name}: {workers} of {self.ask()}"


def segment_operators(segment: Segment) -> list[Operator]:
    """The workers a segment's pipeline needs at once, in pipeline order.

    A segment without model stages is one 1-CPU task per shard (``exchange.RunShard``). Otherwise the
    reader is a 1-CPU task; a model stage (``uses_model``) an actor pool of ``stage.workers`` actors; a
    CPU stage at least one task. Ray Data fuses consecutive tasks whose remote args match (same CPUs, GPUs,
    memory), the reader's too, so such a run counts once; a task stage before a model stage with the same
    ask runs in its actors (the reader is counted on its own there).
    """
    if runs_whole_shards(segment):  # one 1-CPU Ray task per shard runs the reader and every stage
        names = " + ".join(repr(s.name) for s in segment.maps)
        return [Operator(f"the shard task (reader{' + ' + names if names else ''})", 1.0, 0.0, 0.0)]
    ops: list[Operator] = []
    chain: list[str] = ["the reader"]  # tasks not yet placed: Ray Data may fuse them with the next stage
    chain_ask: tuple[float, float, float] = (1.0, 0.0, 0.0)

    def flush() -> None:
        if chain:
            names = [n if n == "the reader" else repr(n) for n in chain]
            label = (names[0] if chain == ["the reader"] else f"stage {names[0]}" if len(chain) == 1
                     else ("" if chain[0] == "the reader" else "stages ") + " + ".join(names))
            ops.append(Operator(label, *chain_ask))
            chain.clear()

    for stage in segment.maps:
        r = stage.resources
        ask = (float(r.cpus), float(r.gpus), float(r.memory_gb) * GIB)
        if chain and ask != chain_ask:
            flush()
        if uses_model(stage):
            if "the reader" in chain:
                flush()
            chain.clear()  # fused into this stage's actors (same ask), or already flushed
            ops.append(Operator(f"stage {stage.name!r}", *ask, count=max(1, int(stage.workers))))
        else:
            chain.append(stage.name)
            chain_ask = ask
    flush()
    return ops


@dataclass
class _Free:
    """What is left of one node while packing; GPUs one by one, since a fractional ask must fit in one GPU."""

    cpus: float
    gpus: list[float]
    memory: float

    @classmethod
    def of(cls, node: Node) -> _Free:
        total = float(node.get("GPU", 0.0))
        whole = int(total + EPS)
        rest = total - whole
        return cls(float(node.get("CPU", 0.0)), [1.0] * whole + ([rest] if rest > EPS else []),
                   float(node.get("memory", 0.0)))

    def take(self, op: Operator) -> bool:
        """Reserve one worker of ``op`` here if it fits."""
        if op.cpus > self.cpus + EPS or op.memory > self.memory + EPS:
            return False
        if op.gpus > EPS:
            if op.gpus < 1 - EPS:  # a share of one GPU, as Ray gives fractional GPUs
                slot = next((i for i, f in enumerate(self.gpus) if f >= op.gpus - EPS), None)
                if slot is None:
                    return False
                self.gpus[slot] -= op.gpus
            else:  # whole GPUs
                free = [i for i, f in enumerate(self.gpus) if f >= 1 - EPS]
                need = math.ceil(op.gpus - EPS)
                if len(free) < need:
                    return False
                for i in free[:need]:
                    self.gpus[i] = 0.0
        self.cpus -= op.cpus
        self.memory -= op.memory
        return True


def packs(ops: Sequence[Operator], nodes: Sequence[Node]) -> bool:
    """Whether every worker of ``ops`` fits on ``nodes`` at once (first-fit decreasing)."""
    free = [_Free.of(n) for n in nodes]
    workers = sorted((op for op in ops for _ in range(op.count)), key=lambda o: (o.gpus, o.cpus, o.memory),
                     reverse=True)
    return all(any(f.take(w) for f in free) for w in workers)


def describe_nodes(nodes: Sequence[Node]) -> str:
    """The cluster in a few words: identical nodes counted once."""
    if not nodes:
        return "no alive node"
    shapes: dict[str, int] = {}
    for n in nodes:
        shape = (f"{_num(float(n.get('CPU', 0.0)))} CPU, {_num(float(n.get('GPU', 0.0)))} GPU, "
                 f"{_gib(float(n.get('memory', 0.0)))} memory")
        shapes[shape] = shapes.get(shape, 0) + 1
    if len(shapes) == 1:
        (shape, k), = shapes.items()
        return f"{k} node{'s' if k > 1 else ''} of {shape}"
    return f"{len(nodes)} nodes: " + "; ".join(f"{k} of {shape}" for shape, k in shapes.items())


def _total(ops: Sequence[Operator]) -> str:
    cpus = sum(o.cpus * o.count for o in ops)
    gpus = sum(o.gpus * o.count for o in ops)
    memory = sum(o.memory * o.count for o in ops)
    return Operator("", cpus, gpus, memory).ask()


def placement_problem(ops: Sequence[Operator], nodes: Sequence[Node]) -> str | None:
    """None when the workers of ``ops`` can all run at once on ``nodes``; else why not, in one line.

    A worker no node can hold names its operator; otherwise the operators are added in pipeline order
    and the first one that no longer fits beside the earlier ones is named.
    """
    for op in ops:
        if not any(_Free.of(n).take(op) for n in nodes):
            return (f"{op.name} asks {op.ask()} per worker and no node of the Ray cluster can hold one; "
                    f"the cluster has {describe_nodes(nodes)}")
    for k in range(1, len(ops) + 1):
        if not packs(ops[:k], nodes):
            op = ops[k - 1]
            beside = f" beside {'; '.join(o.describe() for o in ops[:k - 1])}" if k > 1 else ""
            return (f"{op.name} asks {op.count} x {op.ask()} and cannot be placed{beside} (Ray Data runs a "
                    f"segment's stages at the same time: {_total(ops)} in all); the cluster has "
                    f"{describe_nodes(nodes)}")
    return None


def plan_problem(plan: Plan, nodes: Sequence[Node]) -> str | None:
    """The first segment of ``plan`` that ``nodes`` cannot run, as ``placement_problem`` says it."""
    for segment in plan.segments:
        problem = placement_problem(segment_operators(segment), nodes)
        if problem:
            return problem
    return None


def cluster_nodes() -> list[dict[str, float]]:
    """The alive nodes' total resources of the connected Ray cluster."""
    import ray

    return [dict(n.get("Resources") or {}) for n in ray.nodes() if n.get("Alive")]


FIX = ("lower the stages' runtime (workers, cpus, gpus) or add nodes; where an autoscaler adds nodes, "
       "set ray.placement_timeout_s to wait for them")


def check_placement(plan: Plan, timeout_s: float = 0.0, *, nodes: Callable[[], Sequence[Node]] = cluster_nodes,
                    poll_s: float = 5.0, out: IO[str] | None = None,
                    clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], Any] = time.sleep) -> None:
    """Return once the cluster can run every segment of ``plan``; raise ``PlacementError`` when it cannot.

    ``timeout_s`` 0 fails at once; otherwise the cluster is polled every ``poll_s`` seconds for up to
    ``timeout_s`` (an autoscaler may add nodes), with one stderr line whenever what is missing changes.
    """
    deadline = clock() + timeout_s
    said = None
    while True:
        problem = plan_problem(plan, nodes())
        if problem is None:
            return
        left = deadline - clock()
        if left <= 0:
            waited = f" (after waiting {_num(timeout_s)} s for the cluster to grow)" if timeout_s > 0 else ""
            raise PlacementError(f"{problem}{waited}; {FIX}")
        if problem != said:
            print(f"waiting for the cluster to grow ({left:.0f} s left of ray.placement_timeout_s="
                  f"{_num(timeout_s)}): {problem}", file=out or sys.stderr, flush=True)
            said = problem
        sleep(min(poll_s, left))
