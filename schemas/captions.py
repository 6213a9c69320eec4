"""Caption selection: which caption of a pair row each stage judges, and which one the trainer reads.

A pair row carries its original alt-text (``text``) and a list of recaption records (``captions``: round,
text, flags, ...). Two readings of "the latest caption" exist, and each stage uses the one named for it
here, so the choice is made in one place and reads the same on every engine:

- :func:`newest_caption_text` - the last ``captions`` entry's text as written, flags not consulted, else
  ``text``.
- :func:`latest_usable_caption` - the highest-round caption without a bad flag (:data:`BAD_FLAGS`: a
  truncated, refused or empty caption is never trained on); :func:`trained_caption_text` is its text,
  else ``text``. This is the caption the writer's "latest" policy publishes.

What each stage judges (the aliases below are the single place to change it):

====================================  ========================  ==========================================
stage                                 caption judged            why
====================================  ========================  ==========================================
clipscore (CLIP-S, the clip filter)   newest_caption_text       a filter right after a recaption judges
                                                                what that round wrote, flagged or not
deltaloss_score, text LMs             newest_caption_text       the same text the clip filter judged
deltaloss_score, VLM scorers          trained_caption_text      scores the caption the trainer would read
specialists (OCR, grounding, spatial) trained_caption_text      describes the caption that is published
writer (.txt)                         choose_caption_source     the configured CaptionPolicy
====================================  ========================  ==========================================

The two DeltaLoss scorers differ only on a row whose newest caption is flagged (truncated, refusal,
empty): the text scorer judges that caption, the VLM scorer the usable one before it. Kept as it was when
the rules were gathered here, so that gathering them changed no output; aligning them is a change of one
alias.

Everything here is pure and deterministic per sample (no I/O, no global RNG): the choice for a key depends
only on the key, its captions and the policy, so it is the same on every engine, every batch size and
after a resume.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

from vila2_curate.schemas.config import CaptionPolicy

Captions = list[dict[str, Any]] | None

# A caption carrying any of these flags is never chosen (VILA trains on the .txt verbatim).
BAD_FLAGS = frozenset({"truncated", "refusal", "empty"})


def is_usable(caption: dict[str, Any]) -> bool:
    """A non-blank caption without a bad flag."""
    text = caption.get("text")
    return bool(text and text.strip()) and not (set(caption.get("flags") or ()) & BAD_FLAGS)


def newest_caption_text(captions: Captions, text: str | None) -> str | None:
    """The last ``captions`` entry's text as written (flags not consulted), else the alt-text ``text``."""
    if captions:
        last = captions[-1].get("text")
        if last:
            return last
    return text


def latest_usable_caption(captions: Captions) -> dict[str, Any] | None:
    """The highest-round usable caption; within one round the later list entry wins (stable order)."""
    best: tuple[int, int] | None = None
    chosen = None
    for i, c in enumerate(captions or ()):
        if c is None or not is_usable(c):
            continue
        rank = (int(c.get("round") or 0), i)
        if best is None or rank > best:
            best, chosen = rank, c
    return chosen


def trained_caption_text(captions: Captions, text: str | None) -> str | None:
    """The latest usable caption's text, else the alt-text ``text`` (None when that is empty too)."""
    chosen = latest_usable_caption(captions)
    return chosen["text"] if chosen is not None else (text or None)


# -- what each scoring stage judges (see the table above) -------------------------------------------------
CaptionChoice = Callable[[Captions, str | None], str | None]
CLIPSCORE_CAPTION: CaptionChoice = newest_caption_text
TEXT_DELTALOSS_CAPTION: CaptionChoice = newest_caption_text
VLM_DELTALOSS_CAPTION: CaptionChoice = trained_caption_text
SPECIALISTS_CAPTION: CaptionChoice = trained_caption_text


def judged_texts(choice: CaptionChoice, captions: list[Captions], texts: list[str | None]) -> list[str | None]:
    """The caption ``choice`` picks for each row (``captions`` and ``texts``: the rows' columns, same length)."""
    return [choice(c, t) for c, t in zip(captions, texts, strict=True)]


# -- the writer's caption policy ------------------------------------------------------------------------
def mix_draw(seed: int, key: str) -> float:
    """A uniform number in [0, 1) from (seed, key): the per-sample coin of the "mix" policy."""
    digest = hashlib.sha256(f"{seed}\x1f{key}".encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def choose_caption_source(
    key: str, original: str | None, captions: Captions, policy: CaptionPolicy
) -> tuple[str, dict[str, Any] | None]:
    """Like :func:`choose_caption` but also returns the chosen caption record (None = the original).

    The writer records the choice in the sample's .json, so the lineage of every .txt is traceable.
    """
    original = original or ""
    latest = latest_usable_caption(captions)
    if policy.mode == "original":
        use_latest = False
    elif policy.mode == "latest":
        use_latest = True
    elif policy.mode == "mix":
        use_latest = mix_draw(policy.seed, key) < policy.mix_ratio
    else:  # pragma: no cover - pydantic restricts the mode
        raise ValueError(f"unknown caption policy mode {policy.mode!r}")
    if use_latest and latest is not None:
        return latest["text"], latest
    if not original.strip() and latest is not None:
        # An empty alt-text is never a better .txt than a good recaption (VILA's loaders index caption[0]).
        return latest["text"], latest
    return original, None


def choose_caption(key: str, original: str | None, captions: Captions, policy: CaptionPolicy) -> str:
    """Return the caption for the sample's .txt.

    - "latest": the highest-round caption without a bad flag ("truncated", "refusal", "empty"), else the
      original.
    - "original": the original alt-text (a usable recaption only if the original is empty).
    - "mix": "latest" for a ``mix_ratio`` share of keys, decided by a hash of (seed, key), else "original".
    """
    return choose_caption_source(key, original, captions, policy)[0]


def has_usable_caption(original: str | None, captions: Captions) -> bool:
    """True when every policy mode yields a non-blank ``.txt``: a non-blank original or a usable recaption.

    ``choose_caption_source`` falls back from one to the other in every mode, so the answer does not
    depend on the policy; dedup uses it to choose keepers the writer will publish.
    """
    return bool(original and original.strip()) or latest_usable_caption(captions) is not None


def publish_problem(url: str | None, image: bytes | None, original: str | None, captions: Captions) -> str | None:
    """Why the writer would refuse a kept pair row (None: it publishes it); one rule for writer and dedup.

    Per-row content rules only; key syntax and duplicate keys are the writer's own checks.
    """
    if not url:
        return "has no url; VILA looks samples up in caption sidecars by url"
    if not image:
        return "has no image bytes"
    if not has_usable_caption(original, captions):
        return "has no usable caption; drop it in a stage before the writer"
    return None
