"""Step 3 of the partitioned decide on the engine (schemas.stage.CombinesOnEngine): connected components
and keepers with no process that holds the dataset's edges.

Every exchange goes through bucket files under ``_work/seg{i}/components/``: bucket b is read by the
load of work item b (``ctx.items[b]``), so the engine's own ``group_apply`` (load per shard, group by a
key, call per group) and ``per_shard`` are the only primitives used, on every engine. A group's output is
split by the bucket that reads it next and written under the group's name, so a retried group rewrites
the same files. Memory per task: one group of one round, or one shard's signatures and the rows of its
bucket. The driver holds a few counters per round.

Steps: step-2 groups write their edges per a-endpoint shard (``edges/``); per shard, pending pHash
candidates are confirmed (a's payload, then b's, ``CombinesOnEngine`` step a) and every confirmed edge turns
into layer edges (``r0/``); rounds ``r{k}`` -> ``r{k+1}`` until a round reports a star forest; labels per
node's shard (``labels/``); one group-by per phase (``decisions/<phase>/``); per shard the merged decisions.
"""

from __future__ import annotations

import logging
import posixpath
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from vila2_curate.curation.dedup.components import (
    both_directions,
    mix,
    star_labels,
    star_round,
    unique_labels,
)
from vila2_curate.pipelines.engine.aggregate import shard_label, split_by_values
from vila2_curate.pipelines.engine.workdir import seg_dir, write_shard_decisions
from vila2_curate.pipelines.io.parquet_read import read_parquet
from vila2_curate.pipelines.io.writers.atomic import write_parquet_atomic
from vila2_curate.schemas.stage import NODE_COL, NODE_SHARD_BITS, SHARD_COL

log = logging.getLogger(__name__)

MAX_ROUNDS = 64  # large-star / small-star needs O(log^2 n) rounds at worst; ~2 log2(n) in practice
GROUP_COL = "_group"  # the engine's group key: partition % P in step 2, (layer, node) or component % P after
_SHIFT = np.int64(NODE_SHARD_BITS)
_STATS = pa.schema([pa.field("rows", pa.int64()), pa.field("violations", pa.int64()),
                    pa.field("components", pa.int64()), pa.field("largest", pa.int64()),
                    pa.field("largest_root", pa.int64()), pa.field("large", pa.int64())])


def components_dir(root: str, seg: int) -> str:
    return posixpath.join(seg_dir(root, seg), "components")


def _bucket_dir(folder: str, bucket: int) -> str:
    return posixpath.join(folder, f"b{bucket:06d}")


def write_buckets(fs, folder: str, name: str, table: pa.Table, buckets: np.ndarray) -> None:
    """``table`` split by ``buckets`` (one value per row) into ``folder/b<bucket>/<name>.parquet``."""
    for bucket, part in split_by_values(table, buckets):
        write_parquet_atomic(fs, posixpath.join(_bucket_dir(folder, bucket), f"{name}.parquet"), part)


def read_bucket(fs, folder: str, bucket: int) -> pa.Table | None:
    """Every file of one bucket, concatenated (None when there are none)."""
    where = _bucket_dir(folder, bucket)
    if not fs.exists(where):
        return None
    tables = [read_parquet(fs, p) for p in sorted(fs.find(where)) if p.endswith(".parquet")]
    tables = [t for t in tables if t.num_rows]
    return pa.concat_tables(tables) if tables else None


def _spread(values: np.ndarray, n: int) -> np.ndarray:
    return (mix(values) % np.uint64(n)).astype(np.int64)


def _stats(**values: int) -> pa.Table:
    return pa.table({f.name: pa.array([int(values.get(f.name, 0))], f.type) for f in _STATS}, schema=_STATS)


def _group_name(rows: pa.Table) -> str:
    return f"g{int(rows.column(GROUP_COL)[0].as_py())}"


