"""Interleaved (MMC4) documents: the one rule and reason for "a document without usable images".

A document whose images were all dropped cannot be trained on (VILA's MMC4 loader needs an image), so
whichever step sees it first drops it with :data:`NO_USABLE_IMAGES`; normalize, clipscore, the global
decisions and the MMC4 writer all use these two names, so the reason reads the same in every report.
"""

from __future__ import annotations

from typing import Any

NO_USABLE_IMAGES = "no_usable_images"


def has_kept_image(images: list[dict[str, Any] | None] | None) -> bool:
    """True when at least one image of the document is present and not dropped."""
    return any(im is not None and im.get("drop_reason") is None for im in images or ())


def document_text(text_list: list[str] | None) -> str | None:
    """A document's paragraphs joined by single spaces, blank ones skipped (None: no text at all)."""
    joined = " ".join(t.strip() for t in (text_list or []) if t and t.strip())
    return joined or None
