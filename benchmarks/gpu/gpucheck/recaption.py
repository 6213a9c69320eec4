"""recaption: RecaptionStage (transformers backend) on the engine's batch path vs bare ``generate``.

Every sample generates exactly ``new_tokens`` tokens (``fixed_new_tokens``: min == max), so random
weights cannot end a caption early and both sides do the same work. Bare = ``model.generate`` over the
very batches the backend forms (sorted by prompt length, cut by memory, at most ``batch_size``), their
processor inputs built before the clock starts. The stage adds image decoding, prompt choice, the
processor (on its prepare thread), token decoding, caption clean-up and lineage. The sweep's
``batch_size`` is the backend's upper bound; ``batches`` lists the sizes memory let it form.
"""

from __future__ import annotations

import time
from typing import Any

from gpucheck.context import Ctx, sweep
from gpucheck.measure import (
    check_alive,
    engine_path,
    point,
    summary,
    synthetic_pairs,
    timed,
)

GIB = 1 << 30


def check(ctx: Ctx, new_tokens: int) -> dict[str, Any]:
    import torch

    from vila2_curate.pipelines.demo.vlm import build_demo_vlm
    from vila2_curate.recaption.runtime import load_image
    from vila2_curate.recaption.stage import RecaptionStage
    from vila2_curate.schemas.config import CaptionerConfig, GenerationParams, ModelRuntime, RecaptionConfig

    t0 = time.perf_counter()
    size = "tiny" if ctx.tiny else "llava-1.5-7b"
    sizes = [4, 8] if ctx.tiny else [32, 64, 128]
    n = 16 if ctx.tiny else 128
    max_side = 64 if ctx.tiny else 336
    folder = build_demo_vlm(ctx.work / "vlm", size=size, device=ctx.build_device)
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()
    jpegs, _, table = synthetic_pairs(n, ctx.image_size, ctx.cpus)
    rt = ModelRuntime(device=str(ctx.device), precision="bf16", batch_size=sizes[0], cpus=ctx.cpus)
    cap_cfg = CaptionerConfig(model=str(folder), image_max_side=max_side, runtime=rt,
                              generation=GenerationParams(max_new_tokens=new_tokens))
    stage = RecaptionStage(RecaptionConfig(round=1, captioner=cap_cfg), run_started_at="2025-01-01T00:00:00Z")
    stage.setup()
    backend = stage.backend
    backend.fixed_new_tokens = new_tokens
    build_s = time.perf_counter() - t0
    dev, model = backend.device, backend.model

    keys = table.column("key").to_pylist()
    images = [load_image(b, max_side) for b in jpegs]
    prompts = [stage.prompt_set.choose(cap_cfg.generation.seed, k)[1] for k in keys]
    lengths = [backend._length(p, im) for p, im in zip(prompts, images, strict=True)]
    gen_cfg = backend.generation_config(new_tokens)
    engine_path(stage, table.slice(0, 2), ctx.rows_per_batch)  # warm-up: kernels, allocator

    def run_point(b: int) -> dict[str, Any]:
        backend.cfg = backend.cfg.model_copy(update={"runtime": rt.model_copy(update={"batch_size": b})})
        chunks = backend._batches(lengths, [True] * n, new_tokens)
        inputs = [backend._encode([images[i] for i in c], [backend._render(prompts[i], True) for i in c])
                  for c in chunks]

        def bare(k: int | None = None) -> None:
            for inp in inputs[:k]:
                with torch.inference_mode():
                    model.generate(**backend._to_device(inp), generation_config=gen_cfg)

        if ctx.tiny:  # warm-up per size; on a GPU the one before the sweep is enough (7B: seconds each)
            engine_path(stage, table.slice(0, b), ctx.rows_per_batch)
            bare(1)
        st = timed(lambda: engine_path(stage, table, ctx.rows_per_batch), dev, sample_util=True)
        check_alive(st.value, "recaption")
        br = timed(bare, dev, sample_util=True)
        return point(b, n, st, br, tokens=n * new_tokens, extra={"batches": [len(c) for c in chunks]})

    points = sweep(ctx, "recaption", sizes, run_point)
    budget = backend.memory_budget
    params = sum(p.numel() for p in model.parameters())
    return summary("recaption", points, unit="images", model=f"LLaVA {size} (random weights)",
                   params_m=round(params / 1e6, 1), dtype=str(backend.dtype).replace("torch.", ""), items=n,
                   new_tokens_per_item=new_tokens, image_max_side=max_side,
                   memory_budget_gib=None if budget is None else round(budget / GIB, 1),
                   prompt_tokens=[min(lengths), max(lengths)], rows_per_engine_batch=ctx.rows_per_batch,
                   build_s=round(build_s, 1))
