"""caption_hygiene cost: the stage (every rule) against bare ``ftfy.fix_text`` (the field's mojibake repair
alone, ftfy's default config) on the same captions, same run.

Captions: the sample generator's alt-text styles with its hostile variants mixed in (1 in 10), so most
captions are clean, as in a crawl. Prints captions/s for both and the stage's cost as a multiple of ftfy's.

    python benchmarks/bench_hygiene.py [--n 20000]
"""

from __future__ import annotations

import argparse

import ftfy
from _common import best_of, report

from vila2_curate.curation.text_hygiene import CaptionHygieneStage
from vila2_curate.pipelines.demo.hostile import HOSTILE_KINDS, hostile_caption
from vila2_curate.schemas.rows import PAIR_SCHEMA, make_table

_BASE = ("Scenic view of a harbour at dusk with fishing boats", "Black ellipse icon on white",
         "HD wallpaper - mountain lake in autumn, Kraków photographer", "A sign that says open daily",
         "Stock photo - image may contain: outdoor", "Vintage poster of a seaside town")


def captions(n: int) -> list[str]:
    out = []
    for i in range(n):
        text = f"{_BASE[i % len(_BASE)]} #{i}"
        if i % 10 == 0:
            text = hostile_caption(HOSTILE_KINDS[(i // 10) % len(HOSTILE_KINDS)], text)[0]
        out.append(text)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20_000)
    args = ap.parse_args()
    texts = captions(args.n)
    table = make_table([{"key": f"k{i}", "source": "b", "shard": "0", "text": t, "quarantined": False}
                        for i, t in enumerate(texts)], PAIR_SCHEMA)
    stage = CaptionHygieneStage()
    t_ftfy = best_of(lambda: [ftfy.fix_text(t) for t in texts])
    t_stage = best_of(lambda: stage(table))
    out = stage(table)
    changed = sum(1 for f in out.column("flags").to_pylist() if f)
    report("caption_hygiene_vs_ftfy", captions=args.n, hostile_share=0.1,
           ftfy_captions_per_s=round(args.n / t_ftfy), stage_captions_per_s=round(args.n / t_stage),
           stage_us_per_caption=round(1e6 * t_stage / args.n, 1), cost_vs_ftfy=round(t_stage / t_ftfy, 2),
           captions_changed=changed)


if __name__ == "__main__":
    main()
