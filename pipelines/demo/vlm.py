"""A tiny random LLaVA-style VLM on local disk, laid out exactly like a real ``*-hf`` LLaVA checkpoint.

Machines here cannot download weights, yet the recaption stage must run through the same loading code
production uses (``AutoProcessor`` + ``AutoModelForImageTextToText``). So this builds, from configs and a
seed: a byte-level BPE tokenizer trained offline (with ``<image>`` as a special token and a LLaVA-1.5
style chat template), a ``CLIPImageProcessor``, a ``LlavaProcessor`` and a ``LlavaForConditionalGeneration``
(CLIP vision tower + Llama text model), all written with ``save_pretrained``. The folder gets a
``DEMO_MODEL`` marker so every caption it writes is flagged ``demo_model`` in its lineage.

``size="llava-1.5-7b"`` writes the same architecture at LLaVA-1.5-7B's dimensions (CLIP ViT-L/14-336
tower, Llama-2-7B text model, 32,064-id vocabulary) for GPU throughput checks: the demo tokenizer covers
the first ids and the output rows beyond them are zero, so a token costs what it costs in the real model
and every generated id decodes to demo text.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from vila2_curate.schemas.demo_model import mark_demo_model

IMAGE_TOKEN = "<image>"

# LLaVA-1.5 style: "USER: <image>\n{prompt} ASSISTANT:" — the image placeholder comes from the template.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'user' %} {% else %}</s>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

_CORPUS = """
A dog runs across a sandy beach while the sun sets behind the waves.
A grey cat sleeps on a blue sofa next to an open window with white curtains.
Children play football on a green field; a man watches them from a bench on the left.
A wooden table holds a bowl of apples, a glass of water and a folded newspaper.
A busy street at night, with cars, a red bus, shop signs and people holding umbrellas.
Snowy mountains are reflected in a calm lake under a clear sky.
The sign above the door reads OPEN 9 TO 5, written in large black letters.
A woman on a bicycle rides along a river path; yellow leaves cover the ground.
On the right of the image a tall tree stands behind a small white house.
The label on the bottle says fresh orange juice, 1 litre.
Describe the image in detail. What is in this picture? Explain what you see.
Focus on where the objects are: left, right, above, below, in front of, behind, next to.
Read all the text visible in the image. List the objects with their boxes.
person [0.12, 0.30, 0.45, 0.98], car [0.50, 0.55, 0.95, 0.90], dog [0.05, 0.60, 0.25, 0.95].
I'm sorry, I cannot help with that. As an AI model I cannot see the image.
Numbers 0 1 2 3 4 5 6 7 8 9 10 100. Punctuation , . ; : ! ? ' " ( ) [ ] - /
"""

# name -> (vision, text) sizes. "tiny": fast tests. "bench": big enough that batching matters on CPU.
# "llava-1.5-7b": the real recaptioner's shapes (GPU checks only: 7B parameters).
SIZES: dict[str, dict[str, Any]] = {
    "tiny": {
        "vision": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        "text": {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
        },
    },
    "bench": {
        "vision": {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 64,
            "patch_size": 16,
        },
        "text": {
            "hidden_size": 256,
            "intermediate_size": 688,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
        },
    },
}
SIZES["llava-1.5-7b"] = {
    "vision": {
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "image_size": 336,
        "patch_size": 14,
        "projection_dim": 768,
    },
    "text": {
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 32064,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
    },
    "vision_feature_layer": -2,  # LLaVA-1.5 reads the penultimate CLIP layer
}
_VOCAB_SIZE = 600


def train_demo_tokenizer(corpus: str, vocab_size: int, extra_specials: tuple[str, ...] = ()):
    """Byte-level BPE trained offline on ``corpus``, ``<s>`` prepended like Llama's tokenizer.

    The one tokenizer builder for every demo model (VLM, DeltaLoss LMs): no download, deterministic.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", *extra_specials]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([ln.strip() for ln in corpus.strip().splitlines() if ln.strip()], trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    extra = {"extra_special_tokens": {"image_token": IMAGE_TOKEN}} if IMAGE_TOKEN in extra_specials else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>", **extra
    )


