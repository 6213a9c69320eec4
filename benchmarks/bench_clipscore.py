"""ClipScoreStage images/s against bare open_clip doing the same work: decode + preprocess +
encode_image of each batch, tokenize + encode_text of the same rows' captions, and the image-text cosine;
same images, same captions, same batch size, same run (target >= 0.9x). The stage adds Arrow in/out, error
handling and lineage, so the ratio shows what those cost and what draft decoding and the decode pool win back.

    python benchmarks/bench_clipscore.py [--n 256] [--size 1280x720] [--batch-size 64]
                                         [--model DIR_OR_NAME --pretrained TAG_OR_FILE] [--device auto]

Without --model it uses the tiny random demo CLIP (pipelines/demo/models.py), which makes the run
decode-bound; pass a real model (e.g. --model ViT-B-32 --pretrained <file>) on a GPU for the real figure.
"""

from __future__ import annotations

import argparse
import io
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from _common import best_of, photo_like_jpegs, report  # noqa: E402
from PIL import Image  # noqa: E402

from vila2_curate.curation.clipscore import ClipScoreStage  # noqa: E402
from vila2_curate.curation.models import autocast  # noqa: E402
from vila2_curate.pipelines.demo.models import cached_demo_models  # noqa: E402
from vila2_curate.schemas.config import ClipScoreConfig, ModelRuntime  # noqa: E402
from vila2_curate.schemas.rows import PAIR_SCHEMA, make_table  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--size", default="1280x720")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--model", default=None)
    ap.add_argument("--pretrained", default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="fp16", choices=["fp32", "fp16", "bf16"])
    ap.add_argument("--cpus", type=float, default=float(os.cpu_count() or 1))
    args = ap.parse_args()
    w, h = map(int, args.size.split("x"))
    model = args.model or cached_demo_models()["clip"]
    images = photo_like_jpegs(args.n, (w, h))
    table = make_table(
        [
            {
                "key": f"k{i}",
                "source": "b",
                "shard": "0",
                "image": b,
                "quarantined": False,
                "text": f"a photo of a landscape number {i}",
            }
            for i, b in enumerate(images)
        ],
        PAIR_SCHEMA,
    )

    rt = ModelRuntime(
        device=args.device, precision=args.precision, batch_size=args.batch_size, cpus=args.cpus
    )
    stage = ClipScoreStage(ClipScoreConfig(model=model, pretrained=args.pretrained, runtime=rt, draft=True))
    stage.setup()
    no_draft = ClipScoreStage(
        ClipScoreConfig(model=model, pretrained=args.pretrained, runtime=rt, draft=False)
    )
    no_draft.setup()
    bundle, device, dtype = stage._bundle, stage.device, stage.dtype
    net, preprocess, tokenizer = bundle.model, bundle.preprocess, bundle.tokenizer
    captions = table.column("text").to_pylist()

    def bare() -> None:
        """What one writes with open_clip alone for CLIP scores: per batch, decode, preprocess and
        encode_image the images, tokenize and encode_text their captions, cosine of each pair."""
        for start in range(0, len(images), args.batch_size):
            end = start + args.batch_size
            x = torch.stack([preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in images[start:end]])
            tokens = tokenizer(captions[start:end])
            with torch.inference_mode(), autocast(device, dtype):
                fi = net.encode_image(x.to(device))
                ft = net.encode_text(tokens.to(device))
            fi = fi / fi.norm(dim=-1, keepdim=True)
            ft = ft / ft.norm(dim=-1, keepdim=True)
            (fi * ft).sum(dim=-1).float().cpu()

    stage(table)  # warm-up (lazy inits, cudnn autotune)
    bare()
    t_bare = best_of(bare)
    t_stage = best_of(lambda: stage(table))
    t_nodraft = best_of(lambda: no_draft(table))
    report(
        "clipscore_stage_vs_bare_open_clip",
        images=args.n,
        size=args.size,
        batch_size=args.batch_size,
        model=stage.model_tag,
        device=str(device),
        dtype=str(dtype).replace("torch.", ""),
        bare_images_per_s=round(args.n / t_bare, 1),
        stage_images_per_s=round(args.n / t_stage, 1),
        stage_no_draft_images_per_s=round(args.n / t_nodraft, 1),
        ratio=round(t_bare / t_stage, 2),
        ratio_no_draft=round(t_bare / t_nodraft, 2),
        target=0.9,
    )


if __name__ == "__main__":
    main()
