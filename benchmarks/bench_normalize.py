"""normalize images/s with JPEG draft decoding against full decoding (target >= 2x), same images, same run.

    python benchmarks/bench_normalize.py [--n 200] [--size 1280x720]
"""

from __future__ import annotations

import argparse

from _common import best_of, photo_like_jpegs, report

from vila2_curate.curation.normalize import NormalizeStage
from vila2_curate.schemas.config import NormalizeConfig
from vila2_curate.schemas.rows import PAIR_SCHEMA, make_table


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--size", default="1280x720")
    args = ap.parse_args()
    w, h = map(int, args.size.split("x"))
    images = photo_like_jpegs(args.n, (w, h))
    table = make_table([{"key": f"k{i}", "source": "b", "shard": "0", "image": b, "quarantined": False}
                        for i, b in enumerate(images)], PAIR_SCHEMA)
    full, draft = NormalizeStage(NormalizeConfig(draft=False)), NormalizeStage(NormalizeConfig(draft=True))
    t_full = best_of(lambda: full(table))
    t_draft = best_of(lambda: draft(table))
    a, b = full(table).column("phash").to_pylist(), draft(table).column("phash").to_pylist()
    dist = [bin(x ^ y).count("1") for x, y in zip(a, b, strict=True)]
    report("normalize_draft_vs_full", images=args.n, size=args.size,
           full_images_per_s=round(args.n / t_full, 1), draft_images_per_s=round(args.n / t_draft, 1),
           ratio=round(t_full / t_draft, 2), target=2.0,
           phash_hamming_mean=round(sum(dist) / len(dist), 2), phash_hamming_max=max(dist))


if __name__ == "__main__":
    main()
