"""Recaption throughput, as ratios against baselines measured in the same run (random "bench" LLaVA).

1. Batched generation (runtime.batch_size) vs batch size 1, same model and images: generated tokens/s.
   Target >= 3x.
2. RecaptionStage (decode, prompt choice, batching by prompt length, clean-up, lineage) vs a bare
   processor + ``model.generate`` loop over the same images, prompts and batch size. Target >= 0.9x.

Every sample generates exactly ``--tokens`` tokens (min_new_tokens == max_new_tokens) so the runs do the
same work whatever the random weights emit.
"""

from __future__ import annotations

import argparse
import functools
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from _common import photo_like_jpegs, report  # noqa: E402


def interleaved_best(fns: list, repeats: int) -> list[float]:
    """Best wall time of each function, run round-robin: load changes on a shared machine hit all alike."""
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for j, fn in enumerate(fns):
            t = time.perf_counter()
            fn()
            best[j] = min(best[j], time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import torch
    from transformers.utils import logging as hf_logging

    from vila2_curate.pipelines.demo.vlm import build_demo_vlm
    from vila2_curate.recaption.backends.transformers_vlm import TransformersCaptioner
    from vila2_curate.recaption.runtime import load_image
    from vila2_curate.recaption.stage import RecaptionStage
    from vila2_curate.schemas.config import CaptionerConfig, GenerationParams, ModelRuntime, RecaptionConfig
    from vila2_curate.schemas.rows import PAIR_SCHEMA, make_table

    hf_logging.disable_progress_bar()
    n, bs, tokens = args.images, args.batch_size, args.tokens
    with tempfile.TemporaryDirectory(prefix="bench-recaption-") as tmp:
        folder = build_demo_vlm(tmp, seed=0, size="bench")
        jpegs = photo_like_jpegs(n, size=(320, 240))

        def cap_cfg(batch_size: int) -> CaptionerConfig:
            return CaptionerConfig(
                model=str(folder),
                image_max_side=256,
                runtime=ModelRuntime(batch_size=batch_size),
                generation=GenerationParams(max_new_tokens=tokens),
            )

        # 1. batched vs batch size 1 (same loaded model)
        cap = TransformersCaptioner(cap_cfg(bs))
        cap.load()
        one = TransformersCaptioner(cap_cfg(1))
        one.__dict__.update({k: v for k, v in cap.__dict__.items() if k != "cfg"})  # share model + processor
        images = [load_image(b, 256) for b in jpegs]
        prompts = ["Describe this image in detail."] * n
        gen = functools.partial(cap.generate, images, prompts, min_new_tokens=tokens)
        gen1 = functools.partial(one.generate, images, prompts, min_new_tokens=tokens)
        gen()  # warm-up
        t_b, t_1 = interleaved_best([gen, gen1], args.repeats)
        total = n * tokens

        # 2. stage vs bare generate loop, same batch size, prompts and images
        cfg = RecaptionConfig(round=1, captioner=cap_cfg(bs))
        stage = RecaptionStage(cfg, run_started_at="2025-01-01T00:00:00Z")
        stage.backend, stage.demo = cap, True  # the loaded model; the stage's own code path otherwise
        cap_generate = cap.generate
        cap.generate = functools.partial(cap_generate, min_new_tokens=tokens)
        keys = [f"k{i:04d}" for i in range(n)]
        table = make_table(
            [
                {"key": k, "source": "b", "shard": "s", "image": b, "text": "alt"}
                for k, b in zip(keys, jpegs, strict=True)
            ],
            PAIR_SCHEMA,
        )
        stage_prompts = [stage.prompt_set.choose(0, k)[1] for k in keys]
        proc, model = cap.processor, cap.model
        gc = cap.generation_config(tokens)

        def bare() -> list[str]:
            out = []
            for s in range(0, n, bs):
                ims = [load_image(b, 256) for b in jpegs[s : s + bs]]
                texts = [cap._render(p, True) for p in stage_prompts[s : s + bs]]
                inputs = proc(images=ims, text=texts, padding=True, padding_side="left", return_tensors="pt")
                with torch.inference_mode():
                    ids = model.generate(**inputs, generation_config=gc)
                out += proc.batch_decode(ids[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            return out

        t_bare, t_stage = interleaved_best([bare, lambda: stage(table)], args.repeats)
        cap.generate = cap_generate

    report(
        "recaption",
        device="cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name(),
        torch_threads=torch.get_num_threads(),
        images=n,
        batch_size=bs,
        new_tokens_per_sample=tokens,
        batched_tokens_per_s=round(total / t_b, 1),
        batch1_tokens_per_s=round(total / t_1, 1),
        batched_vs_batch1=round(t_1 / t_b, 2),
        stage_images_per_s=round(n / t_stage, 2),
        bare_generate_images_per_s=round(n / t_bare, 2),
        stage_vs_bare=round(t_bare / t_stage, 3),
        measured_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )


if __name__ == "__main__":
    main()
