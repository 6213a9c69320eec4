"""Helpers the three specialist stages share: the specialists struct, quarantine, decoding, model identity.

The three stages each own a part of the ``specialists`` struct (ocr*, grounding*, spatial*) and share its
``models`` JSON; :class:`SpecialistRows` reads the struct once per batch and writes it back with only the
stage's own fields changed, so any stage order keeps what the others wrote.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import pyarrow as pa
from PIL import Image, ImageOps

from vila2_curate.schemas.captions import SPECIALISTS_CAPTION
from vila2_curate.schemas.images import UndecodableImage, decoding, open_image
from vila2_curate.schemas.table_ops import json_object, replace_columns

SPECIALIST_FIELDS = ("ocr", "ocr_text", "grounding", "grounding_text", "spatial", "spatial_text", "models")
VLM_MARKER = "[vlm]"  # separates a VLM prompt's answer from the tool output inside *_text
_ADDRESS = re.compile(r" (object )?at 0x[0-9a-fA-F]+")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")


class SampleError(Exception):
    """A per-row failure: the row is quarantined with ``str(err)`` as its reason, the batch goes on."""


def failure_reason(prefix: str, err: BaseException) -> str:
    """``prefix: Type: detail`` without object addresses, so the same input gives the same reason."""
    detail = _ADDRESS.sub("", str(err)).strip()[:120]
    return f"{prefix}: {type(err).__name__}: {detail}" if detail else f"{prefix}: {type(err).__name__}"


def decode_image(data: bytes | None) -> Image.Image:
    """Decode to upright RGB; boxes are relative to the image as displayed (EXIF orientation applied)."""
    try:
        with decoding():
            img = ImageOps.exif_transpose(open_image(data))
            return img.convert("RGB")
    except UndecodableImage as e:
        raise SampleError(str(e)) from None


def current_caption(captions: list[dict[str, Any]] | None, text: str | None) -> str:
    """The caption the specialists describe (``schemas.captions.SPECIALISTS_CAPTION``), "" when none."""
    return SPECIALISTS_CAPTION(captions, text) or ""


def empty_specialists() -> dict[str, Any]:
    return {"ocr": None, "ocr_text": None, "grounding": None, "grounding_text": None,
            "spatial": None, "spatial_text": None, "models": None}


def read_models(spec: dict[str, Any] | None) -> dict[str, Any]:
    return json_object((spec or {}).get("models"))


class SpecialistRows:
    """One batch's specialists struct, drop columns and the alive row indices, edited in place per row."""

    def __init__(self, batch: pa.Table, stage_name: str) -> None:
        self.batch = batch
        self.stage_name = stage_name
        self.drop = batch.column("drop_reason").to_pylist()
        self.drop_stage = batch.column("drop_stage").to_pylist()
        self.quarantined = batch.column("quarantined").to_pylist()
        self.spec = batch.column("specialists").to_pylist()
        self.alive = [i for i, r in enumerate(self.drop) if r is None]
        self._touched = False

    def column(self, name: str) -> list[Any]:
        """Values of one column for the alive rows, in ``alive`` order."""
        return self.batch.column(name).take(self.alive).to_pylist() if self.alive else []

    def set(self, i: int, models: dict[str, str] | None = None, **fields: Any) -> None:
        """Set this stage's fields of row ``i``; other fields and other stages' ``models`` keys are kept."""
        unknown = set(fields) - set(SPECIALIST_FIELDS) - {"models"}
        if unknown:
            raise KeyError(f"not specialists fields: {sorted(unknown)}")
        spec = dict(self.spec[i]) if self.spec[i] else empty_specialists()
        spec.update(fields)
        if models:
            merged = read_models(spec) | models
            spec["models"] = json.dumps(merged, sort_keys=True)
        self.spec[i] = spec
        self._touched = True

    def quarantine(self, i: int, reason: str) -> None:
        self.drop[i], self.drop_stage[i], self.quarantined[i] = reason, self.stage_name, True
        self._touched = True

    def table(self) -> pa.Table:
        if not self._touched:
            return self.batch
        return replace_columns(self.batch, {
            "specialists": self.spec, "drop_reason": self.drop, "drop_stage": self.drop_stage,
            "quarantined": self.quarantined,
        })


def with_vlm_text(tool_text: str, vlm_text: str | None) -> str:
    """Tool output, then the VLM answer after :data:`VLM_MARKER` (the sidecar helper splits them again)."""
    vlm_text = (vlm_text or "").strip()
    if not vlm_text:
        return tool_text
    return f"{tool_text}\n{VLM_MARKER} {vlm_text}" if tool_text else f"{VLM_MARKER} {vlm_text}"


def split_vlm_text(text: str | None) -> tuple[str, str]:
    """Inverse of :func:`with_vlm_text`: (tool part, VLM part)."""
    text = text or ""
    if text.startswith(f"{VLM_MARKER} "):
        return "", text[len(VLM_MARKER) + 1:].strip()
    head, sep, tail = text.partition(f"\n{VLM_MARKER} ")
    return head.strip(), tail.strip() if sep else ""


# -- model identity ------------------------------------------------------------------------------------
def weights_digest(folder: Path) -> str | None:
    """sha256 over the folder's weight files (names + contents, sorted); None when it holds none.

    Duplicates the idea of curation.models.sha256_files on purpose: specialists/ may not import curation/.
    """
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix in _WEIGHT_SUFFIXES]
    files = [p for p in files if p.suffix == ".safetensors"] or files
    if not files:
        return None
    h = hashlib.sha256()
    for p in sorted(files, key=lambda q: q.name):
        fh = hashlib.sha256()
        with open(p, "rb") as f:
            while block := f.read(8 << 20):
                fh.update(block)
        h.update(f"{p.name}\0{fh.hexdigest()}\n".encode())
    return h.hexdigest()


def model_tag(model: str, digest: str | None, demo: bool) -> str:
    """``model|sha256[:12]`` (+ ``|demo`` for random weights): what produced a specialist's output."""
    parts = [model, (digest or "-")[:12]]
    if demo:
        parts.append("demo")
    return "|".join(parts)
