"""Near-duplicate recall and false merges of dedup's defaults vs plain imagehash pHash, in one run.

The evaluation set is pipelines/demo/dedup_eval.py's generator (deterministic per seed): cards, shapes on
backgrounds, products and photo-like textures, each with near-duplicate copies (JPEG q35-65,
WebP<->JPEG, resize x0.5-0.8, 1-5% crops per side, combinations) and look-alikes that must not merge
(another colour of the same grey, another background, the shape moved, other words).

Per seed it prints one JSON line per method: ``ours`` (DedupStage with default DedupConfig: exact +
pHash k=4 + thumbnail neighbours, every candidate confirmed by the colour-aware thumbnail) and the
baseline ``imagehash_phash_k4`` / ``imagehash_phash_k8`` (imagehash.phash of the decoded picture,
Hamming <= k, joined by union-find, the same scoring). Targets for ours: recall >= 0.97 and 0 merged
pictures. Run: python benchmarks/bench_dedup_recall.py [families] [seeds] [first seed]
"""

from __future__ import annotations

import sys
import time

from _common import report

from vila2_curate.pipelines.demo.dedup_eval import (
    dedup_groups,
    eval_table,
    make_dedup_eval,
    phash_baseline_groups,
    score,
)
from vila2_curate.schemas.config import DedupConfig


def bench(families: int, seed: int) -> None:
    ev = make_dedup_eval(seed, families)
    table = eval_table(ev)
    common = {"seed": seed, "families": families, "items": len(ev.items), "lookalike_pairs": len(ev.lookalikes)}
    t = time.perf_counter()
    ours = score(ev.items, dedup_groups(table, DedupConfig()))
    seconds = time.perf_counter() - t
    report("dedup_recall", method="ours", **common, **_fields(ours), decide_seconds=round(seconds, 2),
           target_met=ours["recall"] >= 0.97 and ours["merged_pictures"] == 0)
    for k in (4, 8):
        base = score(ev.items, phash_baseline_groups(ev, k))
        report("dedup_recall", method=f"imagehash_phash_k{k}", **common, **_fields(base),
               recall_ratio_ours_vs_baseline=round(ours["recall"] / base["recall"], 3) if base["recall"] else None)


def _fields(s: dict) -> dict:
    return {"near_pairs": s["near_pairs"], "found": s["found"], "recall": round(s["recall"], 4),
            "merged_pictures": s["merged_pictures"], "false_merge_picture_pairs": s["false_merge_picture_pairs"],
            "missed_examples": s["missed"][:5], "merged_examples": s["merged"][:6]}


if __name__ == "__main__":
    families = int(sys.argv[1]) if len(sys.argv) > 1 else 40
    seeds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    first = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    for seed in range(first, first + seeds):
        bench(families, seed)
