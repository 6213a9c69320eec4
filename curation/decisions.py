"""Apply whole-dataset decisions (DECISION_SCHEMA rows) to data rows: the third step of a global stage."""

from __future__ import annotations

from collections import defaultdict

import pyarrow as pa

from vila2_curate.schemas.documents import NO_USABLE_IMAGES, has_kept_image
from vila2_curate.schemas.table_ops import replace_columns

DecisionIndex = dict[tuple[str, str], dict[int, tuple[str | None, str | None]]]


def index_decisions(decisions: pa.Table) -> DecisionIndex:
    """(source, key) -> {image_index: (drop_reason, flag)}; the first decision for a target wins."""
    idx: DecisionIndex = defaultdict(dict)
    cols = [decisions.column(c).to_pylist() for c in ("source", "key", "image_index", "drop_reason", "flag")]
    for source, key, image_index, reason, flag in zip(*cols, strict=True):
        idx[(source, key)].setdefault(-1 if image_index is None else image_index, (reason, flag))
    return idx


def apply_decisions(batch: pa.Table, index: DecisionIndex, stage: str) -> pa.Table:
    """Set drop_reason / drop_stage / flags on rows (and images of MMC4 documents) that have a decision.

    Rows dropped earlier keep their first reason; a document whose every image is dropped is dropped too.
    """
    sources, keys = batch.column("source").to_pylist(), batch.column("key").to_pylist()
    drop, dstage = batch.column("drop_reason").to_pylist(), batch.column("drop_stage").to_pylist()
    flags = batch.column("flags").to_pylist()
    has_images = "image_info" in batch.column_names
    infos = batch.column("image_info").to_pylist() if has_images else None
    for i, (source, key) in enumerate(zip(sources, keys, strict=True)):
        decided = index.get((source, key))
        if not decided or drop[i] is not None:
            continue
        for image_index, (reason, flag) in sorted(decided.items()):
            if image_index < 0:
                if flag:
                    flags[i] = sorted(set(flags[i] or []) | {flag})
                if reason and drop[i] is None:
                    drop[i], dstage[i] = reason, stage
            elif infos is not None and image_index < len(infos[i] or []):
                im = infos[i][image_index]
                if reason and im.get("drop_reason") is None:
                    im["drop_reason"], im["drop_stage"] = reason, stage
        if infos is not None and drop[i] is None and infos[i] and not has_kept_image(infos[i]):
            drop[i], dstage[i] = NO_USABLE_IMAGES, stage
    cols: dict = {"drop_reason": drop, "drop_stage": dstage, "flags": flags}
    if infos is not None:
        cols["image_info"] = infos
    return replace_columns(batch, cols)
