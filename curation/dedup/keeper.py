"""Which member of a duplicate group survives: one that the writer will publish, and the best copy.

Dedup drops every other member of a group, so a keeper that the writer later refuses (an empty caption,
no url) would make the picture vanish from the dataset. The keeper is therefore chosen, in this order:

1. publishable (``schemas.captions.publish_problem`` is None, the writer's own rule: a url, image bytes and a usable caption
   under every caption policy; MMC4 document images are always publishable here, their document's text
   decides for all of its images alike),
2. the larger image (width x height),
3. the better CLIP score (missing or NaN counts as worst),
4. the smallest item id ``"{source}/{key}/{image_index}"`` (total order: ties are impossible).

The key depends only on the member's own attributes, so the choice is the same in one decide() over all
rows and in a partitioned decide that sees members on different workers.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from vila2_curate.schemas.captions import publish_problem

KeeperKey = tuple[bool, int, bool, float, str]


def keeper_sort_key(publishable: bool | None, pixels: int | None, clip_score: float | None,
                    item_id: str) -> KeeperKey:
    """Sort key whose minimum over a group is its keeper (see the module docstring for the order)."""
    score = None if clip_score is None or math.isnan(clip_score) else float(clip_score)
    return (not publishable, -int(pixels or 0), score is None, -(score or 0.0), item_id)


def keeper_sort_columns(publishable: pa.Array | pa.ChunkedArray, pixels: pa.Array | pa.ChunkedArray,
                        clip_score: pa.Array | pa.ChunkedArray, id_rank: np.ndarray) -> list[np.ndarray]:
    """``keeper_sort_key`` as numpy sort keys over Arrow columns, most significant first (for ``np.lexsort``
    over many groups at once, with no Python tuple per member); ``id_rank``: each id's position in id order."""
    score = pc.cast(clip_score, pa.float64()).to_numpy(zero_copy_only=False)
    missing = np.isnan(score)  # null or NaN
    return [~pc.fill_null(publishable, False).to_numpy(zero_copy_only=False),
            -pc.fill_null(pixels, 0).to_numpy(zero_copy_only=False).astype(np.int64),
            missing, -np.where(missing, 0.0, score), id_rank]


def pair_publishable(row: dict[str, Any]) -> bool:
    """Whether the writer would publish this pair row as far as its own content goes (url, image, caption)."""
    captions = [c for c in (row.get("captions") or []) if c is not None]
    return publish_problem(row.get("url"), row.get("image"), row.get("text"), captions) is None


def pixels(width: int | None, height: int | None) -> int | None:
    """width x height, or None when either is unknown (sorts as the smallest image)."""
    if not width or not height:
        return None
    return int(width) * int(height)
