"""Model loading shared by the model stages: device and dtype policy, open_clip, transformers causal LMs.

One code path for real checkpoints and for the tiny random demo models the tests build
(``pipelines/demo/models.py``), so tests exercise exactly what production runs. Every loader returns an
*identity* (model, pretrained, sha256 of the weights, demo flag) that goes into the rows it scores: a score
is only meaningful together with the exact weights that produced it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import torch

from vila2_curate.schemas.config import ModelRuntime
from vila2_curate.schemas.demo_model import is_demo_model

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_FILE_HASHES: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256; one hash per worker


def resolve_device(runtime: ModelRuntime) -> torch.device:
    """``auto`` -> cuda when a GPU is visible, else cpu; an explicit device is taken as given."""
    if runtime.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(runtime.device)


def resolve_dtype(runtime: ModelRuntime, device: torch.device) -> torch.dtype:
    """fp16/bf16 only on GPU: half precision on CPU is slow and numerically worse, so CPU runs fp32."""
    if device.type != "cuda":
        return torch.float32
    return _DTYPES[runtime.precision]


def autocast(device: torch.device, dtype: torch.dtype):  # -> context manager
    """Mixed precision for GPU half dtypes; a no-op context otherwise."""
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        return torch.autocast(device_type="cuda", dtype=dtype)
    return torch.autocast(device_type=device.type, enabled=False)


def sha256_file(path: str | Path, chunk: int = 8 << 20) -> str:
    """sha256 of a checkpoint file, memoised per process by (path, size, mtime) (multi-GB files)."""
    p = Path(path).resolve()
    st = p.stat()
    memo = (str(p), st.st_size, st.st_mtime_ns)
    if memo not in _FILE_HASHES:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
        _FILE_HASHES[memo] = h.hexdigest()
    return _FILE_HASHES[memo]


def sha256_files(paths: list[Path]) -> str:
    """One digest over several weight files (sharded checkpoints): names and per-file digests, sorted."""
    if len(paths) == 1:
        return sha256_file(paths[0])
    h = hashlib.sha256()
    for p in sorted(paths, key=lambda q: q.name):
        h.update(f"{p.name}\0{sha256_file(p)}\n".encode())
    return h.hexdigest()


def sha256_state_dict(module: torch.nn.Module) -> str:
    """Digest of the parameters themselves, for models whose weights came from no file."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def identity_tag(identity: dict[str, Any]) -> str:
    """Compact identity for a row column: ``model|pretrained|sha256[:12]`` (+ ``|demo``: random weights)."""
    parts = [str(identity["model"]), str(identity.get("pretrained") or "-"), identity["weights_sha256"][:12]]
    if identity.get("demo"):
        parts.append("demo")
    return "|".join(parts)


class OpenClipBundle(NamedTuple):
    model: torch.nn.Module
    preprocess: Any  # PIL image -> CHW float tensor (open_clip's inference transform)
    tokenizer: Any  # list[str] -> LongTensor [n, context_length]
    identity: dict[str, Any]


