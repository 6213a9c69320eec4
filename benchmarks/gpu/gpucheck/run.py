"""Run the stage checks in order within the time budget; one JSON line each, all in one JSON file."""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from gpucheck.context import Ctx

STAGES = ("clipscore", "recaption", "grounding", "deltaloss")
WEIGHTS = {"clipscore": 1.0, "recaption": 2.0, "grounding": 1.0, "deltaloss": 1.0}  # shares of the budget
TARGET_RATIO = 0.9  # every model stage vs its bare model on the same batches
TARGET_CLIP_PER_S = 1000  # CLIP ViT-L/14, decode included, one H100
RESULT_FILE = "gpu_check.json"


def host(device: Any) -> dict[str, Any]:
    import torch
    import transformers

    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "transformers": transformers.__version__, "cpu_count": os.cpu_count(),
                            "device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info |= {"gpu": props.name, "gpu_mem_gib": round(props.total_memory / (1 << 30), 1),
                 "cuda": torch.version.cuda}
    return info


def _targets(rec: dict[str, Any], full_gpu: bool) -> dict[str, Any]:
    """Target fields; judged only on a GPU with the full-size models (None otherwise)."""
    out: dict[str, Any] = {"target_ratio_vs_bare": TARGET_RATIO}
    ok = rec["ratio_vs_bare"] >= TARGET_RATIO
    if rec["stage"] == "clipscore":
        out["target_items_per_s"] = TARGET_CLIP_PER_S
        ok = ok and rec["items_per_s"] >= TARGET_CLIP_PER_S
    out["meets_targets"] = ok if full_gpu else None
    return out


def _write(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(path)


def _one(name: str, ctx: Ctx, args: argparse.Namespace) -> dict[str, Any]:
    if name == "clipscore":
        from gpucheck import clip

        return clip.check(ctx)
    if name == "recaption":
        from gpucheck import recaption

        return recaption.check(ctx, args.new_tokens)
    if name == "grounding":
        from gpucheck import grounding

        return grounding.check(ctx)
    from gpucheck import deltaloss

    return deltaloss.check(ctx)


def main(args: argparse.Namespace) -> int:
    import torch

    started = time.monotonic()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no GPU is visible (use --device cpu --tiny for the CPU run)",
              file=sys.stderr)
        return 2
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    full_gpu = device.type == "cuda" and not args.tiny
    work = Path(tempfile.mkdtemp(prefix="vila2-gpu-check-"))
    ctx = Ctx(device=device, tiny=args.tiny, work=work, cpus=args.cpus, image_size=args.image_size,
              rows_per_batch=args.rows_per_batch)
    doc: dict[str, Any] = {"check": "vila2-curate gpu check", "version": 1, "host": host(device),
                           "tiny": args.tiny, "budget_s": args.budget_s, "demo": True,
                           "note": "random weights: throughput only; every output is marked demo",
                           "stages": [], "skipped": ctx.skipped, "errors": []}
    stages = [s for s in STAGES if s in args.stages]
    failed = False
    try:
        for k, name in enumerate(stages):
            now = time.monotonic()
            left = args.budget_s - (now - started)
            share = WEIGHTS[name] / sum(WEIGHTS[s] for s in stages[k:])
            ctx.deadline = now + left * share
            if left <= 0:
                ctx.skipped.append(f"{name}: no time left")
                continue
            t = time.monotonic()
            try:
                rec = _one(name, ctx, args)
                rec |= _targets(rec, full_gpu) | {"seconds": round(time.monotonic() - t, 1)}
            except Exception as e:  # noqa: BLE001 - one failed stage must not hide the others' figures
                failed = True
                traceback.print_exc()
                rec = {"stage": name, "error": f"{type(e).__name__}: {e}"[:500]}
                doc["errors"].append(rec)
            print(json.dumps(rec), flush=True)
            if "error" not in rec:
                doc["stages"].append(rec)
            doc["wall_s"] = round(time.monotonic() - started, 1)
            _write(out_dir / RESULT_FILE, doc)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            for p in work.iterdir():  # free the disk before the next stage's checkpoint
                shutil.rmtree(p, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _write(out_dir / RESULT_FILE, doc)
    print(f"gpu-check: {len(doc['stages'])} stages in {doc['wall_s']} s -> {out_dir / RESULT_FILE}",
          file=sys.stderr)
    return 1 if failed else 0