def _train_tokenizer():  # -> transformers.PreTrainedTokenizerFast
    """The demo VLM's tokenizer: ``<image>`` a special token, a chat template, left padding."""
    fast = train_demo_tokenizer(_CORPUS, _VOCAB_SIZE, (IMAGE_TOKEN,))
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"  # generation pads on the left; recorded in tokenizer_config.json
    return fast


def demo_llama_config(tokenizer: Any, max_positions: int, dims: dict[str, Any]):  # -> transformers.LlamaConfig
    """The Llama config of a demo model sized by ``dims``, its vocabulary and special ids from ``tokenizer``
    (shared by the demo VLM's text tower and pipelines/demo/models.py's demo LMs). ``dims`` may name a
    larger ``vocab_size`` (a real model's) and its own ``max_position_embeddings``."""
    from transformers import LlamaConfig

    dims = dict(dims)
    return LlamaConfig(
        vocab_size=dims.pop("vocab_size", len(tokenizer)),
        max_position_embeddings=dims.pop("max_position_embeddings", max_positions),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **dims,
    )


def zero_unused_vocab(model: Any, n_real: int) -> None:
    """Zero the output rows past the demo tokenizer's ``n_real`` ids (a full-size vocabulary): the same
    work per token as the real model, but greedy decoding only picks ids the demo tokenizer decodes."""
    import torch

    head = model.get_output_embeddings()
    if head is not None and head.weight.shape[0] > n_real:
        with torch.no_grad():
            head.weight[n_real:] = 0


def vlm_config(size: str, tokenizer: Any):  # -> transformers.LlavaConfig
    """The LLaVA config of a demo VLM of ``size``; its image token and special ids from ``tokenizer``."""
    from transformers import CLIPVisionConfig, LlavaConfig

    dims = SIZES[size]
    side, patch = dims["vision"]["image_size"], dims["vision"]["patch_size"]
    return LlavaConfig(
        vision_config=CLIPVisionConfig(**dims["vision"]),
        text_config=demo_llama_config(tokenizer, 1024, dims["text"]),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=(side // patch) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=dims.get("vision_feature_layer", -1),
    )


def build_demo_vlm(out_dir: str | Path, seed: int = 0, size: str = "tiny", device: str = "cpu",
                   dtype: str | None = None) -> Path:
    """Write a random LLaVA (CLIP tower + Llama) with processor and chat template; return the folder.

    ``device`` is where the random weights are drawn and ``dtype`` how they are stored (default fp32;
    bf16 for ``llava-1.5-7b``, drawn on a GPU in seconds instead of minutes on CPU).
    """
    import torch
    from transformers import (
        CLIPImageProcessor,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    dims = SIZES[size]
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer()
    config = vlm_config(size, tokenizer)
    side, patch = dims["vision"]["image_size"], dims["vision"]["patch_size"]
    torch.manual_seed(seed)
    if size in ("tiny", "bench") and device == "cpu" and dtype is None:
        model = LlavaForConditionalGeneration(config).eval()
    else:
        dtype = dtype or ("bfloat16" if size == "llava-1.5-7b" else "float32")
        with torch.device(device):
            model = LlavaForConditionalGeneration._from_config(config, dtype=getattr(torch, dtype)).eval()
        zero_unused_vocab(model, len(tokenizer))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": side},
        crop_size={"height": side, "width": side},
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )
    model.save_pretrained(str(folder), max_shard_size="5GB")
    processor.save_pretrained(str(folder))
    mark_demo_model(folder, "random weights built by pipelines/demo/vlm.py; not a real model")
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    print(json.dumps({"vlm": str(build_demo_vlm(args.out_dir, args.seed, args.size, args.device))}))


if __name__ == "__main__":
    main()
