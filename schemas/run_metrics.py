"""Per-row measurements a map stage hands to the run's stats.json / summaries.json.

Map stages run wherever the engine puts them (Ray actors, Beam workers), so a counter kept on the stage
object never reaches the sink. Instead a stage writes what it measured into the row's ``run_metrics``
column (a JSON object); intermediate files carry it between segments, the sink adds it up per input
shard, and nothing writes it into the published shards, so a later round never counts it again.

Layout: ``{"counters": {name: int}, "round_clip": {"<round>": cosine}}``.
"""

from __future__ import annotations

import json
from typing import Any

from vila2_curate.schemas.table_ops import json_object


def read_metrics(raw: str | None) -> dict[str, Any]:
    return json_object(raw)


def add_metrics(raw: str | None, counters: dict[str, int] | None = None,
                round_clip: dict[int, float] | None = None) -> str | None:
    """``raw`` with ``counters`` added and ``round_clip`` set; None while nothing was ever measured."""
    if not counters and not round_clip:
        return raw
    m = read_metrics(raw)
    if counters:
        c = m.setdefault("counters", {})
        for k, v in counters.items():
            c[k] = int(c.get(k, 0)) + int(v)
    if round_clip:
        rc = m.setdefault("round_clip", {})
        rc.update({str(k): float(v) for k, v in round_clip.items()})
    return json.dumps(m, sort_keys=True)


def round_texts(captions: list[dict[str, Any]] | None, text: str | None) -> dict[int, str]:
    """Each round's caption of one sample: round 0 = the alt-text, round k = the last record of round k
    (the later list entry wins within a round, as in ``schemas.captions.latest_usable_caption``). Empty
    texts are left out."""
    out: dict[int, str] = {}
    if text and text.strip():
        out[0] = text
    for c in captions or ():
        if c is None or c.get("round") is None:
            continue
        t = c.get("text")
        if t and t.strip():
            out[int(c["round"])] = t
        else:
            out.pop(int(c["round"]), None)
    return out
