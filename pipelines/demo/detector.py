"""A tiny random OWLv2 detector on local disk, laid out like a real ``google/owlv2-*`` checkpoint.

Machines here cannot download weights, yet the grounding stage must load through the production path
(``AutoProcessor`` + ``AutoModelForZeroShotObjectDetection``). This writes, from configs and a seed, an
``Owlv2ForObjectDetection`` with tiny text/vision towers, an ``Owlv2ImageProcessor`` at the model's input
size and a ``CLIPTokenizer`` (byte-level BPE: the 256 byte symbols, their end-of-word forms and a few merges,
built here, so nothing is fetched), all with ``save_pretrained``, plus a ``DEMO_MODEL`` marker: every row it
grounds is tagged ``demo`` in ``specialists.models``. Its boxes and scores are random by construction.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vila2_curate.schemas.demo_model import mark_demo_model

IMAGE_SIZE = 64
PATCH_SIZE = 16
MAX_TEXT_LEN = 16  # tokens per query, incl. start/end (CLIP uses 77; phrases here are a few words)
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


def build_demo_detector(out_dir: str | Path, seed: int = 0) -> Path:
    """Write the tiny random OWLv2 checkpoint (model, processor, tokenizer, DEMO_MODEL) to ``out_dir``."""
    import torch
    from transformers import (
        CLIPTokenizer,
        Owlv2Config,
        Owlv2ForObjectDetection,
        Owlv2ImageProcessor,
        Owlv2Processor,
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = _vocab_and_merges()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_TEXT_LEN)
    image_processor = Owlv2ImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = Owlv2Processor(image_processor=image_processor, tokenizer=tokenizer)

    cfg = Owlv2Config(
        text_config={
            "vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "max_position_embeddings": MAX_TEXT_LEN,
            "bos_token_id": vocab["<|startoftext|>"], "eos_token_id": vocab["<|endoftext|>"],
            "pad_token_id": vocab["<|endoftext|>"],
        },
        vision_config={
            "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
            "image_size": IMAGE_SIZE, "patch_size": PATCH_SIZE,
        },
        projection_dim=32,
    )
    torch.manual_seed(seed)
    model = Owlv2ForObjectDetection(cfg).eval()
    model.save_pretrained(out)
    processor.save_pretrained(out)
    mark_demo_model(out, "random weights for tests and demos; outputs are meaningless")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(build_demo_detector(args.out_dir, args.seed))


if __name__ == "__main__":
    main()
