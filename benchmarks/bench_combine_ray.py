"""Dedup's decide with the combine on the engine, run by the Ray engine: the largest worker task of each
step, beside the same run on the local engine's reference (decisions compared row by row).

``bench_scale.py`` measures every step in a fresh process of its own pool engine. This runs the real
``RayEngine`` (the hash shuffle of Ray tasks, ``per_shard`` tasks) on a local Ray cluster: each task the
engine runs is wrapped so that it starts its worker's peak-RSS counter again (``/proc/self/clear_refs``)
and records the peak it reached into a file, so reused workers still report one task at a time. The
driver's peak is measured the same way around the combine. The signatures are bench_scale's synthetic
ones (same seeds, same shards).

    python benchmarks/bench_combine_ray.py --n 200000 --shard-rows 25000 --stages dedup dedup_captions
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

import bench_scale  # noqa: E402 - the benchmark's own helpers, next to this file


class Measured:
    """A task function that records its own peak RSS (MiB) under ``folder/<step>/``."""

    def __init__(self, fn: Any, step: str, folder: str) -> None:
        self.fn, self.step, self.folder = fn, step, folder

    def __call__(self, arg: Any) -> Any:
        bench_scale._release_free_heap()
        bench_scale._reset_peak()
        result = self.fn(arg)
        os.makedirs(f"{self.folder}/{self.step}", exist_ok=True)
        Path(f"{self.folder}/{self.step}/{uuid.uuid4().hex}").write_text(str(bench_scale._peak_kib()))
        return result


class MeasuredEngine:
    """An engine whose every task records its peak: ``inner``'s primitives with wrapped functions."""

    def __init__(self, inner: Any, folder: str) -> None:
        self.inner, self.folder = inner, folder

    @staticmethod
    def _name(obj: Any) -> str:
        return type(obj).__name__ + (f":{obj.phase}" if hasattr(obj, "phase") else "")

    def per_shard(self, ctx, items, fn):
        return self.inner.per_shard(ctx, items, Measured(fn, self._name(fn), self.folder))

    def group_apply(self, ctx, items, load, key, fn):
        return self.inner.group_apply(ctx, items, Measured(load, self._name(load), self.folder), key,
                                      Measured(fn, self._name(fn), self.folder))

    def decide_groups(self, ctx) -> int:
        return self.inner.decide_groups(ctx)


def run(stage_name: str, n: int, shard_rows: int, work: str) -> dict[str, Any]:
    import fsspec
    import pyarrow as pa

    from vila2_curate.pipelines.engine.components import combine_on_engine
    from vila2_curate.pipelines.engine.group_size import decide_group_count, partition_bytes
    from vila2_curate.pipelines.engine.runner import (
        LoadSignatures,
        RunContext,
        ShardSignatures,
        fit_on_samples,
    )
    from vila2_curate.pipelines.engine.workdir import read_all_decisions
    from vila2_curate.pipelines.executors.ray_data import RayEngine
    from vila2_curate.schemas.config import BeamOptions, RayOptions, RunConfig

    shards = -(-n // shard_rows)
    root, peaks = f"{work}/run", f"{work}/peaks"
    bench_scale._pool_run(2, [(bench_scale.t_write_signatures, (stage_name, n, shard_rows, s, 0, root))
                              for s in range(shards)])
    fs, items = fsspec.filesystem("file"), bench_scale._bench_items(n, shard_rows)
    ctx = RunContext(fs, root, None, RunConfig.model_construct(beam=BeamOptions(), ray=RayOptions()), items)
    engine = MeasuredEngine(RayEngine(progress=False), peaks)
    stage = bench_scale.make_stage(stage_name)
    t0 = time.perf_counter()
    if stage.fits_on_sample:
        fit_on_samples(engine, ctx, 0, stage)
    bench_scale._release_free_heap()
    bench_scale._reset_peak()
    # as the runner sizes them: the engine's count, more when a group would pass decide_group_mb
    partitions = decide_group_count(engine.decide_groups(ctx), partition_bytes(fs, root, 0, stage, items))
    _, summary = combine_on_engine(engine, ctx, 0, "bench", stage, partitions, ShardSignatures(fs, root, 0),
                                   LoadSignatures(fs, root, 0, stage, partitions))
    driver = bench_scale._mib(bench_scale._peak_kib())
    wall = time.perf_counter() - t0
    by_step = {d.name: bench_scale._mib(max(int(f.read_text()) for f in d.iterdir()))
               for d in sorted(Path(peaks).iterdir())}
    got = read_all_decisions(fs, root, 0, [it.shard for it in items])
    sig = pa.concat_tables([bench_scale.signatures(stage_name, n, shard_rows, s, 0) for s in range(shards)])
    from vila2_curate.pipelines.engine.aggregate import decide_local, normalize_decisions

    reference = decide_local(bench_scale.make_stage(stage_name), sig)
    same = bench_scale._sorted_decisions(normalize_decisions(got)).equals(
        bench_scale._sorted_decisions(normalize_decisions(reference)))
    return {"largest_task_peak_mib": max(by_step.values()), "peak_mib_by_step": by_step,
            "driver_combine_peak_mib": driver, "wall_s": round(wall, 1), "partitions": partitions,
            "rounds": summary["components"]["rounds"], "edges": summary["components"]["edges"],
            "decisions": got.num_rows, "identical_decisions": same}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--shard-rows", type=int, default=25_000)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--stages", nargs="*", default=["dedup", "dedup_captions"])
    args = ap.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    with tempfile.TemporaryDirectory(prefix="bench_combine_ray_") as tmp:
        os.environ.setdefault("RAY_TMPDIR", tmp)
        here = str(Path(__file__).parent)  # workers unpickle this file's wrappers
        path = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": path}})
        try:
            for name in args.stages:
                work = tempfile.mkdtemp(dir=tmp)
                line = {"bench": "combine_ray", "stage": name, "rows": args.n, "shard_rows": args.shard_rows,
                        "cpus": args.cpus, **run(name, args.n, args.shard_rows, work)}
                print(json.dumps(line), flush=True)
        finally:
            ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
