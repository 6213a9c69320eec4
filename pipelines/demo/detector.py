"""A tiny random OWLv2 detector on local disk, laid out like a real ``google/owlv2-*`` checkpoint.

Machines here cannot download weights, yet the grounding stage must load through the production path
(``AutoProcessor`` + ``AutoModelForZeroShotObjectDetection``). This writes, from configs and a seed, an
``Owlv2ForObjectDetection`` with tiny text/vision towers, an ``Owlv2ImageProcessor`` at the model's input
size and a ``CLIPTokenizer`` (byte-level BPE: the 256 byte symbols, their end-of-word forms and a few merges,
built here, so nothing is fetched), all with ``save_pretrained``, plus a ``DEMO_MODEL`` marker: every row it
grounds is tagged ``demo`` in ``specialists.models``. Its boxes and scores are random by construction.

``size="owlv2-base-16"`` writes OWLv2 base/16's shapes (ViT-B/16 at 960x960, 12-layer text tower,
49,408-id vocabulary, 16-token queries) for GPU throughput checks; the demo tokenizer's ids are the first
of that vocabulary. Its class head's logit shift and scale are constants instead of random (same
layers, same work): random ones saturate the scores, and thousands of boxes per image over the threshold
would make post-processing cost what it never costs with a trained detector. With them about 0.2% of
(patch, query) pairs score over the stages' default 0.25.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vila2_curate.schemas.demo_model import mark_demo_model

IMAGE_SIZE = 64
PATCH_SIZE = 16
MAX_TEXT_LEN = 16  # tokens per query, incl. start/end (CLIP uses 77; phrases here are a few words)
# size -> (text tower, vision tower, projection_dim). "tiny": tests; "owlv2-base-16": the real shapes.
SIZES: dict[str, tuple[dict[str, int], dict[str, int], int]] = {
    "tiny": ({"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2},
             {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
              "image_size": IMAGE_SIZE, "patch_size": PATCH_SIZE}, 32),
    "owlv2-base-16": ({"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
                       "num_attention_heads": 8, "vocab_size": 49408},
                      {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                       "num_attention_heads": 12, "image_size": 960, "patch_size": 16}, 512),
}
CLASS_LOGIT_SCALE = 20.0  # full size: logits = (cosine + shift) * scale; random cosines: ~N(-0.03, 0.06)
CLASS_LOGIT_SHIFT = -0.155  # so the 99.8th percentile cosine (~0.10) maps to score 0.25
_MERGE_WORDS = ("red", "blue", "green", "ellipse", "triangle", "rectangle", "black", "purple", "sign", "dog")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character map used by byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def _vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP-style vocabulary: byte symbols, their ``</w>`` forms, merges for a few words, specials last."""
    symbols = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for s in symbols + [s + "</w>" for s in symbols]:
        vocab.setdefault(s, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in _MERGE_WORDS:  # left-to-right merges: r e -> re, re d</w> -> red</w>
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        cur = parts[0]
        for nxt in parts[1:]:
            rule = (cur, nxt)
            if rule not in merges:
                merges.append(rule)
            cur += nxt
            vocab.setdefault(cur, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return vocab, merges


def detector_config(size: str = "tiny", vocab: dict[str, int] | None = None):  # -> transformers.Owlv2Config
    """The OWLv2 config of a demo detector of ``size``; special ids from the demo vocabulary."""
    from transformers import Owlv2Config

    vocab = vocab or _vocab_and_merges()[0]
    text, vision, projection = SIZES[size]
    return Owlv2Config(
        text_config={
            "vocab_size": len(vocab), **text, "max_position_embeddings": MAX_TEXT_LEN,
            "bos_token_id": vocab["<|startoftext|>"], "eos_token_id": vocab["<|endoftext|>"],
            "pad_token_id": vocab["<|endoftext|>"],
        },
        vision_config=dict(vision),
        projection_dim=projection,
    )


def build_demo_detector(out_dir: str | Path, seed: int = 0, size: str = "tiny", device: str = "cpu",
                        dtype: str | None = None) -> Path:
    """Write a random OWLv2 checkpoint (model, processor, tokenizer, DEMO_MODEL) to ``out_dir``.

    ``device``: where the random weights are drawn; ``dtype``: how they are stored (default fp32).
    """
    import torch
    from transformers import (
        CLIPTokenizer,
        Owlv2ForObjectDetection,
        Owlv2ImageProcessor,
        Owlv2Processor,
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = _vocab_and_merges()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_TEXT_LEN)
    side = SIZES[size][1]["image_size"]
    image_processor = Owlv2ImageProcessor(size={"height": side, "width": side})
    processor = Owlv2Processor(image_processor=image_processor, tokenizer=tokenizer)

    cfg = detector_config(size, vocab)
    torch.manual_seed(seed)
    if size == "tiny" and device == "cpu" and dtype is None:
        model = Owlv2ForObjectDetection(cfg).eval()
    else:
        with torch.device(device):
            model = Owlv2ForObjectDetection._from_config(cfg, dtype=getattr(torch, dtype or "float32")).eval()
        if size != "tiny":
            head = model.class_head
            with torch.no_grad():
                head.logit_shift.weight.zero_()
                head.logit_shift.bias.fill_(CLASS_LOGIT_SHIFT)
                head.logit_scale.weight.zero_()
                head.logit_scale.bias.fill_(CLASS_LOGIT_SCALE - 1)  # elu(x) + 1 == x + 1 for x > 0
    model.save_pretrained(out)
    processor.save_pretrained(out)
    mark_demo_model(out, "random weights for tests and demos; outputs are meaningless")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    print(build_demo_detector(args.out_dir, args.seed, args.size, args.device))


if __name__ == "__main__":
    main()
