"""Caption hygiene: what a caption may contain before it reaches dedup, a recaption prompt or the trainer.

One pure function, :func:`clean_caption`, used by the ``caption_hygiene`` stage (alt-text and MMC4
sentences), by ``recaption.postprocess`` (every VLM generation, recaptions and specialist VLM answers) and
by the specialist sidecar texts. It lives in ``schemas/`` because it is part of the data contract and
``curation/``, ``recaption/`` and ``specialists/`` may all import ``schemas`` (but not each other).

Why each rule:

- Mojibake and HTML entities are repaired by ftfy (the field's library; hand-written code would only
  re-implement its heuristics). ftfy's steps that change text that is *not* broken (curly quotes, full-width
  CJK, ligatures) are turned off. What ftfy cannot repair is flagged: ``replacement_char`` for U+FFFD (the
  original bytes are gone; the character is removed) and ``mojibake_suspect`` when ftfy still rates the
  text as bad.
- C0/C1 control characters and NUL are removed (tab, CR and LF become spaces; a NUL in a ``.txt`` ends
  the caption for C readers). Zero-width characters (U+200B..U+200D, U+2060) and the BOM (U+FEFF) are
  removed: invisible, they still split or join tokens (and smuggle special tokens past a filter:
  ``<im\\u200bage>``). Bidi embeddings/overrides/isolates (U+202A..U+202E, U+2066..U+2069) are removed:
  they reorder what a reader sees without changing what the model reads. Removing U+200C/U+200D also
  splits emoji ZWJ sequences and changes Persian/Indic shaping; for a training caption that is the lesser
  harm.
- Special tokens are removed, not escaped: ``<image>`` and ``<video>`` (VILA's media placeholders: a stray
  one in a caption makes the trainer look for an image that is not there, misaligning images and text;
  VILA's COYO loader rewrites ``<image>`` but its other loaders and the recaption prompts do not),
  ``<|...|>`` chat/control tokens, and ``CaptionHygieneConfig.special_tokens``. Removal is repeated until
  nothing matches, so ``<im<image>age>`` cannot leave a new ``<image>`` behind, and it runs after the
  invisible characters are gone. A removed token leaves a space, so no neighbouring pieces fuse into a
  token either.
- Whitespace runs (incl. NBSP and other Unicode spaces) become one space; ends are stripped.
- Captions over ``max_chars`` are cut at the last sentence end before the limit (else the last word
  boundary), so the trainer never sees half a word; VILA truncates by tokens, silently, mid-sentence.

Every change is reported by kind (:data:`KINDS`); the stage counts captions per kind into stats.json.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from typing import NamedTuple

import ftfy
import ftfy.badness
from ftfy import TextFixerConfig

from vila2_curate.schemas.config import CaptionHygieneConfig

# Change kinds, in the order the steps run.
MOJIBAKE, HTML_ENTITIES, TERMINAL_ESCAPES = "mojibake", "html_entities", "terminal_escapes"
UNICODE_NORMALIZED, SURROGATES = "unicode_normalized", "surrogates"
CONTROL_CHARS, ZERO_WIDTH, BOM, BIDI = "control_chars", "zero_width", "bom", "bidi_controls"
REPLACEMENT_CHAR, MOJIBAKE_SUSPECT = "replacement_char", "mojibake_suspect"
SPECIAL_TOKENS, WHITESPACE, CUT_LONG, EMPTY = "special_tokens", "whitespace", "cut_long", "empty_after_hygiene"
KINDS = (MOJIBAKE, HTML_ENTITIES, TERMINAL_ESCAPES, UNICODE_NORMALIZED, SURROGATES, CONTROL_CHARS, ZERO_WIDTH,
         BOM, BIDI, REPLACEMENT_CHAR, MOJIBAKE_SUSPECT, SPECIAL_TOKENS, WHITESPACE, CUT_LONG, EMPTY)
# Kinds that mean the text lost something that could not be restored (the rest are repairs).
FLAG_KINDS = frozenset({REPLACEMENT_CHAR, MOJIBAKE_SUSPECT, CUT_LONG, EMPTY})

# ftfy: repair broken text only; leave well-formed typography (quotes, widths, ligatures) alone.
_FTFY = TextFixerConfig(
    unescape_html="auto", remove_terminal_escapes=True, fix_encoding=True, restore_byte_a0=True,
    replace_lossy_sequences=True, decode_inconsistent_utf8=True, fix_c1_controls=True,
    fix_latin_ligatures=False, fix_character_width=False, uncurl_quotes=False, fix_line_breaks=False,
    fix_surrogates=True, remove_control_chars=False, normalization="NFC", explain=True,
)
_FTFY_KIND = {"unescape_html": HTML_ENTITIES, "remove_terminal_escapes": TERMINAL_ESCAPES,
              "fix_surrogates": SURROGATES}

_ZERO_WIDTH = "\u200b\u200c\u200d\u2060"
_BIDI = "".join(chr(c) for c in [*range(0x202A, 0x202F), *range(0x2066, 0x206A)])
_SEPARATOR_CONTROLS = "\x0b\x0c\x1c\x1d\x1e\x1f\x85"  # vertical tab, form feed, info separators, NEL
# every character the loop below may remove or replace (Cc = C0, DEL, C1)
_SUSPECT = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200d\u2060\ufeff\u202a-\u202e\u2066-\u2069\ufffd"
                      "\U000e0000-\U000e007f]")
_MEDIA_TOKENS = ("<image>", "<video>")
_CHAT_TOKEN = r"<\|[^<>|\s]{1,64}\|>"  # <|im_start|>, <|endoftext|>, <|image_pad|>, ...
_SENTENCE_END = re.compile(r"[.!?\u3002\uff01\uff1f][\"'\u201d\u2019)\]]*(?=\s|$)")


class Hygiene(NamedTuple):
    text: str
    changes: dict[str, int]  # kind -> how many (characters, tokens; 1 for per-caption kinds); empty: clean


def _is_control(ch: str) -> bool:
    return unicodedata.category(ch) == "Cc"  # C0, DEL, C1


def _token_pattern(extra: tuple[str, ...]) -> re.Pattern[str]:
    literals = sorted({*_MEDIA_TOKENS, *extra}, key=len, reverse=True)
    return re.compile("|".join([*(re.escape(t) for t in literals if t), _CHAT_TOKEN]))


_PATTERNS: dict[tuple[str, ...], re.Pattern[str]] = {}


def _tokens(cfg: CaptionHygieneConfig) -> re.Pattern[str]:
    key = tuple(cfg.special_tokens)
    if key not in _PATTERNS:
        _PATTERNS[key] = _token_pattern(key)
    return _PATTERNS[key]


def cut_at_sentence(text: str, max_chars: int) -> str:
    """``text`` cut to at most ``max_chars``: at the last sentence end in the second half of the limit,
    else at the last word boundary, else hard (one unbroken run of characters)."""
    if len(text) <= max_chars:
        return text
    head = text[: max_chars + 1]  # +1: a sentence may end exactly at the limit
    ends = [m.end() for m in _SENTENCE_END.finditer(head) if m.end() <= max_chars]
    if ends and ends[-1] >= max_chars // 2:
        return text[: ends[-1]].rstrip()
    space = head.rfind(" ")
    return (text[:space] if space > 0 else text[:max_chars]).rstrip()


def _strip_characters(t: str, keep_newlines: bool, add: Callable[[str], None]) -> str:
    """Remove (or turn into a space) control, zero-width, BOM, bidi, tag and U+FFFD characters."""
    out: list[str] = []
    for ch in t:
        if ch in _ZERO_WIDTH:
            add(ZERO_WIDTH)
        elif ch == "\ufeff":
            add(BOM)
        elif ch in _BIDI:
            add(BIDI)
        elif ch == "\ufffd":
            add(REPLACEMENT_CHAR)
        elif ch == "\n" and keep_newlines:
            out.append(ch)
        elif ch in "\t\n\r":  # whitespace: becomes a space (counted as a whitespace change below)
            out.append(" ")
        elif ch in _SEPARATOR_CONTROLS:  # separator controls: a space, so the words either side stay apart
            out.append(" ")
            add(CONTROL_CHARS)
        elif "\U000e0000" <= ch <= "\U000e007f":  # invisible tag characters (text smuggling)
            add(ZERO_WIDTH)
        elif _is_control(ch):
            add(CONTROL_CHARS)
        else:
            out.append(ch)
    return "".join(out)


def clean_caption(text: str | None, cfg: CaptionHygieneConfig | None = None, *,
                  keep_newlines: bool = False) -> Hygiene:
    """Clean one caption; returns the text and the changes made, by kind.

    ``keep_newlines``: keep line breaks (one per line, each line's spaces collapsed) for line-structured
    text such as a VLM's object list; recaption post-processing splits on them.
    """
    cfg = cfg or CaptionHygieneConfig()
    changes: dict[str, int] = {}

    def add(kind: str, n: int = 1) -> None:
        if n:
            changes[kind] = changes.get(kind, 0) + n

    raw = text or ""
    t = raw
    # fast path (exact): ASCII without '&' or ESC gives ftfy nothing to repair (mojibake, C1 controls and
    # surrogates are non-ASCII; HTML entities need '&', terminal escapes ESC; NFC leaves ASCII alone)
    if cfg.fix_mojibake and t and not (t.isascii() and "&" not in t and "\x1b" not in t):
        fixed, steps = ftfy.fix_and_explain(t, _FTFY)
        steps = steps if fixed != t else ()  # ftfy may report steps that changed nothing
        # one count per kind: an encode/decode pair is one mojibake repair
        for kind in {UNICODE_NORMALIZED if action == "normalize" else _FTFY_KIND.get(param, MOJIBAKE)
                     for action, param in steps or ()}:
            add(kind)
        t = fixed
    ws_before = t
    if _SUSPECT.search(t):  # most captions hold none of these characters: no per-character pass
        t = _strip_characters(t, keep_newlines, add)
    pattern = _tokens(cfg)
    while True:  # until nothing matches: removing one token must not assemble another
        t, n = pattern.subn(" ", t)
        if not n:
            break
        add(SPECIAL_TOKENS, n)
    if keep_newlines:
        lines = [" ".join(line.split()) for line in t.split("\n")]
        t = "\n".join(line for line in lines if line)
        normal = "\n".join(x for x in (" ".join(ln.split()) for ln in ws_before.split("\n")) if x)
    else:
        t = " ".join(t.split())
        normal = " ".join(ws_before.split())
    if normal != ws_before:
        add(WHITESPACE)
    if cfg.max_chars and len(t) > cfg.max_chars:
        t = cut_at_sentence(t, cfg.max_chars)
        add(CUT_LONG)
    if t and cfg.fix_mojibake and not t.isascii() and ftfy.badness.is_bad(t):  # ASCII cannot look bad
        add(MOJIBAKE_SUSPECT)
    if raw.strip() and not t.strip():
        add(EMPTY)
    return Hygiene(t, changes)