# ---- step 2 into files ----------------------------------------------------------------------------------
class EdgesToBuckets:
    """One step-2 group: ``decide_partition``, its edges written per a-endpoint shard."""

    def __init__(self, fs, folder: str, stage: Any) -> None:
        self.fs, self.folder, self.stage = fs, folder, stage

    def __call__(self, rows: pa.Table) -> pa.Table:
        name = _group_name(rows)
        edges = self.stage.decide_partition(rows.drop_columns([GROUP_COL]))
        if edges.num_rows:
            a = edges.column(f"a_{NODE_COL}").to_numpy(zero_copy_only=False).astype(np.int64)
            write_buckets(self.fs, self.folder, name, edges, a >> _SHIFT)
        return _stats(rows=edges.num_rows)


class _ShardStep:
    """A per-shard step of the combine: the run's folder, the stage, its shards' signatures, the buckets."""

    def __init__(self, fs, root: str, seg: int, stage: Any, load_signatures: Callable, buckets: int) -> None:
        self.fs, self.stage, self.load_signatures, self.buckets = fs, stage, load_signatures, buckets
        self.base = components_dir(root, seg)


class ConfirmA(_ShardStep):
    """Per shard: its edges' ready part becomes layer edges; pending candidates get a's payload and go
    to the shard of their b-endpoint."""

    def __call__(self, item) -> int:
        base = self.base
        edges = read_bucket(self.fs, posixpath.join(base, "edges"), item.index)
        if edges is None:
            return 0
        ready, pending = self.stage.split_pending(edges)
        _write_layers(self.fs, base, self.stage.component_edges(ready), f"ready{item.index}", self.buckets)
        if pending.num_rows:
            half = self.stage.attach_pending(pending, self.load_signatures(item), "a")
            b = half.column(f"b_{NODE_COL}").to_numpy(zero_copy_only=False).astype(np.int64)
            write_buckets(self.fs, posixpath.join(base, "pending"), f"a{item.index}", half, b >> _SHIFT)
        return edges.num_rows


class ConfirmB(_ShardStep):
    """Per shard: pending candidates whose b-endpoint it holds get b's payload and are confirmed."""

    def __call__(self, item) -> int:
        base = self.base
        half = read_bucket(self.fs, posixpath.join(base, "pending"), item.index)
        if half is None:
            return 0
        confirmed = self.stage.confirm_pending(self.stage.attach_pending(half, self.load_signatures(item), "b"))
        _write_layers(self.fs, base, self.stage.component_edges(confirmed), f"confirmed{item.index}",
                      self.buckets)
        return confirmed.num_rows


def _write_layers(fs, base: str, layers: pa.Table, name: str, buckets: int) -> None:
    """Layer edges into round 0's buckets (spread by the larger node: any bucket would do)."""
    if layers.num_rows:
        write_buckets(fs, posixpath.join(base, "r0"), name, layers,
                      _spread(layers.column("u").to_numpy(zero_copy_only=False), buckets))


# ---- rounds --------------------------------------------------------------------------------------------
class LoadRound:
    """One bucket of a round's edges, both directions, keyed by (layer, node) % groups."""

    def __init__(self, fs, folder: str, groups: int) -> None:
        self.fs, self.folder, self.groups = fs, folder, groups

    def __call__(self, item) -> pa.Table | None:
        edges = read_bucket(self.fs, self.folder, item.index)
        if edges is None:
            return None
        layer, key, other = both_directions(edges)
        group = (mix(layer, key) % np.uint64(self.groups)).astype(np.int64)
        return pa.table({"layer": pa.array(layer, pa.int8()), "key": pa.array(key, pa.int64()),
                         "other": pa.array(other, pa.int64()), GROUP_COL: pa.array(group, pa.int64())})


class StarRound:
    """One group of one round (large-star on even rounds, small-star on odd ones)."""

    def __init__(self, fs, folder: str, large: bool, buckets: int) -> None:
        self.fs, self.folder, self.large, self.buckets = fs, folder, large, buckets

    def __call__(self, rows: pa.Table) -> pa.Table:
        out, violations = star_round(rows.column("layer").to_numpy(zero_copy_only=False).astype(np.int8),
                                     rows.column("key").to_numpy(zero_copy_only=False),
                                     rows.column("other").to_numpy(zero_copy_only=False), self.large)
        write_buckets(self.fs, self.folder, _group_name(rows), out,
                      _spread(out.column("u").to_numpy(zero_copy_only=False), self.buckets))
        return _stats(rows=out.num_rows, violations=violations)