def load_open_clip(
    model: str, pretrained: str | None, device: torch.device | str, dtype: torch.dtype = torch.float32
) -> OpenClipBundle:
    """Load an open_clip model for inference.

    ``model`` is an open_clip name (``ViT-B-32``), an ``hf-hub:org/repo`` / ``local-dir:/path`` id, or a plain
    local directory in open_clip's hub layout (``open_clip_config.json`` holding ``model_cfg`` and
    ``preprocess_cfg``, plus a checkpoint); a directory is handed to open_clip's own ``local-dir:`` scheme,
    so open_clip builds the architecture from that config. ``pretrained`` is a tag from open_clip's registry
    (resolved through its cache) or a checkpoint file; with a directory it overrides the folder's own
    checkpoint. Half dtypes use open_clip's own low-precision conversion (weights fp16/bf16, LayerNorm fp32).
    """
    import open_clip
    from open_clip import factory
    from open_clip import pretrained as oc_pretrained

    device = torch.device(device)
    precision = (
        {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "fp32")
        if device.type == "cuda"
        else "fp32"
    )
    name = model
    folder: Path | None = None
    if name.startswith("local-dir:"):
        folder = Path(name[len("local-dir:") :])
    elif "://" not in name and not name.startswith("hf-hub:") and Path(name).is_dir():
        folder = Path(name)
    if folder is not None:
        cfg_path = folder / "open_clip_config.json"
        if not cfg_path.is_file() or "model_cfg" not in json.loads(cfg_path.read_text()):
            raise FileNotFoundError(
                f"{folder}: not an open_clip model folder (needs open_clip_config.json with 'model_cfg' and "
                "'preprocess_cfg', as open_clip.push_to_hf_hub writes it)"
            )
        oc_name = f"local-dir:{folder}"
    else:
        oc_name = name

    checkpoint: Path | None = None
    file_override = pretrained is not None and os.path.isfile(pretrained)
    if folder is not None and file_override:
        # local-dir ignores `pretrained`: build from the folder's config, then load the given file
        net, _, preprocess = open_clip.create_model_and_transforms(
            oc_name, load_weights=False, precision=precision, device=device
        )
        factory.load_checkpoint(net, pretrained)
        checkpoint = Path(pretrained)
    else:
        net, _, preprocess = open_clip.create_model_and_transforms(
            oc_name, pretrained=None if folder is not None else pretrained, precision=precision, device=device
        )
        if folder is not None:
            found = factory._find_checkpoint_in_dir(folder)  # the file open_clip itself just loaded
            checkpoint = Path(found) if found else None
        elif name.startswith("hf-hub:"):
            checkpoint = Path(oc_pretrained.download_pretrained_from_hf(name[len("hf-hub:") :]))
        elif file_override:
            checkpoint = Path(pretrained)
        elif pretrained:
            cfg = oc_pretrained.get_pretrained_cfg(name.replace("/", "-"), pretrained)
            checkpoint = Path(oc_pretrained.download_pretrained(cfg))  # cached by now: no second download
    net.eval().requires_grad_(False)
    tokenizer = open_clip.get_tokenizer(oc_name)
    identity = {
        "model": name,
        "pretrained": pretrained,
        "weights_sha256": sha256_file(checkpoint) if checkpoint else sha256_state_dict(net),
        "demo": is_demo_model(checkpoint.parent if checkpoint else folder),
    }
    return OpenClipBundle(net, preprocess, tokenizer, identity)


class CausalLMBundle(NamedTuple):
    model: torch.nn.Module
    tokenizer: Any  # transformers tokenizer, left padding, pad token set
    identity: dict[str, Any]


def load_causal_lm(
    path_or_name: str,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
) -> CausalLMBundle:
    """Load a transformers causal LM + tokenizer for scoring (eval mode, no grads).

    The tokenizer is set to left padding and gets a pad token when it has none (eos, else unk), because
    batched scoring pads; callers still pass attention masks and position ids so padding never changes a
    row's score.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = torch.device(device)
    tokenizer = AutoTokenizer.from_pretrained(path_or_name, trust_remote_code=trust_remote_code)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    if tokenizer.pad_token is None:
        raise ValueError(f"{path_or_name}: tokenizer has no pad, eos or unk token to pad batches with")
    model = AutoModelForCausalLM.from_pretrained(
        path_or_name, dtype=dtype, trust_remote_code=trust_remote_code
    )
    model.to(device).eval().requires_grad_(False)

    folder = Path(path_or_name) if Path(path_or_name).is_dir() else _hub_snapshot(path_or_name)
    files = _weight_files(folder) if folder else []
    identity = {
        "model": path_or_name,
        "pretrained": None,
        "weights_sha256": sha256_files(files) if files else sha256_state_dict(model),
        "demo": is_demo_model(folder),
    }
    return CausalLMBundle(model, tokenizer, identity)


def _weight_files(folder: Path) -> list[Path]:
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix in _WEIGHT_SUFFIXES]
    safetensors = [p for p in files if p.suffix == ".safetensors"]
    return safetensors or files  # from_pretrained prefers safetensors when both are there


def _hub_snapshot(repo_id: str) -> Path | None:
    """The cached snapshot folder of a hub model (already downloaded by from_pretrained), if any."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # not cached as a full snapshot: fall back to hashing the loaded tensors
        return None
