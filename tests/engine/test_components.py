"""Dedup's combine on the engine (pipelines/engine/components.py, curation/dedup/components.py): the
large-star / small-star rounds give scipy's connected components on chains, stars and random graphs,
split into any groups and shards, on every engine; the decisions equal the single-process reference
(``DedupStage.decide``) for every method mix, including a component in every shard and one with 100k
members; large components are reported."""

from __future__ import annotations

import posixpath
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from tests.curation.test_partitioned import CONFIGS, _shards, _sorted, synthetic_signatures
from tests.helpers.engine_combine import engine_decisions
from vila2_curate.curation.dedup.components import (
    both_directions,
    mix,
    star_labels,
    star_round,
    unique_labels,
)
from vila2_curate.curation.dedup.stage import SIGNATURE_SCHEMA, DedupStage
from vila2_curate.pipelines.engine.components import connected_components, read_bucket, write_buckets
from vila2_curate.pipelines.executors.local import LocalEngine, signature_context
from vila2_curate.schemas.config import DedupConfig
from vila2_curate.schemas.stage import node_ids


def _scipy_roots(u: np.ndarray, v: np.ndarray) -> dict[int, int]:
    """node -> smallest node of its component, for every node with an edge."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components as cc

    nodes, inv = np.unique(np.r_[u, v], return_inverse=True)
    n = len(nodes)
    g = coo_matrix((np.ones(len(u)), (inv[:len(u)], inv[len(u):])), shape=(n, n))
    labels = cc(g, directed=False)[1]
    smallest = np.full(labels.max() + 1, np.iinfo(np.int64).max)
    np.minimum.at(smallest, labels, nodes)
    return dict(zip(nodes.tolist(), smallest[labels].tolist(), strict=True))


def _edges(u: np.ndarray, v: np.ndarray, layer: int = 0) -> pa.Table:
    return pa.table({"layer": pa.array(np.full(len(u), layer, np.int8)), "u": pa.array(np.maximum(u, v)),
                     "v": pa.array(np.minimum(u, v))})


def _rounds_in_process(edges: pa.Table, groups: int) -> tuple[pa.Table, int]:
    """The rounds with every group run separately (as engine workers would): (labels, rounds)."""
    for r in range(64):
        layer, key, other = both_directions(edges)
        g = (mix(layer, key) % np.uint64(groups)).astype(np.int64)
        outs, bad = [], 0
        for i in range(groups):
            m = g == i
            out, violations = star_round(layer[m], key[m], other[m], large=r % 2 == 0)
            outs.append(out)
            bad += violations
        edges = pa.concat_tables(outs)
        if bad == 0:
            return star_labels(edges), r + 1
    raise AssertionError("no convergence")


def _graphs(rng: np.random.Generator) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    n = 100_000
    ids = rng.permutation(10 * n)[:n].astype(np.int64) + (np.int64(3) << np.int64(32))  # nodes of many shards
    chain = (ids[:-1], ids[1:])
    star = (np.full(n - 1, ids[n // 2]), np.delete(ids, n // 2))
    a, b = rng.integers(0, 5000, 4000), rng.integers(0, 5000, 4000)
    return {"chain": chain, "star": star, "random": (ids[a], ids[b])}


@pytest.mark.parametrize("shape", ["chain", "star", "random"])
def test_star_rounds_give_scipy_components(shape: str) -> None:
    u, v = _graphs(np.random.default_rng(0))[shape]
    expected = _scipy_roots(u, v)
    for groups in (1, 7):
        labels, rounds = _rounds_in_process(_edges(u, v), groups)
        got = dict(zip(labels.column("node").to_pylist(), labels.column("root").to_pylist(), strict=True))
        assert got == expected
        assert rounds <= 2 * int(np.log2(len(expected))) + 4, rounds  # a 100k chain: about log2 n rounds


@pytest.mark.parametrize("engine", ["local", "ray", "beam"])
def test_engine_rounds_on_a_chain_through_every_shard(engine: str, tmp_path: Path, request) -> None:
    """A chain visiting every shard (edges written to buckets of many shards) and a star, on each engine:
    every node of each labelled with its component's smallest node, in its own shard's bucket."""
    if engine == "ray":
        request.getfixturevalue("ray_cluster")
        from vila2_curate.pipelines.executors.ray_data import RayEngine as Engine
    elif engine == "beam":
        pytest.importorskip("apache_beam")
        from vila2_curate.pipelines.executors.beam import BeamEngine as Engine
    shards = 6
    ctx = signature_context([(f"s/{i:03d}", SIGNATURE_SCHEMA.empty_table()) for i in range(shards)], str(tmp_path))
    fs, items = ctx.fs, ctx.items
    rng = np.random.default_rng(1)
    nodes = np.concatenate([node_ids(i, 300) for i in range(shards)])
    chain = rng.permutation(nodes[: 5 * 300])  # the chain hops from shard to shard at random
    star_centre, star_leaves = nodes[5 * 300], nodes[5 * 300 + 1:]
    u = np.r_[chain[:-1], np.full(len(star_leaves), star_centre)]
    v = np.r_[chain[1:], star_leaves]
    base = str(tmp_path / "components")
    write_buckets(fs, posixpath.join(base, "r0"), "edges", _edges(u, v, layer=2), rng.integers(0, shards, len(u)))
    runner_engine = LocalEngine(progress=False) if engine == "local" else Engine()
    rounds = connected_components(runner_engine, ctx, base, groups=4)
    expected = _scipy_roots(u, v)
    got = {}
    for it in items:
        labels = unique_labels(read_bucket(fs, posixpath.join(base, "labels"), it.index))
        nodes_here = labels.column("node").to_numpy()
        assert (nodes_here >> 32 == it.index).all()  # each label in its node's shard
        got.update(zip(nodes_here.tolist(), labels.column("root").to_pylist(), strict=True))
    assert got == expected
    assert len(set(got.values())) == 2 and 2 < len(rounds) < 30


@pytest.fixture(scope="module")
def synthetic() -> pa.Table:
    return synthetic_signatures(2600)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_engine_combine_equals_reference(synthetic: pa.Table, name: str, tmp_path: Path) -> None:
    cfg = CONFIGS[name]
    reference = _sorted(DedupStage(cfg).decide(synthetic))
    for partitions, shards, seed in ((1, 1, 0), (3, 7, 2), (16, 12, 4)):
        got, summary = engine_decisions(LocalEngine(progress=False), DedupStage(cfg),
                                        _shards(synthetic, shards, seed), tmp_path / f"{partitions}-{shards}",
                                        partitions)
        assert _sorted(got) == reference, (partitions, shards)
        assert summary["rounds"] >= 1 and summary["phases"]["image"]["components"] > 0
        assert summary["phases"]["image"]["largest"] >= 2


@pytest.mark.parametrize("engine", ["ray", "beam"])
def test_distributed_engines_combine_equals_reference(synthetic: pa.Table, engine: str, tmp_path: Path,
                                                      request) -> None:
    if engine == "ray":
        request.getfixturevalue("ray_cluster")
        from vila2_curate.pipelines.executors.ray_data import RayEngine as Engine
    else:
        pytest.importorskip("apache_beam")
        from vila2_curate.pipelines.executors.beam import BeamEngine as Engine
    cfg = CONFIGS["text"]
    reference = _sorted(DedupStage(cfg).decide(synthetic))
    got, _ = engine_decisions(Engine(), DedupStage(cfg), _shards(synthetic, 5, 3), tmp_path, 4)
    assert _sorted(got) == reference


def _one_picture_everywhere(n: int, shards: int) -> list[tuple[str, pa.Table]]:
    """``n`` copies of one picture (same sha256) spread over ``shards`` shards, plus unique rows."""
    rows = {"source": ["web"] * (2 * n), "key": [f"k{i:07d}" for i in range(2 * n)], "image_index": [-1] * (2 * n),
            "kind": ["pair"] * (2 * n), "sha256": ["a" * 64] * n + [f"{i:064x}" for i in range(n)],
            "publishable": [True] * (2 * n), "pixels": [(i * 7919) % 1000 for i in range(2 * n)]}
    table = pa.Table.from_pydict({f.name: rows.get(f.name, [None] * (2 * n)) for f in SIGNATURE_SCHEMA},
                                 schema=SIGNATURE_SCHEMA)
    return [(f"web/{s:03d}", table.slice(s * (2 * n // shards), 2 * n // shards)) for s in range(shards)]


def test_a_component_of_100k_members_in_every_shard_is_decided_and_reported(tmp_path: Path) -> None:
    cfg = DedupConfig(methods=["exact"], large_component=50_000)
    shards = _one_picture_everywhere(100_000, 10)
    reference = DedupStage(cfg).decide(pa.concat_tables([s for _, s in shards]))
    got, summary = engine_decisions(LocalEngine(progress=False), DedupStage(cfg), shards, tmp_path, 8)
    assert _sorted(got) == _sorted(reference)
    assert got.num_rows == 100_000 and sum(r is None for r in got.column("drop_reason").to_pylist()) == 1
    image = summary["phases"]["image"]
    assert image["largest"] == 100_000 and image["large"] == 1 and image["components"] == 1
    assert summary["large_component"] == 50_000