class WriteLabels:
    """Per bucket of the final round: each node's root, sent to the node's own shard."""

    def __init__(self, fs, final: str, labels: str) -> None:
        self.fs, self.final, self.labels = fs, final, labels

    def __call__(self, item) -> int:
        edges = read_bucket(self.fs, self.final, item.index)
        if edges is None:
            return 0
        labels = star_labels(edges)
        nodes = labels.column("node").to_numpy(zero_copy_only=False)
        write_buckets(self.fs, self.labels, f"from{item.index}", labels, nodes >> _SHIFT)
        return labels.num_rows


def connected_components(engine, ctx, base: str, groups: int) -> list[int]:
    """Rounds from the layer edges in ``base/r0`` until a star forest, then each node's root in
    ``base/labels`` (bucket: the node's shard). Returns the edges each round wrote."""
    fs, n = ctx.fs, len(ctx.items)
    rounds, r = [], 0
    while True:
        if r >= MAX_ROUNDS:
            raise RuntimeError(f"connected components still changing after {MAX_ROUNDS} rounds")
        src, dst = posixpath.join(base, f"r{r}"), posixpath.join(base, f"r{r + 1}")
        stats = _sum(engine.group_apply(ctx, ctx.items, LoadRound(fs, src, groups), GROUP_COL,
                                        StarRound(fs, dst, r % 2 == 0, n)))
        rounds.append(stats["rows"])
        if fs.exists(src):
            fs.rm(src, recursive=True)
        r += 1
        if stats["violations"] == 0:  # the round's input was a star forest: its output is the same forest
            break
    engine.per_shard(ctx, ctx.items, WriteLabels(fs, posixpath.join(base, f"r{r}"), posixpath.join(base, "labels")))
    return rounds


# ---- phases -------------------------------------------------------------------------------------------
class LoadMembers:
    """One shard's members of a phase, with their attributes, keyed by component % groups."""

    def __init__(self, fs, base: str, stage: Any, phase: str, earlier: list[str], groups: int,
                 load_signatures: Callable) -> None:
        self.fs, self.base, self.stage, self.phase = fs, base, stage, phase
        self.earlier, self.groups, self.load_signatures = earlier, groups, load_signatures

    def __call__(self, item) -> pa.Table | None:
        labels = read_bucket(self.fs, posixpath.join(self.base, "labels"), item.index)
        if labels is None:
            return None
        labels = unique_labels(labels)
        before = [read_bucket(self.fs, posixpath.join(self.base, "decisions", p), item.index) for p in self.earlier]
        before = [t for t in before if t is not None]
        members = self.stage.phase_members(self.phase, labels, self.load_signatures(item),
                                           pa.concat_tables(before) if before else None)
        if members is None or members.num_rows == 0:
            return None
        root = members.column("root").to_numpy(zero_copy_only=False)
        return members.append_column(GROUP_COL, pa.array(_spread(root, self.groups), pa.int64()))


class DecideComponents:
    """One group of a phase: its components decided, each member's row sent to the member's shard."""

    def __init__(self, fs, folder: str, stage: Any, phase: str) -> None:
        self.fs, self.folder, self.stage, self.phase = fs, folder, stage, phase

    def __call__(self, rows: pa.Table) -> pa.Table:
        name = _group_name(rows)
        members = rows.drop_columns([GROUP_COL])
        decided = self.stage.decide_components(self.phase, members)
        nodes = decided.column(NODE_COL).to_numpy(zero_copy_only=False)
        write_buckets(self.fs, self.folder, name, decided, nodes >> _SHIFT)
        counts = pc.value_counts(members.column("root"))
        sizes = counts.field("counts").to_numpy()
        big = int(np.argmax(sizes)) if len(sizes) else 0
        return _stats(rows=decided.num_rows, components=len(sizes), largest=sizes[big] if len(sizes) else 0,
                      largest_root=counts.field("values")[big].as_py() if len(sizes) else -1,
                      large=int((sizes >= self.stage.large_component).sum()))


