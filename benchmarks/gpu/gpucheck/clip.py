"""clipscore: ClipScoreStage on the engine's batch path vs the bare open_clip model on the same batches.

Bare = per batch, ready pixel tensors and token ids (decoded, preprocessed and tokenized before the
clock starts, held in page-locked memory) copied to the device, ``encode_image`` + ``encode_text``,
normalised, cosine; one read-back at the end. The stage does all of that plus JPEG decoding and
preprocessing (its thread pool), tokenizing, Arrow in and out and lineage. A ratio near 1 means that
work stays hidden behind the GPU; the stage's rate includes decoding.
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


def check(ctx: Ctx) -> dict[str, Any]:
    import torch

    from vila2_curate.curation.clipscore import ClipScoreStage
    from vila2_curate.curation.models import autocast
    from vila2_curate.pipelines.demo.models import build_demo_clip
    from vila2_curate.schemas.config import ClipScoreConfig, ModelRuntime

    t0 = time.perf_counter()
    size = "tiny" if ctx.tiny else "vit-l-14"
    sizes = [16, 32] if ctx.tiny else [128, 256, 512]
    n = 64 if ctx.tiny else 4096
    folder = build_demo_clip(ctx.work / "clip", size=size, device=ctx.build_device)
    jpegs, texts, table = synthetic_pairs(n, ctx.image_size, ctx.cpus)
    rt = ModelRuntime(device=str(ctx.device), precision="bf16", batch_size=sizes[0], cpus=ctx.cpus)
    stage = ClipScoreStage(ClipScoreConfig(model=str(folder), runtime=rt))
    stage.setup()
    build_s = time.perf_counter() - t0
    dev, dtype, net = stage.device, stage.dtype, stage._bundle.model
    cuda = dev.type == "cuda"

    decode = timed(lambda: list(stage._pool.map(stage._load_image, jpegs)), dev)
    pixels = torch.stack(decode.value)
    tokens = stage._bundle.tokenizer(texts)
    if cuda:  # page-locked once; the batches below are views of it
        pixels, tokens = pixels.pin_memory(), tokens.pin_memory()

    def set_batch(b: int) -> None:
        stage.cfg = stage.cfg.model_copy(update={"runtime": rt.model_copy(update={"batch_size": b})})

    def run_point(b: int) -> dict[str, Any]:
        set_batch(b)
        px = [pixels[s : s + b] for s in range(0, n, b)]
        tk = [tokens[s : s + b] for s in range(0, n, b)]

        def bare(k: int | None = None) -> torch.Tensor:
            outs = []
            for x, t in zip(px[:k], tk[:k], strict=True):
                with torch.inference_mode(), autocast(dev, dtype):
                    fi = net.encode_image(x.to(dev, non_blocking=True))
                    ft = net.encode_text(t.to(dev, non_blocking=True))
                    fi = torch.nn.functional.normalize(fi.float(), dim=-1)
                    ft = torch.nn.functional.normalize(ft.float(), dim=-1)
                    outs.append((fi * ft).sum(-1))
            with torch.inference_mode():
                return torch.cat(outs).cpu()

        engine_path(stage, table.slice(0, min(n, 2 * b)), ctx.rows_per_batch)  # warm-up at this size
        bare(1)
        st = timed(lambda: engine_path(stage, table, ctx.rows_per_batch), dev, sample_util=True)
        check_alive(st.value, "clipscore")
        br = timed(bare, dev, sample_util=True)
        return point(b, n, st, br)

    points = sweep(ctx, "clipscore", sizes, run_point)
    params = sum(p.numel() for p in net.parameters())
    return summary("clipscore", points, unit="images", model=f"open_clip {size} (random weights)",
                   params_m=round(params / 1e6, 1), dtype=str(dtype).replace("torch.", ""), items=n,
                   image_size="x".join(map(str, ctx.image_size)), rows_per_engine_batch=ctx.rows_per_batch,
                   decode_threads=ctx.cpus, decode_only_items_per_s=round(n / decode.seconds, 1),
                   build_s=round(build_s, 1))
