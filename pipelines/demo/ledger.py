"""What the ground truth records while the sample is written: one row per stored item, the documents,
and the captions settled so far (kept distinct from each other, so no unplanted duplicate appears).

The source writers (img2dataset.py, coyo.py, mmc4.py) settle each item's caption just before storing it and
record it just after; sample.py turns the ledger into ``ground_truth.json``.
"""

from __future__ import annotations

import hashlib
from typing import Any

from vila2_curate.pipelines.demo.hostile import hostile_caption
from vila2_curate.pipelines.demo.items import SampleItem
from vila2_curate.pipelines.demo.prose import ProseGenerator, jaccard, word_shingles

CAPTION_MAX_JACCARD = 0.5  # word-trigram Jaccard any two unrelated pair captions stay below


def sha256_hex(b: bytes) -> str:
    """Hex sha256, the form ground truth and img2dataset's parquet store."""
    return hashlib.sha256(b).hexdigest()


class GroundTruthLedger:
    """Rows, documents and near-duplicate document groups of the ground truth, in the order written."""

    def __init__(self, t: ProseGenerator) -> None:
        self.t = t  # draws the details that make a repeated caption distinct
        self.records: list[dict[str, Any]] = []
        self.documents: list[dict[str, Any]] = []
        self.doc_near_groups: dict[str, list[dict[str, Any]]] = {}
        self._caption_shingles: list[set[tuple[str, ...]]] = []
        self._group_captions: dict[str, str] = {}

    def settle_caption(self, it: SampleItem) -> None:
        """Give ``it`` a caption no unrelated pair caption is a near-duplicate of (trigram Jaccard below
        CAPTION_MAX_JACCARD): copies of one picture (exact/near groups) share theirs, the boilerplate is
        repeated on purpose. Small template pools otherwise repeat captions, and a caption repeated on
        ``boilerplate_min_images`` images would be flagged as boilerplate the ground truth never planted."""
        if it.caption_final:
            return
        group = it.exact_group or it.near_group
        if group is not None and group in self._group_captions:
            it.caption, it.caption_final = self._group_captions[group], True
            return
        if it.boilerplate:
            if not any(jaccard(word_shingles(it.caption), s) == 1.0 for s in self._caption_shingles):
                self._caption_shingles.append(word_shingles(it.caption))
        else:
            cap = it.caption
            for attempt in range(50):
                sh = word_shingles(cap)
                if all(jaccard(sh, s) < CAPTION_MAX_JACCARD for s in self._caption_shingles):
                    break
                cap = (it.caption if attempt < 25 else cap) + self.t.caption_detail(it.kind == "photo")
            if it.caption_bytes is None:  # a cp1252 caption stays exactly what its bytes say
                it.caption = cap
            self._caption_shingles.append(word_shingles(it.caption))
        if group is not None:
            self._group_captions[group] = it.caption
        if it.hostile:
            it.caption, it.caption_intended = hostile_caption(it.hostile, it.caption)
        it.caption_final = True

    def record(self, source: str, file: str, key: str, it: SampleItem, **extra: Any) -> None:
        """One ground-truth row: the item as stored under ``source``/``file``/``key``, plus ``extra``."""
        rec: dict[str, Any] = {
            "source": source, "file": file, "key": key, "kind": it.kind, "expected": it.expected,
            "sha256": sha256_hex(it.data) if it.data is not None else None,
            "format": it.fmt if it.data else None,
            "nbytes": len(it.data) if it.data is not None else None, "width": it.width, "height": it.height,
            "caption": it.caption, "boilerplate": it.boilerplate, "exact_group": it.exact_group,
            "near_group": it.near_group, "near_transform": it.near_transform,
            "similar_group": it.similar_group, "shapes": it.shapes, "words": it.words, "notes": it.notes,
        }
        if it.caption_bytes is not None:
            rec["caption_bytes_hex"] = it.caption_bytes.hex()
        if it.hostile:
            rec["hostile_caption"], rec["caption_intended"] = it.hostile, it.caption_intended
        rec.update(extra)
        self.records.append(rec)
