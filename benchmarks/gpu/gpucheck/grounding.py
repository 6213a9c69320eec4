"""grounding: GroundingStage (OWLv2) on the engine's batch path vs the bare detector forward.

Bare = per batch, the model's inputs (pixels and token ids made before the clock starts, page-locked)
copied to the device, ``model(**inputs)``, logits and boxes read back. The stage adds decoding, the
noun-phrase chunker, the processor (its threads, batches ahead; on a GPU the image part runs on the
device), post-processing (while the next batch runs), NMS and the specialists struct.
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

    from vila2_curate.pipelines.demo.detector import build_demo_detector
    from vila2_curate.schemas.config import GroundingConfig, ModelRuntime
    from vila2_curate.specialists._common import decode_image
    from vila2_curate.specialists.grounding import GroundingStage
    from vila2_curate.specialists.phrases import noun_phrases

    t0 = time.perf_counter()
    size = "tiny" if ctx.tiny else "owlv2-base-16"
    sizes = [4, 8] if ctx.tiny else [8, 16, 32]
    n = 16 if ctx.tiny else 256
    folder = build_demo_detector(ctx.work / "owlv2", size=size, device=ctx.build_device)
    jpegs, texts, table = synthetic_pairs(n, ctx.image_size, ctx.cpus)
    rt = ModelRuntime(device=str(ctx.device), precision="bf16", batch_size=sizes[0], cpus=ctx.cpus)
    # tiny: every box, so post-processing runs; full size: the default threshold (the demo head is calibrated)
    cfg = GroundingConfig(model=str(folder), runtime=rt, **({"box_threshold": 0.0} if ctx.tiny else {}))
    stage = GroundingStage(cfg)
    stage.setup()
    build_s = time.perf_counter() - t0
    det = stage._detector
    dev = det.device
    images = [decode_image(b) for b in jpegs]
    phrases = [noun_phrases(t, cfg.max_phrases) for t in texts]
    engine_path(stage, table.slice(0, 2), ctx.rows_per_batch)  # warm-up

    def run_point(b: int) -> dict[str, Any]:
        stage.cfg = cfg.model_copy(update={"runtime": rt.model_copy(update={"batch_size": b})})
        prepared = [det.prepare(images[s : s + b], phrases[s : s + b]) for s in range(0, n, b)]
        ready = [{k: v.cpu() for k, v in det.to_device(p).items()} for p in prepared]  # pixels made
        if dev.type == "cuda":
            ready = [{k: v.pin_memory() for k, v in r.items()} for r in ready]

        def bare(k: int | None = None) -> None:
            for inputs in ready[:k]:
                with torch.inference_mode():
                    out = det.model(**{key: v.to(dev, non_blocking=True) for key, v in inputs.items()})
                    out.logits.float().cpu(), out.pred_boxes.float().cpu()

        engine_path(stage, table.slice(0, b), ctx.rows_per_batch)  # warm-up at this size
        bare(1)
        st = timed(lambda: engine_path(stage, table, ctx.rows_per_batch), dev, sample_util=True)
        check_alive(st.value, "grounding")
        br = timed(bare, dev, sample_util=True)
        return point(b, n, st, br)

    points = sweep(ctx, "grounding", sizes, run_point)
    params = sum(p.numel() for p in det.model.parameters())
    return summary("grounding", points, unit="images", model=f"OWLv2 {size} (random weights)",
                   params_m=round(params / 1e6, 1), dtype=str(det.dtype).replace("torch.", ""), items=n,
                   image_size="x".join(map(str, ctx.image_size)), prepare_threads=ctx.cpus,
                   image_processor_on_device=det.images_on_device, box_threshold=cfg.box_threshold,
                   rows_per_engine_batch=ctx.rows_per_batch, build_s=round(build_s, 1))
