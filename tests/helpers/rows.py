"""Row builders the writer and validate tests share: images, captions, PAIR_SCHEMA rows and MMC4 documents."""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from vila2_curate.schemas.rows import PAIR_SCHEMA, make_table


def image_bytes(fmt: str = "JPEG", seed: int = 0, size: tuple[int, int] = (32, 24)) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def caption(rnd: int, text: str, flags: list[str] | None = None, model: str = "vlm") -> dict[str, Any]:
    return {"round": rnd, "model": model if rnd else "original", "prompt_id": f"p{rnd}", "params_hash": "h",
            "text": text, "created_at": "2024-01-01T00:00:00Z", "flags": flags or []}


def pair_row(i: int, **over: Any) -> dict[str, Any]:
    fmt = over.pop("fmt", "jpg")
    pil = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt]
    row = {
        "key": f"k{i:05d}", "source": "coyo", "shard": "00000", "source_key": f"{i}",
        "url": f"https://example.com/img/{i}.jpg", "image": image_bytes(pil, seed=i), "image_format": fmt,
        "sha256": f"{i:064x}", "phash": (0xF0F0F0F0F0F0F0F0 + i) % 2**64, "width": 32, "height": 24,
        "clip_score": 0.75, "clip_cosine": 0.3, "clip_model": "ViT-B-32", "text": f"alt text {i}",
        "captions": [caption(0, f"alt text {i}"), caption(1, f"recaption one {i}")],
        "specialists": {"ocr": [{"text": "SALE", "box": [0.1, 0.2, 0.3, 0.4], "score": 0.9}], "ocr_text": "SALE",
                        "grounding": [], "grounding_text": "", "spatial": ["left of"], "spatial_text": "x",
                        "models": json.dumps({"ocr": "rapidocr-1.3"})},
        "delta_loss": 1.5, "logp_small": -10.0, "logp_large": -8.5, "flags": ["boilerplate_caption"],
        "meta": json.dumps({"aesthetic": 5.1, "num_faces": 0}),
    }
    row.update(over)
    return row


def pairs(n: int, start: int = 0) -> pa.Table:
    return make_table([pair_row(i) for i in range(start, start + n)], PAIR_SCHEMA)


def doc_image(j: int, text_idx: int, drop: str | None = None, fmt: str = "JPEG") -> dict[str, Any]:
    return {"image_name": f"img{j}.jpg", "raw_url": f"https://example.com/{j}.jpg", "matched_text_index": text_idx,
            "matched_sim": 0.25 + j / 100, "image": image_bytes(fmt, seed=100 + j), "image_format": "jpg",
            "sha256": "0" * 64, "phash": 1, "width": 32, "height": 24, "drop_reason": drop,
            "drop_stage": "dedup" if drop else None,
            "meta": json.dumps({"face_detections": [[1, 2, 3, 4]] if j == 0 else None})}


def doc_row(i: int, n_images: int, drops: set[int] | frozenset[int] = frozenset(), **over: Any) -> dict[str, Any]:
    n_text = max(n_images, 1) + 1
    row = {
        "key": f"d{i:04d}", "source": "mmc4", "shard": "00000", "url": f"https://example.com/doc/{i}",
        "text_list": [f"sentence {s} of {i}" for s in range(n_text)],
        "image_info": [doc_image(j, j % n_text, "dup" if j in drops else None) for j in range(n_images)],
        "similarity_matrix": [[float(j * 10 + s) for s in range(n_text)] for j in range(n_images)],
        "could_have_url_duplicate": 0,
    }
    row.update(over)
    return row
