"""caption_hygiene: clean every alt-text and MMC4 sentence before dedup (rules: schemas/text_hygiene.py).

Runs before dedup so that near-duplicate and boilerplate captions are compared clean, and so that a row
whose caption is empty is dropped *before* dedup could choose it as the keeper of a group.

Per row:
- pairs: ``text`` is replaced by its cleaned form; MMC4 documents: every ``text_list`` entry (an entry that
  becomes empty stays as ``""`` so ``matched_text_index`` keeps pointing at the right sentence);
- every kind of change adds a row flag ``caption_hygiene:<kind>`` (the sample's .json says what was done)
  and one count per cleaned text to ``run_metrics`` -> ``stats.json``
  ``sources.<source>.counters["caption_hygiene.<kind>"]`` (texts changed by that kind);
- a pair whose caption is empty is dropped: ``empty_caption_after_hygiene`` when cleaning emptied it,
  ``empty_caption`` when it was empty on input. Exception: ``keep_empty_if_recaptioned`` and a recaption
  stage later in the same run (``recaption_follows``, set by the planner): that stage writes the caption
  the writer will use, and the writer still refuses a row that ends without any usable caption.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from vila2_curate.schemas.config import CaptionHygieneConfig
from vila2_curate.schemas.run_metrics import add_metrics
from vila2_curate.schemas.stage import StageBase
from vila2_curate.schemas.table_ops import replace_columns
from vila2_curate.schemas.text_hygiene import EMPTY, clean_caption

FLAG_PREFIX = "caption_hygiene:"
COUNTER_PREFIX = "caption_hygiene."
EMPTY_AFTER = "empty_caption_after_hygiene"
EMPTY_INPUT = "empty_caption"


class CaptionHygieneStage(StageBase):
    """Map stage: clean captions in place, flag and count the changes, drop pairs left without a caption."""

    name = "caption_hygiene"
    version = "1"

    def __init__(self, cfg: CaptionHygieneConfig | None = None) -> None:
        self.cfg = cfg or CaptionHygieneConfig()
        self.recaption_follows = False  # set by pipelines.engine.plan.build_plan

    def setup(self) -> None:
        return None

    def __call__(self, batch: pa.Table) -> pa.Table:
        if "text_list" in batch.column_names:
            return self._documents(batch)
        return self._pairs(batch)

    def _pairs(self, batch: pa.Table) -> pa.Table:
        drop = batch.column("drop_reason").to_pylist()
        alive = [i for i, r in enumerate(drop) if r is None]
        if not alive:
            return batch
        text = batch.column("text").to_pylist()
        flags = batch.column("flags").to_pylist()
        metrics = batch.column("run_metrics").to_pylist()
        stage = batch.column("drop_stage").to_pylist()
        keep_empty = self.cfg.keep_empty_if_recaptioned and self.recaption_follows
        for i in alive:
            cleaned = clean_caption(text[i], self.cfg)
            if cleaned.changes:
                text[i] = cleaned.text
                flags[i] = _with_flags(flags[i], cleaned.changes)
                metrics[i] = add_metrics(metrics[i], {COUNTER_PREFIX + k: 1 for k in cleaned.changes})
            if not cleaned.text.strip() and not keep_empty:
                drop[i] = EMPTY_AFTER if EMPTY in cleaned.changes else EMPTY_INPUT
                stage[i] = self.name
        return replace_columns(batch, {"text": text, "flags": flags, "run_metrics": metrics,
                                       "drop_reason": drop, "drop_stage": stage})

    def _documents(self, batch: pa.Table) -> pa.Table:
        drop = batch.column("drop_reason").to_pylist()
        alive = [i for i, r in enumerate(drop) if r is None]
        if not alive:
            return batch
        text_lists = batch.column("text_list").to_pylist()
        flags = batch.column("flags").to_pylist()
        metrics = batch.column("run_metrics").to_pylist()
        for i in alive:
            counts: dict[str, int] = {}
            sentences = list(text_lists[i] or [])
            for j, s in enumerate(sentences):
                if s is None:
                    continue
                cleaned = clean_caption(s, self.cfg)
                if cleaned.changes:
                    sentences[j] = cleaned.text  # "" when emptied: indices into text_list must not shift
                    for k in cleaned.changes:
                        counts[k] = counts.get(k, 0) + 1
            if counts:
                text_lists[i] = sentences
                flags[i] = _with_flags(flags[i], counts)
                metrics[i] = add_metrics(metrics[i], {COUNTER_PREFIX + k: n for k, n in counts.items()})
        return replace_columns(batch, {"text_list": text_lists, "flags": flags, "run_metrics": metrics})


def _with_flags(existing: list[str] | None, changes: dict[str, Any]) -> list[str]:
    return sorted(set(existing or ()) | {FLAG_PREFIX + k for k in changes})
