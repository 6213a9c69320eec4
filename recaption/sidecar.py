"""The caption sidecar a recaption round writes: folder name and the text of each row.

VILA reads ``<captions>/<folder>/<tar relpath>.json`` = ``{url: {"output": text}}``; one folder per recaption
round and model holds its caption. Declared by ``RecaptionStage.sidecars``; planned by ``pipelines.io.sidecar_plan``, written by the sink.
"""

from __future__ import annotations

from typing import Any

from vila2_curate.schemas.captions import BAD_FLAGS

SPECIALIST_KEYWORDS = ("spatial", "ocr", "bbox_interleaved")  # VILA picks a specialist question by substring


class RoundCaption:
    """The caption written by recaption round ``round`` with model ``model`` (unless flagged bad).
    A class, not a closure, so that the plan pickles to Ray and Beam workers."""

    def __init__(self, round_: int, model: str) -> None:
        self.round, self.model = round_, model

    def __call__(self, row: dict[str, Any]) -> str | None:
        for c in reversed(row.get("captions") or []):
            if c and c.get("round") == self.round and c.get("model") == self.model:
                if set(c.get("flags") or []) & BAD_FLAGS or not (c.get("text") or "").strip():
                    return None
                return c["text"]
        return None


def caption_folder(round_: int, model_tag: str) -> str:
    folder = f"r{round_}-{model_tag}"
    hits = [k for k in SPECIALIST_KEYWORDS if k in folder]
    if hits:  # VILA would take this caption folder for a specialist question
        raise ValueError(f"caption folder {folder!r} contains {hits}; set captioner.model_tag to a name "
                         f"without {', '.join(SPECIALIST_KEYWORDS)}")
    return folder
