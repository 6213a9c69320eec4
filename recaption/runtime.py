"""Device, dtype and image helpers for the recaption backends.

Small re-implementations of the device policy the other model stages follow (recaption/ may import
schemas/ only): ``auto`` -> cuda when visible; fp16/bf16 only on GPU, because half precision on CPU is
slow and numerically worse. Plus image decoding with a bounded side, shared by every backend so a
caption depends on the same pixels whichever backend wrote it.
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import UTC, datetime
from typing import Any

from vila2_curate.schemas.config import GenerationParams, ModelRuntime
from vila2_curate.schemas.images import decoding, draft_rgb, open_image

_ADDRESS = re.compile(r" (object )?at 0x[0-9a-fA-F]+")


def resolve_device(runtime: ModelRuntime):  # -> torch.device
    """``auto`` -> cuda when a GPU is visible, else cpu; an explicit device is taken as given."""
    import torch

    if runtime.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(runtime.device)


def resolve_dtype(runtime: ModelRuntime, device):  # -> torch.dtype
    """fp16/bf16 on GPU only; CPU runs fp32."""
    import torch

    if device.type != "cuda":
        return torch.float32
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[runtime.precision]


def reason_detail(e: BaseException, limit: int = 160) -> str:
    """``Type: message`` without object addresses: quarantine reasons must be reproducible across runs."""
    return f"{type(e).__name__}: {_ADDRESS.sub('', str(e))[:limit]}".rstrip(": ")


def load_image(data: bytes | None, max_side: int):  # -> PIL.Image.Image
    """Decode to RGB and downscale so the longer side is <= ``max_side`` (aspect kept, never upscaled).

    JPEGs are draft-decoded (DCT scaling never goes below the requested size), so huge photos cost little.
    """
    from PIL import Image

    with decoding():
        img = open_image(data)
        if max(img.size) > max_side:
            draft_rgb(img, (max_side, max_side))
        img = img.convert("RGB")
        if max(img.size) > max_side:
            scale = max_side / max(img.size)
            size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
            img = img.resize(size, Image.Resampling.BICUBIC)
        return img


def params_hash(gen: GenerationParams, **extra: Any) -> str:
    """Hash of the generation parameters (seed included) and anything else that changes the output."""
    payload = {"generation": gen.model_dump(mode="json"), **extra}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from arbitrary parts (seed, sample ids...): same parts -> same seed on any machine."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def iso_utc(value: str | datetime | None = None) -> str:
    """ISO-8601 UTC with a ``Z`` suffix, seconds precision; ``None`` -> now."""
    if value is None:
        value = datetime.now(UTC)
    elif isinstance(value, str):
        value = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
