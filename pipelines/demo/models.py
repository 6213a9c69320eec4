"""Tiny random models on local disk, laid out exactly like real checkpoints, for tests and offline demos.

Machines here cannot download weights, yet the model stages must be exercised through the same loading
code that production uses. So this builds, from configs and a seed:

- an open_clip model folder as open_clip's own hub layout has it (``open_clip_config.json`` with
  ``model_cfg`` + ``preprocess_cfg``, and ``open_clip_model.safetensors``), loadable by ClipScoreConfig
  ``model: <folder>``;
- two transformers causal LMs (a "small" and a "large" Llama) with a byte-level BPE tokenizer trained
  offline on a built-in English text, saved with ``save_pretrained``, loadable by DeltaLossConfig.

Besides the tiny sizes the tests use, the same builders write full-size random models (``size``:
``vit-l-14``; ``qwen2.5-0.5b`` / ``qwen2.5-1.5b``) for GPU throughput checks (benchmarks/gpu/): throughput
depends on shapes, not on weight values. Their vocabulary is the real one; the demo tokenizer covers its
first ids and the output rows beyond them are zero, so the work per token is the real model's while
every sampled id is one the demo tokenizer can decode.

Every folder holds a ``DEMO_MODEL`` marker, so the identity recorded with each score says the numbers
come from a random model (see ``curation.models``). Same seed -> byte-identical weight files.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vila2_curate.schemas.demo_model import DEMO_MARKER, mark_demo_model  # noqa: F401 - DEMO_MARKER re-exported for tests

# A few hundred words of plain English: enough for a 512-token BPE vocabulary that covers captions.
_CORPUS = """
A photo of a dog running on the beach at sunset. A cat sleeping on a red sofa near the window.
Two children play football in a green park while their parents watch from a wooden bench.
A bowl of fresh fruit with apples, oranges and bananas on a kitchen table. A city street at night
with cars, buses, bright shop signs and people walking in the rain. A mountain lake reflects snowy
peaks under a clear blue sky. An old man reads a newspaper in a small cafe. A woman rides a bicycle
along a river path in autumn, yellow leaves on the ground. A close up of a flower with a bee collecting
pollen. A plate of pasta with tomato sauce and basil. The logo of a company printed on a white mug.
A diagram showing the parts of a plant: roots, stem, leaves and flowers. A screenshot of a website with
a search bar and a list of results. A map of the city center with streets, a station and a museum.
The text on the sign says open every day from nine to five. A group of people standing in front of a
building for a photograph. A red car parked next to a tree. A boat sailing on the sea near an island.
A birthday cake with candles on a table, balloons in the background. A black and white photo of a
bridge over a river. A child draws a house and the sun with colored pencils. Fresh bread in a bakery.
A laptop, a cup of coffee and a notebook on a desk. Snow covers the roofs of the village in winter.
A horse stands in a field behind a fence. A person holds a smartphone showing a chat application.
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. How vexingly
quick daft zebras jump. Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 2024. Punctuation: , . ; : ! ? ' " ( ) - /
"""

# Small ViT + text transformer: real open_clip architecture, ~3.5 M parameters (most in the token table).
_CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
_LM_SIZES = {
    "small": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    },
    "large": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
    },
}
# Full-size DeltaLoss LMs: the published Qwen2.5 dimensions (random weights, demo tokenizer).
_QWEN25 = {"vocab_size": 151936, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
           "tie_word_embeddings": True, "num_key_value_heads": 2}
_LM_SIZES["qwen2.5-0.5b"] = {"arch": "qwen2", **_QWEN25, "hidden_size": 896, "intermediate_size": 4864,
                             "num_hidden_layers": 24, "num_attention_heads": 14}
_LM_SIZES["qwen2.5-1.5b"] = {"arch": "qwen2", **_QWEN25, "hidden_size": 1536, "intermediate_size": 8960,
                             "num_hidden_layers": 28, "num_attention_heads": 12}
_CLIP_FULL = {"vit-l-14": "ViT-L-14"}  # size -> open_clip's own (bundled) model config of that name
_VOCAB_SIZE = 512
FULL_SIZE_DTYPE = "bfloat16"  # full-size weights are written in bf16: half the disk and load time


def clip_model_cfg(size: str = "tiny") -> dict:
    """The open_clip ``model_cfg`` of a demo CLIP: the tiny one, or open_clip's config for a full size."""
    if size == "tiny":
        return json.loads(json.dumps(_CLIP_CFG))
    import open_clip

    cfg = open_clip.get_model_config(_CLIP_FULL[size])
    if cfg is None:
        raise ValueError(f"open_clip has no bundled config for {_CLIP_FULL[size]}")
    return json.loads(json.dumps(cfg))


