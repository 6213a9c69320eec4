"""clip_filter: keep rows (and MMC4 images) by CLIP score, a floor and/or the top p% per group.

A percentile cut needs the whole dataset, so this is a GlobalStage: ``signatures`` extracts one small row
per alive pair / document image, the engine groups them, ``decide`` ranks each group exactly (sort by
score, ties by key) and returns the drops.

``preset: vila_coyo`` reproduces VILA's COYO rule (NVlabs/VILA ``data_prepare/coyo/coyo_downloader.py``):
per parquet shard, ``clip_sim = clip_similarity_vitb32 + clip_similarity_vitl14`` (COYO's own columns,
carried in ``meta``), keep ``clip_sim > 0.6``, sort descending and keep the first
``int(n_shard * 0.2)`` rows, where ``n_shard`` counts the shard's rows *before* the 0.6 floor. Here
``n_shard`` is the shard's rows still alive when this stage runs (VILA counts every parquet row, including
ones whose download later failed), ``top_percent`` (default 20) and ``vila_min_similarity_sum`` (default
0.6) are configurable, and ties are broken by key (pandas' unstable sort leaves them arbitrary). Rows
without both similarity columns (e.g. MMC4 images in a mixed run) fall back to the generic rule on their
own clip_score, per source.

Generic rule: ``clip_score >= min_score`` survives the floor; then the best ``ceil(n * top_percent / 100)``
of the group's n rows are kept (n counts rows below the floor too, so "top 20%" means 20% of the source).

Partitioned decide (schemas.stage.PartitionedDecide, curation/cutoffs.py): ``method: exact`` groups each
ranking group whole on one worker and runs ``decide`` there (identical decisions); ``method: sketch``
sends one Apache DataSketches KLL sketch per group and shard, merges them, and each shard drops its rows
below the merged cut (normalised rank error ~1.3% at k=200, stated in the reason and the summary; ties
at the cut are kept). Floors are per-row and exact under both methods. The single-process ``decide``
always ranks exactly.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pyarrow as pa

from vila2_curate.curation import cutoffs
from vila2_curate.curation.cutoffs import require_datasketches
from vila2_curate.schemas.config import ClipFilterConfig
from vila2_curate.schemas.rows import DECISION_SCHEMA
from vila2_curate.schemas.stage import StageBase

SIGNATURE_SCHEMA = pa.schema(
    [
        pa.field("source", pa.string()),
        pa.field("key", pa.string()),
        pa.field("image_index", pa.int32()),
        pa.field("shard", pa.string()),
        pa.field("group", pa.string()),  # what decide ranks within: source, or source/shard for the preset
        pa.field("rule", pa.string()),  # "clip_score" | "vila_coyo"
        pa.field("clip_score", pa.float64()),
        pa.field("clip_similarity_vitb32", pa.float64()),
        pa.field("clip_similarity_vitl14", pa.float64()),
    ]
)
_VILA_DEFAULT_TOP_PERCENT = 20.0


class ClipFilterStage(cutoffs.CutoffDecide, StageBase):
    """GlobalStage over CLIP scores; decisions carry ``value`` = the threshold that dropped the row."""

    name = "clip_filter"
    version = "1"
    group_by = "group"

    def __init__(self, cfg: ClipFilterConfig | None = None) -> None:
        self.cfg = cfg or ClipFilterConfig()
        if self.cfg.method == "sketch":
            require_datasketches()
        p = self.cfg.top_percent
        if p is not None and not 0 < p <= 100:
            raise ValueError(f"clip_filter top_percent must be in (0, 100], got {p}")
        if self.cfg.preset is None and self.cfg.min_score is None and p is None:
            raise ValueError("clip_filter needs min_score, top_percent or preset: vila_coyo")

    def setup(self) -> None:
        """No model: scores were computed by the clipscore stage."""

    # -- pass 1: signatures ----------------------------------------------------------------------------
    def signatures(self, batch: pa.Table) -> pa.Table:
        rows: list[dict[str, Any]] = []
        cols = {c: batch.column(c).to_pylist() for c in ("source", "key", "shard", "drop_reason")}
        if "image_info" in batch.column_names:
            infos = batch.column("image_info").to_pylist()
            for i, ims in enumerate(infos):
                if cols["drop_reason"][i] is not None:
                    continue
                for k, im in enumerate(ims or []):
                    if im.get("drop_reason") is None:
                        rows.append(self._signature(cols, i, k, im.get("clip_score"), None))
        else:
            scores, metas = batch.column("clip_score").to_pylist(), batch.column("meta").to_pylist()
            for i, reason in enumerate(cols["drop_reason"]):
                if reason is None:
                    rows.append(self._signature(cols, i, -1, scores[i], metas[i]))
        return pa.Table.from_pylist(rows, schema=SIGNATURE_SCHEMA)

    def _signature(
        self, cols: dict[str, list], i: int, image_index: int, score: float | None, meta: str | None
    ) -> dict[str, Any]:
        source, shard = cols["source"][i], cols["shard"][i]
        b32 = l14 = None
        if self.cfg.preset == "vila_coyo" and meta:
            m = json.loads(meta)
            b32, l14 = _num(m.get("clip_similarity_vitb32")), _num(m.get("clip_similarity_vitl14"))
        vila = b32 is not None and l14 is not None
        return {
            "source": source,
            "key": cols["key"][i],
            "image_index": image_index,
            "shard": shard,
            "group": f"{source}/{shard}" if vila else source,
            "rule": "vila_coyo" if vila else "clip_score",
            "clip_score": score,
            "clip_similarity_vitb32": b32,
            "clip_similarity_vitl14": l14,
        }

    # -- pass 2: decide --------------------------------------------------------------------------------
    def decide(self, signatures: pa.Table) -> pa.Table:
        """Drops for one group; the same rows in any order give the same decisions (sorted by key)."""
        rows = signatures.to_pylist()
        if not rows:
            return DECISION_SCHEMA.empty_table()
        out: list[dict[str, Any]] = []
        by_group: dict[str, list[dict[str, Any]]] = {}
        for r in rows:
            by_group.setdefault(r["group"], []).append(r)
        for group in sorted(by_group):
            out.extend(self._decide_group(group, by_group[group]))
        out.sort(key=lambda d: (d["source"], d["key"], d["image_index"]))
        return pa.Table.from_pylist(out, schema=DECISION_SCHEMA)

    def _decide_group(self, group: str, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        n = len(rows)
        vila = rows[0]["rule"] == "vila_coyo"
        drops: list[dict[str, Any]] = []

        def drop(r: dict[str, Any], reason: str, value: float | None) -> None:
            drops.append(
                {
                    "source": r["source"],
                    "key": r["key"],
                    "image_index": r["image_index"],
                    "drop_reason": reason,
                    "flag": None,
                    "group": group,
                    "value": value,
                }
            )

        ranked: list[tuple[float, dict[str, Any]]] = []
        for r in rows:
            score, floor = self._screen(r, vila)
            if floor is not None:
                drop(r, *floor)
            else:
                ranked.append((score, r))

        percent, k = self._keep_count(n, vila)
        if percent is None:
            return drops
        ranked.sort(key=lambda sr: (-sr[0], sr[1]["key"], sr[1]["image_index"], sr[1]["source"]))
        cut = ranked[k - 1][0] if 0 < k <= len(ranked) else None
        what = "clip_similarity_vitb32+vitl14 " if vila else ""
        for rank, (score, r) in enumerate(ranked[k:], start=k + 1):
            drop(
                r,
                f"clip_below_top_percent: {what}{score:.4f} ranks {rank} > {k} kept "
                f"(top {percent:g}% of {n} in {group!r}, cut {_fmt(cut)})",
                cut,
            )
        return drops

    def _screen(self, r: dict[str, Any], vila: bool) -> tuple[float | None, tuple[str, float | None] | None]:
        """(ranking score, (floor reason, value) or None): the per-row part of the rule."""
        cfg = self.cfg
        if vila:
            score = r["clip_similarity_vitb32"] + r["clip_similarity_vitl14"]
            if not score > cfg.vila_min_similarity_sum:
                return score, (f"clip_below_floor: clip_similarity_vitb32+vitl14 {score:.4f} <= "
                               f"{cfg.vila_min_similarity_sum:.4f} (vila_coyo)", cfg.vila_min_similarity_sum)
            if cfg.min_score is not None and r["clip_score"] is not None and r["clip_score"] < cfg.min_score:
                return score, (f"clip_below_floor: {r['clip_score']:.4f} < {cfg.min_score:.4f}", cfg.min_score)
            return score, None
        score = r["clip_score"]
        if score is None or math.isnan(score):
            return None, ("clip_unscored: no CLIP score (empty caption or not run through clipscore)", None)
        if cfg.min_score is not None and score < cfg.min_score:
            return score, (f"clip_below_floor: {score:.4f} < {cfg.min_score:.4f}", cfg.min_score)
        return score, None

    def _keep_count(self, n: int, vila: bool) -> tuple[float | None, int]:
        """(top percent, rows kept by it) for a group of n rows; percent None: no top-percent rule."""
        cfg = self.cfg
        percent = cfg.top_percent if cfg.top_percent is not None else (_VILA_DEFAULT_TOP_PERCENT if vila else None)
        if percent is None:
            return None, n
        return percent, int(n * percent / 100) if vila else math.ceil(n * percent / 100 - 1e-9)

    # -- partitioned decide (schemas.stage.PartitionedDecide; curation/cutoffs.py) -----------------------
    def partition(self, signatures: pa.Table) -> pa.Table:
        if self.cfg.method == "exact":
            return cutoffs.exact_partition(signatures, self.group_by)
        rows = signatures.to_pylist()
        values = []
        for r in rows:
            score, floor = self._screen(r, r["rule"] == "vila_coyo")
            values.append(score if floor is None else None)
        return cutoffs.sketch_partition([r["group"] for r in rows], values)

    def shard_decisions(self, combined: pa.Table, signatures: pa.Table) -> pa.Table:
        if self.cfg.method == "exact":
            return combined.select(DECISION_SCHEMA.names).cast(DECISION_SCHEMA)
        groups = cutoffs.sketch_groups(combined)
        cuts: dict[str, tuple[float | None, int, float | None]] = {}
        err = cutoffs.rank_error()
        out = []
        for r in signatures.to_pylist():
            vila, group = r["rule"] == "vila_coyo", r["group"]
            score, floor = self._screen(r, vila)
            if floor is not None:
                out.append(_decision(r, group, *floor))
                continue
            if group not in cuts:
                n, blob = groups[group]
                percent, k = self._keep_count(n, vila)
                cuts[group] = (percent, n, None if percent is None else cutoffs.top_k_cut(blob, k))
            percent, n, cut = cuts[group]
            if cut is not None and score < cut:
                what = "clip_similarity_vitb32+vitl14 " if vila else ""
                out.append(_decision(r, group, f"clip_below_top_percent: {what}{score:.4f} < cut {_fmt(cut)} "
                                     f"(top {percent:g}% of {n} in {group!r}, KLL sketch, rank error "
                                     f"+-{err:.2%})", cut))
        out.sort(key=lambda d: (d["source"], d["key"], d["image_index"]))
        return pa.Table.from_pylist(out, schema=DECISION_SCHEMA)

    def summarize(self, decisions: pa.Table, signatures: pa.Table) -> dict[str, Any]:
        """Per group: rows seen, dropped, and the top-percent cut; goes to the segment summary."""
        seen: dict[str, int] = {}
        for g in signatures.column("group").to_pylist():
            seen[g] = seen.get(g, 0) + 1
        dropped: dict[str, int] = {}
        cuts: dict[str, float | None] = {}
        for g, reason, value in zip(
            *(decisions.column(c).to_pylist() for c in ("group", "drop_reason", "value")), strict=True
        ):
            dropped[g] = dropped.get(g, 0) + 1
            if reason and reason.startswith("clip_below_top_percent"):
                cuts[g] = value
        method = cutoffs.method_summary(self.cfg.method)
        return {
            **method,
            "groups": {
                g: {
                    "rows": n,
                    "dropped": dropped.get(g, 0),
                    "kept": n - dropped.get(g, 0),
                    "top_percent_cut": cuts.get(g),
                }
                for g, n in sorted(seen.items())
            }
        }


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def _decision(r: dict[str, Any], group: str, reason: str, value: float | None) -> dict[str, Any]:
    return {"source": r["source"], "key": r["key"], "image_index": r["image_index"], "drop_reason": reason,
            "flag": None, "group": group, "value": value}


def _fmt(v: float | None) -> str:
    return "none" if v is None else f"{v:.4f}"
