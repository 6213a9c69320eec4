"""Round saturation: how much each recaption round still changes the captions (VILA² stopped gaining at
round 4).

Per round k over the published pair samples: words per caption (mean and standard deviation, as VILA²'s
Table 6 reports caption length per round), the share of captions that changed from round k-1, the text
similarity between consecutive rounds (word-set Jaccard and difflib's ratio over word sequences), and,
when a clipscore stage ran in the same run (it scores every round's caption of a sample against its
image: ``run_metrics.round_clip``), the mean CLIP cosine and CLIP-S per round. Round 0 is the alt-text.

The sink adds rows per input shard (:class:`RoundAccumulator`, plain sums, mergeable); ``finalize`` merges
the shards in sorted order (so the float sums, and summaries.json, are the same on every engine and after a
resume) and writes the result as ``summaries.json["rounds"]``.
"""

from __future__ import annotations

import difflib
import math
import re
from typing import Any

from vila2_curate.schemas.run_metrics import read_metrics, round_texts

_WORD = re.compile(r"\w+")
_SUMS = ("n", "words", "words_sq", "pairs", "changed", "jaccard", "ratio", "clip_n", "clip", "clip_sq", "clips")
CLIPS_WEIGHT = 2.5  # CLIP-S = 2.5 * max(cos, 0), as curation.clipscore (Hessel et al. 2021)


def _tokens(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def similarity(a: str, b: str) -> tuple[float, float]:
    """(Jaccard of the two word sets, difflib ratio of the two word sequences), both in [0, 1]."""
    ta, tb = _tokens(a), _tokens(b)
    sa, sb = set(ta), set(tb)
    jac = len(sa & sb) / len(sa | sb) if sa | sb else 1.0
    ratio = difflib.SequenceMatcher(None, ta, tb, autojunk=False).ratio() if ta or tb else 1.0
    return jac, ratio


class RoundAccumulator:
    """Sums per round for one input shard's published pair rows; ``to_json`` goes into the shard marker."""

    def __init__(self) -> None:
        self.rounds: dict[int, dict[str, float]] = {}

    def _acc(self, k: int) -> dict[str, float]:
        return self.rounds.setdefault(k, dict.fromkeys(_SUMS, 0))

    def add(self, text: str | None, captions: list[dict[str, Any]] | None, run_metrics: str | None) -> None:
        texts = round_texts(captions, text)
        clip = read_metrics(run_metrics).get("round_clip") or {}
        for k, t in texts.items():
            a = self._acc(k)
            w = len(t.split())
            a["n"] += 1
            a["words"] += w
            a["words_sq"] += w * w
            prev = texts.get(k - 1)
            if k >= 1 and prev is not None:
                jac, ratio = similarity(prev, t)
                a["pairs"] += 1
                a["changed"] += int(" ".join(prev.split()) != " ".join(t.split()))
                a["jaccard"] += jac
                a["ratio"] += ratio
            cos = clip.get(str(k))
            if isinstance(cos, int | float) and math.isfinite(cos):
                a["clip_n"] += 1
                a["clip"] += cos
                a["clip_sq"] += cos * cos
                a["clips"] += CLIPS_WEIGHT * max(cos, 0.0)

    def to_json(self) -> dict[str, dict[str, float]]:
        return {str(k): dict(v) for k, v in sorted(self.rounds.items())}


def summarize_rounds(parts: list[dict[str, dict[str, float]]]) -> dict[str, Any]:
    """Merge per-shard sums (in the given order) into per-round figures; {} when no pair was published."""
    total: dict[int, dict[str, float]] = {}
    for part in parts:
        for k, sums in (part or {}).items():
            acc = total.setdefault(int(k), dict.fromkeys(_SUMS, 0))
            for name in _SUMS:
                acc[name] += sums.get(name, 0)
    out: dict[str, Any] = {}
    for k, a in sorted(total.items()):
        n = a["n"]
        mean = a["words"] / n if n else None
        var = max(a["words_sq"] / n - mean * mean, 0.0) if n else None
        rec: dict[str, Any] = {
            "captions": int(n),
            "words_mean": _r(mean), "words_std": _r(math.sqrt(var) if var is not None else None),
        }
        if k >= 1:
            p = a["pairs"]
            rec.update({
                "compared_with_previous": int(p),
                "changed_share": _r(a["changed"] / p if p else None),
                "jaccard_mean": _r(a["jaccard"] / p if p else None),
                "difflib_ratio_mean": _r(a["ratio"] / p if p else None),
            })
        if a["clip_n"]:
            c = a["clip_n"]
            cm = a["clip"] / c
            rec.update({"clip_n": int(c), "clip_cosine_mean": _r(cm),
                        "clip_cosine_std": _r(math.sqrt(max(a["clip_sq"] / c - cm * cm, 0.0))),
                        "clip_score_mean": _r(a["clips"] / c)})
        out[str(k)] = rec
    return out


def _r(x: float | None) -> float | None:
    return None if x is None else round(float(x), 4)
