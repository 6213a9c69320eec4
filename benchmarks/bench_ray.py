"""Ray Data scaling on a CPU stage: the normalize stage with 2 workers against 1 (target >= 1.7x).

    python benchmarks/bench_ray.py [--n 400]

Same images, same batch size, same local cluster, in one run; the dataset is materialized in the object
store first so that only the stage is timed.
"""

from __future__ import annotations

import argparse
import os
import time

from _common import photo_like_jpegs, report

from vila2_curate.curation.normalize import NormalizeStage
from vila2_curate.schemas.rows import PAIR_SCHEMA, make_table


class _Normalize:
    def __init__(self) -> None:
        self.stage = NormalizeStage()

    def __call__(self, batch):
        return self.stage(batch)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--batch", type=int, default=20)
    args = ap.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    images = photo_like_jpegs(args.n, (1280, 720))
    rows = [{"key": f"k{i}", "source": "b", "shard": "0", "image": b, "quarantined": False}
            for i, b in enumerate(images)]
    blocks = [make_table(rows[i:i + args.batch], PAIR_SCHEMA) for i in range(0, len(rows), args.batch)]
    ds = ray.data.from_arrow(blocks).materialize()

    def run(workers: int) -> float:
        t = time.perf_counter()
        out = ds.map_batches(_Normalize, batch_size=args.batch, batch_format="pyarrow", num_cpus=1,
                             compute=ray.data.ActorPoolStrategy(size=workers)).materialize()
        assert out.count() == args.n
        return time.perf_counter() - t

    run(1)  # warm-up: worker processes and imports
    t1 = min(run(1) for _ in range(2))
    t2 = min(run(2) for _ in range(2))
    report("ray_normalize_2_workers_vs_1", images=args.n, one_worker_s=round(t1, 2), two_workers_s=round(t2, 2),
           ratio=round(t1 / t2, 2), target=1.7, cpus=os.cpu_count())
    ray.shutdown()


if __name__ == "__main__":
    main()
