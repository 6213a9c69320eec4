"""The distributed engines' exchange (pipelines/engine/exchange.py), run in process with hostile batching:
parts carry no image bytes and no input-only column, any re-batching gives the local engine's bytes, and
every map step's cost reaches timings.json."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from tests.helpers.runs import output_files, write_config
from vila2_curate.pipelines.engine import exchange
from vila2_curate.pipelines.engine.runner import run_engine
from vila2_curate.pipelines.executors.local import LocalEngine, run_local
from vila2_curate.schemas.config import load_config

STAGES = [{"type": "normalize"}, {"type": "caption_hygiene"},
          {"type": "dedup", "methods": ["exact", "phash", "minhash_captions", "minhash_documents"]}]


class ShuffledExchangeEngine(LocalEngine):
    """The Ray/Beam map side in one process: rows of every shard re-batched into random sizes, in a
    random order, so a batch holds rows of several shards and non-adjacent rows of one shard."""

    def __init__(self, seed: int) -> None:
        super().__init__(progress=False)
        self.rng = random.Random(seed)
        self.part_files: list[str] = []

    def map_shards(self, ctx, segment, pending) -> None:
        for stage in segment.stages:
            stage.setup()
        found: dict[int, list[dict]] = {it.index: [] for it in pending}
        shards = [it.shard for it in ctx.items]
        rereadable = [True] * len(shards)
        for kind in ("document", "pair"):  # one row schema per batch, as on Ray and Beam
            blocks = [b for it in pending if it.shard.row_kind == kind
                      for b in exchange.tagged_batches(ctx.fs, ctx.root, ctx.plan, it, segment.index, 7)]
            if not blocks:
                continue
            rows = pa.concat_tables(blocks, promote_options="default")
            order = list(range(rows.num_rows))
            self.rng.shuffle(order)
            rows = rows.take(pa.array(order))
            start = 0
            while start < rows.num_rows:
                size = self.rng.randint(1, 40)
                batch = rows.slice(start, size)
                start += size
                for stage in segment.maps:
                    batch = exchange.run_stage(stage, batch)
                for desc in exchange.write_parts(ctx.fs, ctx.root, segment, batch, shards, rereadable):
                    found[desc["shard_index"]].append(desc)
                    self.part_files += [p for p in (desc["path"], desc["sig_path"]) if p]
                    _assert_no_image_bytes(Path(desc["path"]))
        for it in pending:
            exchange.assemble_shard(ctx.fs, ctx.root, ctx.plan, segment.index, it, found[it.index],
                                 ctx.config.output, ctx.config.batch_size)
        exchange.clear_segment_parts(ctx.fs, ctx.root, segment.index)


def _assert_no_image_bytes(path: Path) -> None:
    """A part holds the computed columns only: no url, no image unless normalize re-encoded it."""
    table = pq.read_table(path)
    assert "url" not in table.column_names and "source_key" not in table.column_names
    if "image" in table.column_names:
        reencoded = pc.fill_null(pc.match_substring(table.column("meta"), '"reencoded"'), False)
        assert pc.all(pc.or_(pc.is_null(table.column("image")), reencoded)).as_py()
    if "image_info" in table.column_names:
        for images in table.column("image_info").to_pylist():
            assert all(im["image"] is None or "reencoded" in (im["meta"] or "") for im in images or [])


@pytest.fixture(scope="module")
def local_plain(sample_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("parts_local")
    run_local(load_config(write_config(sample_dir, tmp / "out", tmp / "run.yaml", stages=STAGES)), progress=False)
    return tmp / "out"


@pytest.mark.parametrize("seed", [0, 1])
def test_shuffled_exchange_gives_the_local_bytes_and_timings(local_plain: Path, sample_dir: Path, tmp_path: Path,
                                                             seed: int):
    engine = ShuffledExchangeEngine(seed)
    cfg = load_config(write_config(sample_dir, tmp_path / "out", tmp_path / "run.yaml", stages=STAGES))
    stats = run_engine(engine, cfg)
    assert stats["balanced"]
    assert any(p.endswith(".sig.parquet") for p in engine.part_files)
    assert output_files(tmp_path / "out") == output_files(local_plain)
    assert not (tmp_path / "out" / "_work" / "seg0" / "parts").exists()
    mine, ref = (json.loads((p / "timings.json").read_text()) for p in (tmp_path / "out", local_plain))
    assert sorted(mine["stages"]) == sorted(ref["stages"])
    for name, t in ref["stages"].items():  # every row counted once per step, whatever the batching
        assert mine["stages"][name]["rows"] == t["rows"], name
        assert mine["stages"][name]["seconds"] > 0, name
        assert mine["stages"][name]["cpu_seconds"] > 0 or name.endswith("_decide"), name  # a decide: wall only
    assert sorted(mine["exchange"]) == ["exchange_read", "exchange_write"] and "exchange" not in ref


def test_costs_sum_exactly_across_splits():
    batch = pa.table({"x": list(range(10))})
    batch = exchange.add_cost(exchange.add_cost(batch, "a", 2.0, gpus=0.5, cpu_seconds=1.5), "a", 1.0)
    halves = [batch.slice(0, 3), batch.slice(3)]
    sums = [exchange.pop_costs(h)[1] for h in halves]
    total = {k: sum(s["a"][k] for s in sums) for k in ("rows", "seconds", "cpu_seconds", "gpu_seconds")}
    assert total == pytest.approx({"rows": 10, "seconds": 3.0, "cpu_seconds": 1.5, "gpu_seconds": 1.0})
    assert exchange.pop_costs(batch)[0].column_names == ["x"]


def test_signature_rows_pair_repeated_keys_in_order():
    piece = pa.table({"source": ["s"] * 5, "key": ["a", "b", "a", "c", "a"], exchange.ROW_COL: [10, 11, 12, 13, 14]})
    sig = pa.table({"source": ["s"] * 4, "key": ["a", "a", "c", "a"]})
    assert exchange.signature_rows(sig, piece).to_pylist() == [10, 12, 13, 14]
    # a document and its images: several signature rows of one row, in rising image_index
    docs = sig.append_column("image_index", pa.array([-1, 0, -1, -1]))
    assert exchange.signature_rows(docs, piece).to_pylist() == [10, 10, 13, 14]
    with pytest.raises(RuntimeError, match="row order"):
        exchange.signature_rows(pa.table({"source": ["s", "s"], "key": ["c", "b"]}), piece)


def test_overlapping_parts_keep_one_copy_per_row(tmp_path: Path):
    """Two parts that share rows (a retried task that re-batched): each row once, from one part, with
    every signature row of that row (documents give several)."""
    import fsspec

    fs = fsspec.filesystem("file")
    a = pa.table({exchange.ROW_COL: [0, 2, 4], "v": ["a0", "a2", "a4"]})
    b = pa.table({exchange.ROW_COL: [1, 2, 2, 3], "v": ["b1", "b2", "b2'", "b3"]})
    for name, t in (("a", a), ("b", b)):
        pq.write_table(t, tmp_path / f"{name}.parquet")
    descs = [{"path": str(tmp_path / "a.parquet"), "first": 0, "last": 4},
             {"path": str(tmp_path / "b.parquet"), "first": 1, "last": 3}]
    out = pa.concat_tables(list(exchange.assembled_batches(fs, descs, 100)))
    assert out.column("v").to_pylist() == ["a0", "b1", "a2", "b3", "a4"]
    descs.reverse()  # listing order does not matter: parts sort by their row range
    assert pa.concat_tables(list(exchange.assembled_batches(fs, descs, 2))).equals(out)