class WriteDecisions:
    """Per shard: its members' decisions of every phase, merged and stored as the shard's decisions."""

    def __init__(self, fs, root: str, seg: int, seg_hash: str, stage: Any, phases: tuple[str, ...]) -> None:
        self.fs, self.root, self.seg, self.seg_hash, self.stage, self.phases = fs, root, seg, seg_hash, stage, phases

    def __call__(self, item) -> int:
        base = components_dir(self.root, self.seg)
        parts = [read_bucket(self.fs, posixpath.join(base, "decisions", p), item.index) for p in self.phases]
        merged = self.stage.merge_decisions([p for p in parts if p is not None])
        return write_shard_decisions(self.fs, self.root, self.seg, item.shard, merged, self.seg_hash)


# ---- the driver -----------------------------------------------------------------------------------------
def combine_on_engine(engine, ctx, seg: int, seg_hash: str, stage: Any, groups: int, load_signatures: Callable,
                      load_partition_rows: Callable) -> tuple[int, dict[str, Any]]:
    """Steps 2-4 of the partitioned decide with step 3 on the engine; returns (decision rows written,
    what the summary reports: rounds, components and the largest per phase; no timings, which go to
    timings.json: a resumed run writes the same summary)."""
    fs, root = ctx.fs, ctx.root
    base = components_dir(root, seg)
    if fs.exists(base):  # left by an interrupted run
        fs.rm(base, recursive=True)
    n = len(ctx.items)
    edge_stats = engine.group_apply(ctx, ctx.items, load_partition_rows, GROUP_COL,
                                    EdgesToBuckets(fs, posixpath.join(base, "edges"), stage))
    engine.per_shard(ctx, ctx.items, ConfirmA(fs, root, seg, stage, load_signatures, n))
    engine.per_shard(ctx, ctx.items, ConfirmB(fs, root, seg, stage, load_signatures, n))
    rounds = connected_components(engine, ctx, base, groups)
    phases = tuple(stage.component_phases())
    report: dict[str, Any] = {}
    for i, phase in enumerate(phases):
        load = LoadMembers(fs, base, stage, phase, list(phases[:i]), groups, load_signatures)
        stats = engine.group_apply(ctx, ctx.items, load, GROUP_COL,
                                   DecideComponents(fs, posixpath.join(base, "decisions", phase), stage, phase))
        report[phase] = _phase_report(stats, ctx)
    counts = engine.per_shard(ctx, ctx.items, WriteDecisions(fs, root, seg, seg_hash, stage, phases))
    if fs.exists(base):
        fs.rm(base, recursive=True)
    summary = {"components": {
        "edges": int(sum(int(s.column("rows")[0].as_py()) for s in edge_stats if s is not None)),
        "rounds": len(rounds), "round_edges": rounds,
        "phases": report, "large_component": stage.large_component,
    }}
    large = {p: v["large"] for p, v in report.items() if v["large"]}
    if large:
        log.warning("%s: components of %d members or more (a constant hash or a boilerplate caption?): %s",
                    stage.name, stage.large_component, large)
    return sum(counts), summary


def _sum(stats: list[pa.Table]) -> dict[str, int]:
    stats = [s for s in stats if s is not None and s.num_rows]
    if not stats:
        return {f.name: 0 for f in _STATS}
    t = pa.concat_tables(stats)
    return {c: int(pc.sum(t.column(c)).as_py() or 0) for c in ("rows", "violations", "components", "large")}


def _phase_report(stats: list[pa.Table], ctx) -> dict[str, Any]:
    """Components and the largest one of a phase; the largest named by its root's shard and row."""
    stats = [s for s in stats if s is not None and s.num_rows]
    if not stats:
        return {"components": 0, "members": 0, "largest": 0, "large": 0}
    t = pa.concat_tables(stats)
    i = int(pc.index(t.column("largest"), pc.max(t.column("largest"))).as_py())
    root = int(t.column("largest_root")[i].as_py())
    item = ctx.items[root >> NODE_SHARD_BITS]
    return {"components": int(pc.sum(t.column("components")).as_py()),
            "members": int(pc.sum(t.column("rows")).as_py()),
            "largest": int(t.column("largest")[i].as_py()),
            "largest_at": {SHARD_COL: shard_label(item.shard),
                           "row": root & ((1 << NODE_SHARD_BITS) - 1)},
            "large": int(pc.sum(t.column("large")).as_py())}
