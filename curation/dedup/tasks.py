"""Which dedup tasks a config runs (exact, pHash bands, thumbnail neighbours, SemDeDup, MinHash documents and
captions) and which signature rows take part in each: shared by the reference decide's clustering and the
partitioned path."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from vila2_curate.curation.dedup.columns import bool_mask, has_values
from vila2_curate.curation.dedup.minhash import EMPTY
from vila2_curate.schemas.config import DedupConfig


def dedup_tasks(cfg: DedupConfig, images: bool) -> set[str]:
    """The tasks of ``cfg``'s methods (image tasks only when the run has images)."""
    m = set(cfg.methods)
    out = set()
    if images:
        out |= {"exact"} & m
        if "phash" in m:
            out.add("phash")
            if cfg.phash_confirm != "none" and cfg.thumbnail_neighbours:
                out.add("thumb")
        if "semantic" in m:
            out.add("semantic")
    if "minhash_documents" in m:
        out.add("document")
    if "minhash_captions" in m:
        out.add("caption")
    return out


def eligible_rows(cfg: DedupConfig, sig: pa.Table, task: str) -> np.ndarray:
    """Row indices of ``sig`` that take part in ``task`` (vectorised: no per-row Python values)."""
    kind = sig.column("kind")
    if task in ("document", "caption"):
        ok = bool_mask(pc.equal(kind, "document" if task == "document" else "pair"))
        mh = sig.column("minhash")
        ok &= has_values(mh)
        rows = np.flatnonzero(ok)
        if rows.size == 0:
            return rows
        first = pc.list_element(mh.take(pa.array(rows)), 0)
        return rows[bool_mask(pc.not_equal(first, pa.scalar(int(EMPTY), pa.uint32())))]
    ok = bool_mask(pc.equal(kind, "pair"))
    if cfg.mmc4_policy == "drop_image":
        ok |= bool_mask(pc.equal(kind, "doc_image"))
    if task == "exact":
        ok &= bool_mask(pc.greater(pc.utf8_length(sig.column("sha256")), 0))
    elif task in ("phash", "thumb"):
        ok &= bool_mask(pc.is_valid(sig.column("phash")))
        if task == "thumb":
            ok &= bool_mask(pc.is_valid(sig.column("thumb")))
    else:
        ok &= has_values(sig.column("embedding"))
    return np.flatnonzero(ok)
