"""Near-duplicate recall and false merges of dedup's defaults vs plain imagehash pHash, in one run.

The evaluation set is pipelines/demo/dedup_eval.py's generator (deterministic per seed): cards, shapes on
backgrounds, products, photo-like textures and simple graphics (one shape, or one line of text, on a plain
background), each with near-duplicate copies (JPEG q35-65, WebP<->JPEG, resize x0.5-0.8, 2-6% crops per
side, crop + JPEG re-encode, combinations) and look-alikes that must not merge (another colour of the same
grey, another background or a tinted one, the shape moved or made larger, other words).

Per seed it prints one JSON line per method: ``ours`` (DedupStage with default DedupConfig: exact +
pHash k=4 + thumbnail neighbours, every candidate confirmed by the colour-aware thumbnail) and the
baseline ``imagehash_phash_k4`` / ``imagehash_phash_k8`` (imagehash.phash of the decoded picture,
Hamming <= k, joined by union-find, the same scoring). ``signature_cpu_ms_per_image`` (DedupStage.signatures:
the thumbnail) and ``decide_cpu_ms_per_image`` are process CPU time. Targets for ours: recall >= 0.98 and
0 merged pictures. Ours takes its thumbnails from normalize's decode, as a curation does
(``eval_table``); ``--own-decode``: the dedup stage decodes each image itself (a dedup without normalize
in its segment).
Run: python benchmarks/bench_dedup_recall.py [families] [seeds] [first seed] [--no-baselines] [--own-decode]
"""

from __future__ import annotations

import sys
import time

import pyarrow as pa
from _common import report

from vila2_curate.curation.dedup import DedupStage
from vila2_curate.pipelines.demo.dedup_eval import (
    eval_table,
    groups_of,
    make_dedup_eval,
    phash_baseline_groups,
    score,
)
from vila2_curate.schemas.config import DedupConfig


def bench(families: int, seed: int, baselines: bool = True, own_decode: bool = False) -> None:
    ev = make_dedup_eval(seed, families)
    table = eval_table(ev)
    if own_decode:  # no thumbnail from normalize: the dedup stage decodes each image itself
        table = table.set_column(table.schema.get_field_index("thumb"), "thumb", pa.nulls(table.num_rows, pa.binary()))
    common = {"seed": seed, "families": families, "items": len(ev.items), "lookalike_pairs": len(ev.lookalikes)}
    stage = DedupStage(DedupConfig())
    cpu, wall = time.process_time(), time.perf_counter()
    signatures = stage.signatures(table)
    sig_cpu = time.process_time() - cpu
    cpu = time.process_time()
    decisions = stage.decide(signatures)
    decide_cpu = time.process_time() - cpu
    seconds = time.perf_counter() - wall
    ours = score(ev.items, groups_of(decisions))
    report("dedup_recall", method="ours_own_decode" if own_decode else "ours", **common, **_fields(ours),
           decide_seconds=round(seconds, 2),
           # thumbnails from normalize's decode cost nothing here (normalize made them); own: decode + thumbnail
           signature_cpu_ms_per_image=round(1000 * sig_cpu / len(ev.items), 2),
           decide_cpu_ms_per_image=round(1000 * decide_cpu / len(ev.items), 2),
           target_met=ours["recall"] >= 0.98 and ours["merged_pictures"] == 0)
    if not baselines:
        return
    for k in (4, 8):
        base = score(ev.items, phash_baseline_groups(ev, k))
        report("dedup_recall", method=f"imagehash_phash_k{k}", **common, **_fields(base),
               recall_ratio_ours_vs_baseline=round(ours["recall"] / base["recall"], 3) if base["recall"] else None)


def _fields(s: dict) -> dict:
    return {"near_pairs": s["near_pairs"], "found": s["found"], "recall": round(s["recall"], 4),
            "merged_pictures": s["merged_pictures"], "false_merge_picture_pairs": s["false_merge_picture_pairs"],
            "missed_examples": s["missed"][:5], "merged_examples": s["merged"][:6]}


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    families = int(args[0]) if args else 40
    seeds = int(args[1]) if len(args) > 1 else 3
    first = int(args[2]) if len(args) > 2 else 0
    baselines = "--no-baselines" not in sys.argv
    own = "--own-decode" in sys.argv
    for seed in range(first, first + seeds):
        bench(families, seed, baselines and not own, own)
