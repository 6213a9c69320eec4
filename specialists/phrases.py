"""A small dependency-free noun-phrase chunker for grounding queries.

Why not spaCy: it is not installed in this project's environment, and its English models are a separate
download that machines here cannot make; the detector only needs short object phrases ("red ellipse",
"dog", "wooden table"), which a lexicon of colour/size adjectives and common visual nouns plus a fallback
(the last content word of each run between function words) finds well enough on alt-text and recaptions.
"""

from __future__ import annotations

import re

_WORD = re.compile(r"[a-z]+(?:-[a-z]+)?")


def _words(s: str) -> frozenset[str]:
    """A lexicon from a whitespace-separated string (keeps the word lists readable)."""
    return frozenset(s.split())


COLOURS = _words(
    "red green blue yellow orange purple black white gray grey brown pink cyan magenta violet gold golden "
    "silver beige teal navy turquoise maroon dark light bright pale")
SIZES = _words("small large big tiny huge little tall short long wide narrow giant round square")
MATERIALS = _words("wooden metal glass plastic stone brick paper leather")
MODIFIERS = COLOURS | SIZES | MATERIALS

NOUNS = _words("""
rectangle ellipse triangle circle square shape star line arrow
person man woman boy girl child children people baby player crowd face hand
dog cat bird horse cow sheep bear elephant zebra giraffe fish duck animal
car bus truck bicycle bike motorcycle train boat ship airplane plane vehicle
table chair sofa couch bed desk bench shelf lamp door window wall floor roof stairs
tree flower plant grass leaf leaves bush forest mountain hill lake river sea ocean beach sky cloud sun moon
house building tower bridge street road sidewalk fence sign signboard poster logo label banner
cup mug glass bottle plate bowl fork knife spoon pizza cake bread apple banana orange sandwich food
book laptop computer phone screen keyboard clock television tv camera bag umbrella hat shirt shoe ball
box basket vase kite skateboard surfboard frisbee toy
""")
# Words a detector cannot localise (the whole frame, the medium, abstract nouns): never queried.
ABSTRACT = _words("""
image picture photo photograph illustration view background foreground scene style clipart vector design
art drawing painting render rendering texture pattern colour color lettering text word words letters
front side top bottom left right middle centre center part area piece kind type sort lot number
""")
STOP = _words("""
a an the this that these those some any each every no its his her their our my your
and or but nor with without of in on at by for from to into onto over under above below behind beside
near next between among across along through around against up down out off as than like about
is are was were be been being has have had do does did says say said reads read shows show showing
there here it they he she we you i which who whom whose what where when while
very also just only not all both few many more most other such own same so too can will
""")


def _singular(w: str) -> str:
    """The lexicon form of a plural ("trees" -> "tree", "boxes" -> "box"); unchanged if not in it."""
    if w in NOUNS:
        return w
    for suffix, repl in (("ies", "y"), ("es", ""), ("s", "")):
        if w.endswith(suffix) and w[: -len(suffix)] + repl in NOUNS:
            return w[: -len(suffix)] + repl
    return w


def noun_phrases(caption: str | None, max_phrases: int = 8) -> list[str]:
    """Object phrases in order of first mention, unique, at most ``max_phrases``.

    A phrase is a run of modifiers (colour, size, material) followed by a lexicon noun, with a preceding
    lexicon noun kept as a compound ("parking sign"). Without any lexicon noun in the caption, the
    fallback takes the last content word of each run between function words, with its modifiers.
    """
    if not caption or max_phrases <= 0:
        return []
    words = _WORD.findall(caption.lower())
    phrases = _lexicon_phrases(words) or _fallback_phrases(words)
    out: list[str] = []
    for p in phrases:
        if p not in out:
            out.append(p)
        if len(out) >= max_phrases:
            break
    return out


def _lexicon_phrases(words: list[str]) -> list[str]:
    out: list[str] = []
    mods: list[str] = []
    for k, w in enumerate(words):
        head = _singular(w)
        if head in NOUNS and w not in ABSTRACT:
            nxt = _singular(words[k + 1]) if k + 1 < len(words) else ""
            if nxt in NOUNS and nxt not in ABSTRACT:  # noun-noun compound: keep as a modifier of the next
                mods.append(w)
                continue
            out.append(" ".join([*mods, w]))
            mods = []
        elif w in MODIFIERS:
            mods.append(w)
        else:
            mods = []
    return out


def _fallback_phrases(words: list[str]) -> list[str]:
    out: list[str] = []
    run: list[str] = []
    for w in [*words, "."]:
        if w in STOP or w == "." or w in ABSTRACT:
            content = [x for x in run if x not in MODIFIERS and len(x) >= 3]
            if content:
                head = content[-1]
                mods = [x for x in run[: run.index(head)] if x in MODIFIERS]
                out.append(" ".join([*mods, head]))
            run = []
        else:
            run.append(w)
    return out
