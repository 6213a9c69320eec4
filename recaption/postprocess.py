"""Caption clean-up and quality flags for VLM generations.

Small VLMs degenerate in known ways: they loop on an n-gram ("a red car, a red car, ..."), repeat whole
sentences, refuse ("I'm sorry, I cannot ..."), stop at the token limit mid-sentence, or say nothing.
:func:`clean_caption` removes what can be removed safely (loops, repeated sentences) and *flags* what
cannot be repaired. Flags travel on the caption record; the writer's caption policy
(``schemas.captions``) never picks a caption flagged ``truncated``, ``refusal`` or ``empty`` for the
trainer's ``.txt``, so nothing bad is used silently.

Flags:
- ``truncated``: the generation hit the token limit and its end is not a complete sentence.
- ``refusal``: the model declined or said it cannot see the image.
- ``empty``: nothing left (or only punctuation) after cleaning.
- ``repetition_removed``: informational; loops or repeated sentences were cut.
- ``caption_hygiene:<kind>``: the shared caption cleaner (``schemas.text_hygiene``, the one the alt-text
  goes through) removed control/zero-width/bidi characters or special tokens, repaired mojibake, cut an
  over-long answer, ... (whitespace-only changes are not flagged).
"""

from __future__ import annotations

import re
from typing import NamedTuple

from vila2_curate.schemas import text_hygiene

TRUNCATED, REFUSAL, EMPTY, REPETITION_REMOVED = "truncated", "refusal", "empty", "repetition_removed"
HYGIENE_FLAG = "caption_hygiene:"  # + a schemas.text_hygiene kind

_MAX_NGRAM = 24  # longest loop unit, in words
_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+")
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*$")
_WORD_NORM = re.compile(r"[^\w]+")
# Refusal openings; matched at the start of the caption (or of its first sentence).
_REFUSAL = re.compile(
    r"^\W*(i'?m sorry|i am sorry|sorry,? (but )?i\b|i apologi[sz]e|i cannot|i can ?not|i can'?t|"
    r"i'?m (unable|not able)|i am (unable|not able)|i do not have the ability|"
    r"unfortunately,? i (cannot|can'?t)|"
    r"as an ai\b|as a language model|as an artificial intelligence)",
    re.IGNORECASE,
)
# Anywhere in a short caption: statements that the model cannot see the image at all.
_NO_IMAGE = re.compile(
    r"\b(as an ai (language )?model|"
    r"i (cannot|can'?t|am unable to|'m unable to) (see|view|access) (the |this |any )?image)",
    re.IGNORECASE,
)


class Cleaned(NamedTuple):
    text: str
    flags: list[str]  # sorted, unique


def _norm(word: str) -> str:
    return _WORD_NORM.sub("", word.lower())


def collapse_loops(text: str) -> tuple[str, bool]:
    """Collapse loops (see :func:`_collapse`); returns (text, whether anything was cut)."""
    out, first = _collapse(text)
    return out, first is not None


