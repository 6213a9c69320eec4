"""Which sidecar folders a run writes beside its shards, and the text each holds per sample.

VILA reads ``<captions>/<folder>/<tar relpath>.json`` = ``{url: {"output": text}}``: one folder per
recaption round and model (its latest caption), and one per specialist kind, whose folder name must
contain exactly one of "spatial", "ocr", "bbox_interleaved" (VILA picks the question by substring).
The callables are small classes so that the plan pickles to Ray and Beam workers.
"""

from __future__ import annotations

from typing import Any

from schemas.captions import BAD_FLAGS
from specialists.sidecar import SIDECAR_DIRS, specialist_texts

_KEYWORDS = ("spatial", "ocr", "bbox_interleaved")


class RoundCaption:
    """The caption written by recaption round ``round`` with model ``model`` (unless flagged bad)."""

    def __init__(self, round_: int, model: str) -> None:
        self.round, self.model = round_, model

    def __call__(self, row: dict[str, Any]) -> str | None:
        for c in reversed(row.get("captions") or []):
            if c and c.get("round") == self.round and c.get("model") == self.model:
                if set(c.get("flags") or []) & BAD_FLAGS or not (c.get("text") or "").strip():
                    return None
                return c["text"]
        return None


class SpecialistText:
    """The specialist answer VILA's specialist QA loader reads for ``kind``."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def __call__(self, row: dict[str, Any]) -> str | None:
        return specialist_texts(row).get(self.kind) or None


def caption_folder(round_: int, model_tag: str) -> str:
    folder = f"r{round_}-{model_tag}"
    hits = [k for k in _KEYWORDS if k in folder]
    if hits:  # VILA would take this caption folder for a specialist question
        raise ValueError(f"caption folder {folder!r} contains {hits}; set captioner.model_tag to a name "
                         f"without {', '.join(_KEYWORDS)}")
    return folder


def plan_sidecars(stage_configs: list[Any]) -> dict[str, Any]:
    """Sidecar folder -> text function, from the run's stage configs."""
    from recaption.stage import model_tag
    from schemas.config import GroundingConfig, OcrConfig, RecaptionConfig, SpatialConfig

    out: dict[str, Any] = {}
    for cfg in stage_configs:
        if isinstance(cfg, RecaptionConfig) and cfg.sidecars:
            tag = model_tag(cfg)
            out[caption_folder(cfg.round, tag)] = RoundCaption(cfg.round, tag)
        elif isinstance(cfg, OcrConfig):
            out[SIDECAR_DIRS["ocr"]] = SpecialistText("ocr")
        elif isinstance(cfg, SpatialConfig):
            out[SIDECAR_DIRS["spatial"]] = SpecialistText("spatial")
        elif isinstance(cfg, GroundingConfig):
            out[SIDECAR_DIRS["bbox_interleaved"]] = SpecialistText("bbox_interleaved")
    return out
