"""deltaloss: DeltaLossScoreStage (small + large causal LM) on the engine's batch path vs the bare models.

Bare = for each model, per batch (the stage's own batches: longest first, ``batch_size`` each), ready
left-padded ids, mask and positions copied to the device, the forward pass and the per-row mean token
log-probability (the same arithmetic as the stage, chunked the same way); one read-back at the end.
The stage adds tokenizing, padding, Arrow in and out.
"""

from __future__ import annotations

import time
from typing import Any

from gpucheck.context import Ctx, sweep
from gpucheck.measure import captions, check_alive, engine_path, pair_table, point, summary, timed


def _padded(scorer: Any, texts: list[str], b: int, pin: bool) -> list[tuple[Any, Any, Any]]:
    """The stage's batches of ``texts`` as (ids, mask, positions) CPU tensors."""
    import torch

    seqs = sorted((ids for ids in scorer.encode(texts) if len(ids) >= 2), key=len, reverse=True)
    out = []
    for s in range(0, len(seqs), b):
        chunk = seqs[s : s + b]
        width = max(len(q) for q in chunk)
        ids = torch.full((len(chunk), width), scorer.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, q in enumerate(chunk):
            ids[r, width - len(q) :] = torch.tensor(q)
            mask[r, width - len(q) :] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        out.append(tuple(t.pin_memory() if pin else t for t in (ids, mask, pos)))
    return out


def _bare_scores(model: Any, batches: list[tuple[Any, Any, Any]], device: Any, budget: int) -> list[Any]:
    import torch

    outs = []
    with torch.inference_mode():
        for ids, mask, pos in batches:
            ids, mask, pos = (t.to(device, non_blocking=True) for t in (ids, mask, pos))
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
            scored = (mask[:, 1:] * mask[:, :-1]).bool()
            step = max(1, budget // max(1, ids.shape[1] * logits.shape[-1]))
            sums = []
            for r in range(0, ids.shape[0], step):
                lp = logits[r : r + step, :-1].float().log_softmax(-1)
                lp = lp.gather(-1, ids[r : r + step, 1:, None]).squeeze(-1)
                sums.append((lp * scored[r : r + step]).sum(-1, dtype=torch.float64))
            outs.append(torch.cat(sums) / scored.sum(-1))
    return outs


def check(ctx: Ctx) -> dict[str, Any]:
    import torch

    from vila2_curate.curation.deltaloss import _LOGSOFTMAX_BUDGET, DeltaLossScoreStage
    from vila2_curate.pipelines.demo.models import _train_tokenizer, build_demo_lm
    from vila2_curate.schemas.config import DeltaLossConfig, ModelRuntime

    t0 = time.perf_counter()
    small, large = ("small", "large") if ctx.tiny else ("qwen2.5-0.5b", "qwen2.5-1.5b")
    sizes = [16, 32] if ctx.tiny else [64, 128, 256]
    n = 64 if ctx.tiny else 4096
    tok = _train_tokenizer(0)
    folders = [build_demo_lm(ctx.work / s, s, 0, tok, device=ctx.build_device) for s in (small, large)]
    texts = captions(n)
    table = pair_table([b"\xff\xd8"] * n, texts)  # images are not read by this stage
    rt = ModelRuntime(device=str(ctx.device), precision="bf16", batch_size=sizes[0], cpus=ctx.cpus)
    stage = DeltaLossScoreStage(DeltaLossConfig(small_model=str(folders[0]), large_model=str(folders[1]),
                                                max_length=256, runtime=rt))
    stage.setup()
    build_s = time.perf_counter() - t0
    dev = stage.device
    budget = _LOGSOFTMAX_BUDGET.get(dev.type, _LOGSOFTMAX_BUDGET["cpu"])
    engine_path(stage, table.slice(0, 4), ctx.rows_per_batch)  # warm-up

    def run_point(b: int) -> dict[str, Any]:
        stage.small.batch_size = stage.large.batch_size = b
        pads = [_padded(sc, texts, b, dev.type == "cuda") for sc in (stage.small, stage.large)]

        def bare(k: int | None = None) -> list[float]:
            parts = _bare_scores(stage.small.model, pads[0][:k], dev, budget)
            parts += _bare_scores(stage.large.model, pads[1][:k], dev, budget)
            return torch.cat(parts).tolist()

        engine_path(stage, table.slice(0, b), ctx.rows_per_batch)  # warm-up at this size
        bare(1)
        st = timed(lambda: engine_path(stage, table, ctx.rows_per_batch), dev, sample_util=True)
        check_alive(st.value, "deltaloss")
        br = timed(bare, dev, sample_util=True)
        return point(b, n, st, br)

    points = sweep(ctx, "deltaloss", sizes, run_point)
    params = [sum(p.numel() for p in sc.model.parameters()) for sc in (stage.small, stage.large)]
    tokens = sum(len(ids) for ids in stage.small.encode(texts))
    return summary("deltaloss", points, unit="captions", model=f"{small} + {large} (random weights)",
                   params_m=[round(p / 1e6, 1) for p in params], dtype=str(stage.small.model.dtype)
                   .replace("torch.", ""), items=n, mean_tokens_per_item=round(tokens / n, 1),
                   rows_per_engine_batch=ctx.rows_per_batch, build_s=round(build_s, 1))
