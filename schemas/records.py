"""Records written beside the shards: manifest entries, rejects, per-shard stats.

Counts in stats are deterministic (same input + config -> same numbers, also after a kill and a resume);
wall-clock timings live in a separate record so that stats.json can be compared byte for byte.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("shard", pa.string()),  # output file path relative to the dataset root
        pa.field("kind", pa.string()),  # "wds" (VILA tar) | "mmc4" (pkl + count)
        pa.field("nsamples", pa.int64()),
        pa.field("bytes", pa.int64()),
        pa.field("sha256", pa.string()),
        pa.field("source", pa.string()),
        pa.field("input_shards", pa.list_(pa.string())),
        pa.field("config_hash", pa.string()),
        pa.field("stage_versions", pa.string()),  # JSON {stage name: version}
    ]
)

REJECTS_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string()),
        pa.field("source", pa.string()),
        pa.field("shard", pa.string()),
        pa.field("source_key", pa.string()),
        pa.field("url", pa.string()),
        pa.field("stage", pa.string()),
        pa.field("reason", pa.string()),
        pa.field("quarantined", pa.bool_()),
    ]
)


class ShardStats(BaseModel):
    """Counts for one input shard. Identity: rows_in == kept + dropped + quarantined."""

    model_config = ConfigDict(extra="forbid")

    source: str
    shard: str
    rows_in: int = 0
    kept: int = 0
    dropped: int = 0
    quarantined: int = 0
    reasons: dict[str, int] = Field(default_factory=dict)  # "stage:reason" -> count (drops + quarantines)
    images_in: int = 0  # MMC4: images across documents
    images_kept: int = 0
    image_reasons: dict[str, int] = Field(default_factory=dict)
    counters: dict[str, int] = Field(default_factory=dict)  # stage-specific counters
    output_shards: list[str] = Field(default_factory=list)
    # per recaption round, sums over the published pairs (recaption.saturation); merged into
    # summaries.json["rounds"], left out of stats.json
    round_sums: dict[str, dict[str, float]] = Field(default_factory=dict)

    def balanced(self) -> bool:
        return self.rows_in == self.kept + self.dropped + self.quarantined


def merge_stats(parts: list[ShardStats]) -> dict[str, Any]:
    """Merge per-shard stats into the dataset's stats.json payload (sorted, deterministic)."""
    parts = sorted(parts, key=lambda s: (s.source, s.shard))
    by_source: dict[str, dict[str, Any]] = {}
    total: Counter = Counter()
    total_reasons: Counter = Counter()
    for p in parts:
        src = by_source.setdefault(
            p.source,
            {"rows_in": 0, "kept": 0, "dropped": 0, "quarantined": 0, "images_in": 0, "images_kept": 0,
             "reasons": Counter(), "image_reasons": Counter(), "counters": Counter(), "shards": 0},
        )
        for k in ("rows_in", "kept", "dropped", "quarantined", "images_in", "images_kept"):
            src[k] += getattr(p, k)
            total[k] += getattr(p, k)
        src["reasons"].update(p.reasons)
        src["image_reasons"].update(p.image_reasons)
        src["counters"].update(p.counters)
        src["shards"] += 1
        total_reasons.update(p.reasons)
    for src in by_source.values():
        for k in ("reasons", "image_reasons", "counters"):
            src[k] = dict(sorted(src[k].items()))
    return {
        "total": {**{k: total[k] for k in ("rows_in", "kept", "dropped", "quarantined", "images_in",
                                            "images_kept")},
                  "reasons": dict(sorted(total_reasons.items()))},
        "sources": dict(sorted(by_source.items())),
        "balanced": all(p.balanced() for p in parts),
        "shards": [p.model_dump(exclude={"round_sums"}) for p in parts],
    }