def _collapse(text: str) -> tuple[str, int | None]:
    """Collapse an n-gram repeated back to back (>= 3 times; >= 4 for single words) to one copy.

    A loop running into the end of the text (a partial last copy) is dropped with it. Words compare
    case- and punctuation-insensitively so "a red car, a red car." counts as a loop. Also returns the
    word index where the first loop started (None: no loop).
    """
    words = text.split()
    norm = [_norm(w) for w in words]
    out: list[str] = []
    i, first = 0, None
    while i < len(words):
        jumped = False
        for n in range(1, min(_MAX_NGRAM, (len(words) - i) // 3) + 1):
            unit = norm[i : i + n]
            if not any(unit):
                continue
            reps = 1
            while norm[i + reps * n : i + (reps + 1) * n] == unit:
                reps += 1
            if reps < (4 if n == 1 else 3):
                continue
            j, k = i + reps * n, 0
            while j < len(words) and k < n and norm[j] == unit[k]:  # a partial copy after the loop
                j, k = j + 1, k + 1
            if j == len(words) - 1 and k < n and unit[k].startswith(norm[j]):  # cut mid-word at the end
                j += 1
            out.extend(words[i : i + n])
            first = i if first is None else first
            i, jumped = j, True
            break
        if not jumped:
            out.append(words[i])
            i += 1
    return " ".join(out), first


def dedup_sentences(text: str) -> tuple[str, bool]:
    """Drop sentences whose normalised form already appeared earlier in the caption."""
    seen: set[str] = set()
    kept: list[str] = []
    for s in _SENTENCE_SPLIT.split(text):
        key = " ".join(_norm(w) for w in s.split() if _norm(w))
        if key and key in seen:
            continue
        seen.add(key)
        kept.append(s)
    return " ".join(kept), len(kept) != len(_SENTENCE_SPLIT.split(text))


def is_refusal(text: str) -> bool:
    first = _SENTENCE_SPLIT.split(text.strip(), maxsplit=1)[0] if text.strip() else ""
    return bool(_REFUSAL.match(text.strip()) or _REFUSAL.match(first) or _NO_IMAGE.search(text[:300]))


def clean_caption(text: str | None, hit_max_tokens: bool = False) -> Cleaned:
    """Return the cleaned caption and its flags.

    ``hit_max_tokens`` is the backend's report that generation stopped at the limit (finish_reason
    "length"). Such a caption is flagged ``truncated`` unless the limit was spent inside a loop that was
    removed and what remains ends with a complete sentence (the loop, not the content, was cut).
    """
    flags: set[str] = set()
    # the same cleaner as the alt-text (control/zero-width/bidi characters, special tokens, mojibake, long
    # text); line breaks kept for line-structured answers. Kinds other than plain whitespace become flags
    # ``caption_hygiene:<kind>`` on the caption record.
    hyg = text_hygiene.clean_caption(text, keep_newlines=True)
    flags.update(f"{HYGIENE_FLAG}{k}" for k in hyg.changes if k != text_hygiene.WHITESPACE)
    raw = hyg.text.replace("\r\n", "\n").strip()
    cleaned = "\n".join(" ".join(line.split()) for line in raw.split("\n")).strip()
    tail_loop = False  # the first loop started right after a complete sentence (or at the very start)
    if "\n" in cleaned:  # line-structured output (grounding lists): per line, then repeated lines
        lines = [collapse_loops(line) for line in cleaned.split("\n")]
        loop_cut = any(c for _, c in lines)
        deduped, sent_cut = dedup_lines("\n".join(t for t, _ in lines))
    else:
        looped, first = _collapse(cleaned)
        loop_cut = first is not None
        if loop_cut:
            before = cleaned.split()[:first]
            tail_loop = not before or bool(_SENTENCE_END.search(before[-1]))
        deduped, sent_cut = dedup_sentences(looped)
    cleaned = deduped.strip()
    if loop_cut or sent_cut:
        flags.add(REPETITION_REMOVED)
    if loop_cut:
        cleaned = re.sub(r"[,;:\s-]+$", "", cleaned)
        if cleaned and not _SENTENCE_END.search(cleaned):
            cleaned += "."
    if not cleaned or not re.search(r"\w", cleaned):
        flags.add(EMPTY)
    elif is_refusal(cleaned):
        flags.add(REFUSAL)
    if hit_max_tokens and not (tail_loop and cleaned and EMPTY not in flags):
        flags.add(TRUNCATED)
    return Cleaned(cleaned, sorted(flags))


def dedup_lines(text: str) -> tuple[str, bool]:
    """Drop empty lines and lines whose normalised form already appeared (looping object lists)."""
    seen: set[str] = set()
    kept: list[str] = []
    lines = text.split("\n")
    for line in lines:
        key = " ".join(_norm(w) for w in line.split() if _norm(w))
        if not key or key in seen:
            continue
        seen.add(key)
        kept.append(line)
    return "\n".join(kept), len(kept) != len([ln for ln in lines if ln.strip()])
