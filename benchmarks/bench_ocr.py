"""OCR images/s of the ocr stage on 720p text images, against a bare RapidOCR loop over the same images.

    python benchmarks/bench_ocr.py [--n 8] [--size 1280x720] [--repeats 2] [--threads 2]

Baselines, measured in the same run on the same PNG bytes:
- ``bare_same_settings``: decode + ``RapidOCR.__call__`` with the stage's detector settings; the ratio
  bare/stage is the stage's own overhead (Arrow in/out, word-box space repair, reading order);
- ``bare_wheel_defaults``: decode + RapidOCR with the wheel's default config (short side scaled to 736),
  what a naive loop would run; the ratio shows what the stage's detector limit buys.
"""

from __future__ import annotations

import argparse
import io
import os

from _common import best_of, report
from PIL import Image, ImageDraw, ImageFont

from vila2_curate.schemas.config import ModelRuntime, OcrConfig
from vila2_curate.schemas.rows import PAIR_SCHEMA, make_table
from vila2_curate.specialists.ocr import DET_LIMIT_SIDE_LEN, DET_LIMIT_TYPE, OcrStage

_WORDS = ("OPEN", "SALE", "COFFEE", "Fresh", "bread", "PARKING", "exit", "Hotel", "MARKET", "garden", "Welcome",
          "daily", "SPECIAL", "books", "Music", "PIZZA")


def text_images(n: int, size: tuple[int, int]) -> tuple[list[bytes], int]:
    """Light backgrounds with 3-5 lines of dark words at 36-56 px; returns PNG bytes and the word count."""
    w, h = size
    out, nwords = [], 0
    for k in range(n):
        img = Image.new("RGB", (w, h), (245 - 3 * k % 20, 245, 240))
        draw = ImageDraw.Draw(img)
        y = 60
        for line in range(3 + k % 3):
            font = ImageFont.load_default(size=36 + 10 * ((k + line) % 3))
            words = [_WORDS[(k * 7 + line * 3 + j) % len(_WORDS)] for j in range(2 + (k + line) % 3)]
            draw.text((60 + 20 * line, y), " ".join(words), font=font, fill=(20, 20, 30))
            nwords += len(words)
            y += int(font.size * 2.2)
            if y > h - 80:
                break
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        out.append(buf.getvalue())
    return out, nwords


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--size", default="1280x720")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    from rapidocr_onnxruntime import RapidOCR

    w, h = map(int, args.size.split("x"))
    images, nwords = text_images(args.n, (w, h))
    table = make_table([{"key": f"k{i}", "source": "b", "shard": "0", "image": b, "quarantined": False}
                        for i, b in enumerate(images)], PAIR_SCHEMA)
    stage = OcrStage(OcrConfig(runtime=ModelRuntime(cpus=args.threads)))
    stage.setup()
    same = RapidOCR(intra_op_num_threads=args.threads, inter_op_num_threads=1,
                    det_limit_type=DET_LIMIT_TYPE, det_limit_side_len=DET_LIMIT_SIDE_LEN)
    wheel = RapidOCR(intra_op_num_threads=args.threads, inter_op_num_threads=1)

    def bare(engine: RapidOCR) -> None:
        for data in images:
            engine(Image.open(io.BytesIO(data)).convert("RGB"))

    first = Image.open(io.BytesIO(images[0])).convert("RGB")
    stage(table.slice(0, 1))  # warm-up: the first ONNX runs allocate their arenas
    same(first)
    wheel(first)
    t_stage = best_of(lambda: stage(table), args.repeats)
    t_same = best_of(lambda: bare(same), args.repeats)
    t_wheel = best_of(lambda: bare(wheel), args.repeats)
    out = stage(table).column("specialists").to_pylist()
    read = sum(len(s["ocr_text"].split()) for s in out)
    report("ocr_stage_vs_bare_rapidocr", images=args.n, size=args.size, threads=args.threads,
           stage_images_per_s=round(args.n / t_stage, 2),
           bare_same_settings_images_per_s=round(args.n / t_same, 2),
           bare_wheel_defaults_images_per_s=round(args.n / t_wheel, 2),
           ratio_stage_vs_bare_same_settings=round(t_same / t_stage, 3),
           ratio_stage_vs_bare_wheel_defaults=round(t_wheel / t_stage, 3),
           words_rendered=nwords, tokens_read=read, engine=stage.engine_tag)


if __name__ == "__main__":
    main()
