"""Which sidecar folders a run writes beside its shards, and the text each holds per sample.

VILA reads ``<captions>/<folder>/<tar relpath>.json`` = ``{url: {"output": text}}``: one folder per
recaption round and model (its latest caption), and one per specialist kind, whose folder name must
contain exactly one of "spatial", "ocr", "bbox_interleaved" (VILA picks the question by substring).
Each stage declares its own folders (``Stage.sidecars``: ``recaption.sidecar``, ``specialists.sidecar``);
the text functions are small classes so that the plan pickles to Ray and Beam workers.
"""

from __future__ import annotations

from typing import Any

from vila2_curate.recaption.sidecar import RoundCaption, caption_folder
from vila2_curate.specialists.sidecar import SpecialistText

__all__ = ["RoundCaption", "SpecialistText", "caption_folder", "plan_sidecars"]


def plan_sidecars(stages: list[Any]) -> dict[str, Any]:
    """Sidecar folder -> text function, from the run's stages, in run order."""
    out: dict[str, Any] = {}
    for stage in stages:
        out.update(stage.sidecars())
    return out
