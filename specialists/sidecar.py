"""What VILA's specialist sidecars hold for one sample: one answer text per specialist.

VILA reads them in ``llava/data/dataset_impl/coyo_qa.py`` (``LazyCoyoWebQADataset``): for each directory
in ``caption_choice`` it loads ``<dir>/<tar relpath>.json``, takes ``shard_json[url]["output"]`` (a plain
string) and appends one QA turn after the caption: a question drawn from ``format2questions[kind]`` and
the sidecar text as the answer, where ``kind`` is picked by substring of the *directory path*, checked in
the order "spatial", "ocr", "bbox_interleaved". The questions fix what the answer must look like:

- spatial: "Describe the image in details, with a focus on spatial relations." -> a description with the
  relations between objects;
- ocr: "Describe the textual content in the image." / "Identify the text visible in this image." -> the
  text that is visible;
- bbox_interleaved: "Write a detailed caption for the image and specify the location of the main objects
  in [xmin,ymin,xmax,ymax]." -> the caption with each object's box written right after its mention.

So a sample without a specialist result gets no entry (VILA then skips that QA turn) rather than an empty
answer, and the writer must name the folders so that exactly one keyword matches (see ``SIDECAR_DIRS``).
"""

from __future__ import annotations

import re
from typing import Any

from vila2_curate.schemas import text_hygiene
from vila2_curate.specialists._common import current_caption, split_vlm_text
from vila2_curate.specialists.geometry import format_box

# Folder names for the writer: each contains exactly one of VILA's keywords, and "spatial" must never be
# combined with the others because VILA tests "spatial" first.
SIDECAR_DIRS = {"spatial": "specialist_spatial", "ocr": "specialist_ocr",
                "bbox_interleaved": "specialist_bbox_interleaved"}


def ocr_answer(spec: dict[str, Any]) -> str:
    """The VLM's OCR answer if there is one, else the OCR lines quoted in reading order."""
    tool, vlm = split_vlm_text(spec.get("ocr_text"))
    if vlm:
        return vlm
    lines = [ln for ln in tool.splitlines() if ln.strip()]
    if not lines:
        return ""
    quoted = ", ".join(f'"{ln.strip()}"' for ln in lines)
    return f"The text in the image reads: {quoted}."


def spatial_answer(spec: dict[str, Any]) -> str:
    """The VLM's spatial description (if any) followed by the geometric relation sentences."""
    tool, vlm = split_vlm_text(spec.get("spatial_text"))
    return " ".join(p for p in (vlm, tool) if p)


def bbox_interleaved_answer(caption: str, dets: list[dict[str, Any]] | None) -> str:
    """The caption with ``[xmin, ymin, xmax, ymax]`` (normalised, 2 decimals) after each grounded phrase.

    A phrase is annotated at its first whole-word mention (case-insensitive); phrases the caption does not
    spell out (the chunker normalised them) are listed after it, so no detection is lost.
    """
    if not dets:
        return ""
    boxes: dict[str, list[str]] = {}
    for d in dets:
        boxes.setdefault(d["label"], []).append(format_box(list(d["box"])))
    text = caption.strip()
    rest: list[str] = []
    for label, bxs in boxes.items():
        m = re.search(rf"(?<![\w-]){re.escape(label)}(?![\w-])", text, flags=re.IGNORECASE)
        if m is None:
            rest.append(f"{label} {', '.join(bxs)}")
            continue
        text = f"{text[:m.end()]} {', '.join(bxs)}{text[m.end():]}"
    if rest:
        sep = "" if not text or text.endswith((".", "!", "?")) else "."
        text = f"{text}{sep} Objects: {'; '.join(rest)}.".strip()
    return text


def specialist_texts(row: dict[str, Any]) -> dict[str, str]:
    """Per VILA specialist kind ("spatial", "ocr", "bbox_interleaved") the sidecar ``output`` text.

    ``row`` is a pair row as a dict (``specialists``, ``captions``, ``text``); kinds without a result are
    left out, so the writer writes no entry for them.
    """
    spec = dict(row.get("specialists") or {})
    for name in ("ocr_text", "spatial_text"):  # per line first, so a removed token leaves no gap in a quote
        if spec.get(name):
            spec[name] = text_hygiene.clean_caption(spec[name], keep_newlines=True).text
    caption = current_caption(row.get("captions"), row.get("text"))
    out = {
        "spatial": spatial_answer(spec),
        "ocr": ocr_answer(spec),
        "bbox_interleaved": bbox_interleaved_answer(caption, spec.get("grounding")),
    }
    # the trainer reads these answers verbatim: the caption cleaner runs on them too (OCR can read a
    # "<image>" off a sign; a VLM answer can carry control characters)
    out = {k: text_hygiene.clean_caption(v).text for k, v in out.items() if v}
    return {k: v for k, v in out.items() if v}


class SpecialistText:
    """The specialist answer VILA's specialist QA loader reads for ``kind`` (a class: it pickles to workers)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def __call__(self, row: dict[str, Any]) -> str | None:
        return specialist_texts(row).get(self.kind) or None


def specialist_sidecars(kind: str) -> dict[str, SpecialistText]:
    """What a specialist stage declares as its ``sidecars()``: its folder and text."""
    return {SIDECAR_DIRS[kind]: SpecialistText(kind)}