def lm_config(size: str, tokenizer):  # -> transformers.PretrainedConfig
    """The config of a demo causal LM of ``size`` (a tiny Llama, or Qwen2.5 dimensions)."""
    from vila2_curate.pipelines.demo.vlm import demo_llama_config

    dims = dict(_LM_SIZES[size])
    if dims.pop("arch", "llama") == "llama":
        return demo_llama_config(tokenizer, 512, dims)
    from transformers import Qwen2Config

    return Qwen2Config(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, **dims)


def _torch_dtype(dtype: str | None):  # -> torch.dtype | None
    import torch

    return None if dtype is None else getattr(torch, dtype)


def build_demo_clip(out_dir: str | Path, seed: int = 0, size: str = "tiny", device: str = "cpu",
                    dtype: str | None = None) -> Path:
    """Write a random open_clip model in open_clip's hub-folder layout; return the folder.

    ``device`` is where the random weights are drawn (a GPU draws ViT-L/14's in a blink); ``dtype``
    the stored precision (default: fp32 tiny, bf16 full size).
    """
    import open_clip
    import torch
    from safetensors.torch import save_file

    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    model_cfg = clip_model_cfg(size)
    config = {
        "model_cfg": model_cfg,
        "preprocess_cfg": {
            "mean": [0.48145466, 0.4578275, 0.40821073],
            "std": [0.26862954, 0.26130258, 0.27577711],
            "interpolation": "bicubic",
            "resize_mode": "shortest",
        },
    }
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    torch.manual_seed(seed)
    with torch.device(device):
        model = open_clip.model.CLIP(**model_cfg)
    want = _torch_dtype(dtype or (None if size == "tiny" else FULL_SIZE_DTYPE))
    state = {k: v.detach().to("cpu", want if want is not None and v.is_floating_point() else v.dtype)
             .contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "open_clip_model.safetensors"))
    mark_demo_model(folder, "random weights built by pipelines/demo/models.py; not a real model")
    return folder


def _train_tokenizer(seed: int):  # -> transformers.PreTrainedTokenizerFast
    """Byte-level BPE trained on the built-in corpus (deterministic; ``seed`` kept for the API)."""
    from vila2_curate.pipelines.demo.vlm import train_demo_tokenizer

    return train_demo_tokenizer(_CORPUS, _VOCAB_SIZE)


def build_demo_lm(out_dir: str | Path, size: str = "small", seed: int = 0, tokenizer=None,
                  device: str = "cpu", dtype: str | None = None) -> Path:
    """Write a random causal LM + tokenizer with ``save_pretrained``; return the folder.

    ``small`` / ``large``: tiny Llamas (tests); ``qwen2.5-0.5b`` / ``qwen2.5-1.5b``: full size, drawn on
    ``device`` and stored in ``dtype`` (default bf16).
    """
    import torch
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    from vila2_curate.pipelines.demo.vlm import zero_unused_vocab

    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = tokenizer or _train_tokenizer(seed)
    config = lm_config(size, tokenizer)
    torch.manual_seed(seed + (0 if size == "small" else 1))
    if size in ("small", "large") and device == "cpu" and dtype is None:
        model = LlamaForCausalLM(config).eval()
    else:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=_torch_dtype(dtype or FULL_SIZE_DTYPE))
        zero_unused_vocab(model, len(tokenizer))
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    mark_demo_model(folder, "random weights built by pipelines/demo/models.py; not a real model")
    return folder


def build_demo_models(out_dir: str | Path, seed: int = 0) -> dict[str, str]:
    """Build all demo models under ``out_dir``; returns {"clip", "lm_small", "lm_large"} -> folder."""
    root = Path(out_dir)
    tokenizer = _train_tokenizer(seed)
    return {
        "clip": str(build_demo_clip(root / "clip", seed)),
        "lm_small": str(build_demo_lm(root / "lm-small", "small", seed, tokenizer)),
        "lm_large": str(build_demo_lm(root / "lm-large", "large", seed, tokenizer)),
    }


_CACHE: dict[int, dict[str, str]] = {}


def cached_demo_models(seed: int = 0) -> dict[str, str]:
    """Build the demo models once per process into a temp dir (tests and benchmarks share them)."""
    if seed not in _CACHE:
        import atexit
        import shutil
        import tempfile

        root = tempfile.mkdtemp(prefix=f"vila2-demo-models-{seed}-")
        atexit.register(shutil.rmtree, root, ignore_errors=True)
        _CACHE[seed] = build_demo_models(root, seed)
    return _CACHE[seed]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(json.dumps(build_demo_models(args.out_dir, args.seed), indent=2))


if __name__ == "__main__":
    main()
