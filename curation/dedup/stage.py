"""DedupStage: the dedup GlobalStage (signatures -> decide -> DECISION_SCHEMA rows) and its summary.

Image methods (exact sha256, pHash confirmed by thumbnails or CLIP, SemDeDup) are joined with
union-find, so an item linked to a group by any method joins it; one keeper per group survives, chosen
by ``keeper.keeper_sort_key``: publishable first (the writer would not refuse it), then the most pixels,
then the highest ``clip_score``, then the smallest ``"{source}/{key}/{image_index}"``.

MMC4 documents (``mmc4_policy``):

* ``drop_image``: a duplicate image inside a document is dropped from that document alone (decision with
  its ``image_index``); ``apply_decisions`` drops a document whose every image went.
* ``drop_document``: images inside documents take no part in image dedup (removing one image would
  break the text around it); document dedup is done by MinHash over the document text instead.

With ``minhash_documents`` configured, near-duplicate documents are dropped whole under either policy
(``duplicate_document``), and images of such dropped documents are not used as image keepers.
``minhash_captions`` flags (does not drop) pair rows whose caption is near-duplicated on at least
``boilerplate_min_images`` distinct images (``flag = "boilerplate_caption"``).

Every member of a group gets one decision row (keepers with ``drop_reason`` null), so ``summarize``
and reports can rebuild whole groups; a target never gets two rows (flags merge into its dedup row),
because ``curation.decisions.index_decisions`` keeps only the first row per target.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

import vila2_curate.curation.dedup.components as components
from vila2_curate.curation.dedup.clusters import DedupClusters
from vila2_curate.curation.dedup.columns import (
    Payload,
    bool_mask,
    confirm_payload,
    first_of_each_id,
    has_values,
    list_matrix,
)
from vila2_curate.curation.dedup.combine import BOILERPLATE_FLAG, IMAGE_METHODS
from vila2_curate.curation.dedup.exact import exact_pairs
from vila2_curate.curation.dedup.keeper import keeper_sort_key, pair_publishable, pixels
from vila2_curate.curation.dedup.minhash import minhash_signatures, near_duplicate_pairs
from vila2_curate.curation.dedup.pairs import (
    confirm_candidates,
    semantic_cluster_pairs,
    thumb_candidate_pairs,
)
from vila2_curate.curation.dedup.partitioned import PartitionedDedup
from vila2_curate.curation.dedup.phash import hamming_pairs
from vila2_curate.curation.dedup.tasks import dedup_tasks
from vila2_curate.curation.dedup.thumbnails import thumbnail
from vila2_curate.curation.dedup.unionfind import UnionFind
from vila2_curate.schemas.config import DedupConfig
from vila2_curate.schemas.rows import DECISION_SCHEMA
from vila2_curate.schemas.stage import StageBase

SIGNATURE_SCHEMA = pa.schema(
    [
        pa.field("source", pa.string()),
        pa.field("key", pa.string()),
        pa.field("image_index", pa.int32()),  # -1: the row itself; i >= 0: image i of an MMC4 document
        pa.field("kind", pa.string()),  # "pair" | "document" (text only) | "doc_image"
        pa.field("sha256", pa.string()),
        pa.field("phash", pa.uint64()),
        # thumbnails.THUMB_BYTES (1,480): 16x16 grey, 8x8 CIE Lab, content box, background Lab and a 32x32
        # grey detail grid, of the picture cropped to its content when it sits on a flat background
        pa.field("thumb", pa.binary()),
        pa.field("embedding", pa.list_(pa.float32())),
        pa.field("clip_score", pa.float32()),
        pa.field("text", pa.string()),  # pair caption; first 200 chars of a document (for summaries)
        pa.field("minhash", pa.list_(pa.uint32())),
        pa.field("publishable", pa.bool_()),  # keeper.py: the writer would publish it (url, image, caption)
        pa.field("pixels", pa.int64()),  # width x height (keeper: the larger copy survives)
    ]
)

_WIDE = {pa.string(): pa.large_string(), pa.binary(): pa.large_binary(),
         pa.list_(pa.float32()): pa.large_list(pa.float32()), pa.list_(pa.uint32()): pa.large_list(pa.uint32())}
_WIDE_SIGNATURE_SCHEMA = pa.schema([pa.field(f.name, _WIDE.get(f.type, f.type)) for f in SIGNATURE_SCHEMA])


def item_id(source: str, key: str, image_index: int) -> str:
    return f"{source}/{key}/{image_index}"


class DedupStage(StageBase):
    """GlobalStage over pair rows and MMC4 document rows; ``group_by=None``: one decide() over all."""

    name = "dedup"
    version = "5"  # 2: keeper = publishable, then pixels, then CLIP score, then id; 3: crop-aware confirmation;
    # 4: thumbnails from normalize's decode where it ran in the same segment; 5: a photo's grids from the
    # decoded picture (no work-size copy)
    group_by: str | None = None
    fits_on_sample = True  # k-means centroids of thumbnail neighbours and SemDeDup (schemas.stage step 0)

    def __init__(self, cfg: DedupConfig | None = None) -> None:
        self.cfg = cfg or DedupConfig()
        m = set(self.cfg.methods)
        self._images = bool(m & set(IMAGE_METHODS))
        self.uses_thumbnails = "phash" in m and self.cfg.phash_confirm != "none"  # pHash candidates confirmed by them

    def setup(self) -> None:
        """No model: embeddings and CLIP scores come from the clipscore stage's columns."""

    # ---- map: signatures -------------------------------------------------------------------------
    def summarize(self, decisions: pa.Table, signatures: pa.Table | None = None) -> dict[str, Any]:
        """Group sizes, per-source counts and example groups, for summaries.json and the report; the
        methods that ran, so ``validate`` knows whether byte-identical images should have been merged."""
        return {"methods": list(self.cfg.methods), **summarize(decisions, signatures)}

    def signatures(self, batch: pa.Table) -> pa.Table:
        """One row per alive pair row / alive document / alive image of an alive document."""
        rows: list[dict[str, Any]] = []
        if "image_info" in batch.column_names:
            self._document_rows(batch, rows)
        else:
            self._pair_rows(batch, rows)
        texts = [r.pop("_minhash_text", None) for r in rows]
        todo = [i for i, t in enumerate(texts) if t is not None]
        if todo:
            sigs = minhash_signatures([texts[i] for i in todo], self.cfg.minhash_num_perm,
                                      self.cfg.shingle_words, self.cfg.seed)
            for i, sig in zip(todo, sigs, strict=True):
                rows[i]["minhash"] = sig
        cols = {f.name: [r.get(f.name) for r in rows] for f in SIGNATURE_SCHEMA}
        return pa.Table.from_pydict(cols, schema=SIGNATURE_SCHEMA)

    def _image_fields(self, im: dict[str, Any]) -> dict[str, Any]:
        out = {k: im.get(k) for k in ("sha256", "phash", "embedding", "clip_score")}
        out["pixels"] = pixels(im.get("width"), im.get("height"))
        need_thumb = self.uses_thumbnails and (self.cfg.phash_confirm == "thumbnail" or not im.get("embedding"))
        if need_thumb and im.get("thumb"):
            out["thumb"] = im["thumb"]
        elif need_thumb and im.get("image"):
            try:
                out["thumb"] = thumbnail(im["image"])
            except Exception:  # noqa: BLE001 - an undecodable image just gets no confirmation signal
                out["thumb"] = None
        return out

    def _pair_rows(self, batch: pa.Table, rows: list[dict[str, Any]]) -> None:
        names = ["source", "key", "drop_reason", "image", "sha256", "phash", "thumb", "embedding", "clip_score",
                 "text", "url", "captions", "width", "height"]
        cols = {n: batch.column(n).to_pylist() if n in batch.column_names else [None] * batch.num_rows
                for n in names}
        captions = "minhash_captions" in self.cfg.methods
        for i in range(batch.num_rows):
            if cols["drop_reason"][i] is not None:
                continue
            row: dict[str, Any] = {"source": cols["source"][i], "key": cols["key"][i], "image_index": -1,
                                   "kind": "pair", "text": cols["text"][i],
                                   "publishable": pair_publishable({n: cols[n][i] for n in names})}
            if self._images:
                row.update(self._image_fields({n: cols[n][i] for n in names}))
            else:
                row["clip_score"] = cols["clip_score"][i]
            if captions:
                row["_minhash_text"] = cols["text"][i] or ""
            rows.append(row)

    def _document_rows(self, batch: pa.Table, rows: list[dict[str, Any]]) -> None:
        sources, keys = batch.column("source").to_pylist(), batch.column("key").to_pylist()
        drop = batch.column("drop_reason").to_pylist()
        texts = batch.column("text_list").to_pylist()
        infos = batch.column("image_info").to_pylist()
        docs = "minhash_documents" in self.cfg.methods
        images = self._images and self.cfg.mmc4_policy == "drop_image"
        for d in range(batch.num_rows):
            if drop[d] is not None:
                continue
            if docs:
                text = " ".join(t for t in texts[d] or [] if t)
                rows.append({"source": sources[d], "key": keys[d], "image_index": -1, "kind": "document",
                             "text": text[:200], "_minhash_text": text})
            if images:
                for j, im in enumerate(infos[d] or []):
                    if im.get("drop_reason") is None:
                        rows.append({"source": sources[d], "key": keys[d], "image_index": j, "kind": "doc_image",
                                     "publishable": True, **self._image_fields(im)})

    # ---- aggregate: decide -----------------------------------------------------------------------
    def decide(self, signatures: pa.Table) -> pa.Table:
        """Decision rows for every grouped item; identical for the same rows in any order."""
        sig = _canonical(signatures)
        ids = [item_id(s, k, i) for s, k, i in zip(*(sig.column(c).to_pylist()
                                                     for c in ("source", "key", "image_index")), strict=True)]
        kinds = sig.column("kind").to_pylist()
        out: dict[str, list[Any]] = {}  # id -> [drop_reason, flag, group, value]
        dropped_docs = self._decide_documents(sig, ids, kinds, out)
        self._decide_images(sig, ids, kinds, dropped_docs, out)
        self._decide_captions(sig, ids, kinds, out)
        rows = []
        for iid in sorted(out):
            source, key, index = iid.split("/", 1)[0], *iid.split("/", 1)[1].rsplit("/", 1)
            reason, flag, group, value = out[iid]
            rows.append({"source": source, "key": key, "image_index": int(index), "drop_reason": reason,
                         "flag": flag, "group": group, "value": value})
        return pa.Table.from_pylist(rows, schema=DECISION_SCHEMA)

    def _decide_documents(self, sig: pa.Table, ids: list[str], kinds: list[str],
                          out: dict[str, list[Any]]) -> set[str]:
        if "minhash_documents" not in self.cfg.methods:
            return set()
        rows = [i for i, k in enumerate(kinds) if k == "document"]
        pairs = _minhash_pairs(sig, rows, self.cfg.minhash_threshold)
        dropped: set[str] = set()
        for group in _groups(len(rows), pairs):
            members = [ids[rows[g]] for g in group]
            keeper = min(members)  # documents carry no CLIP score: smallest id
            gid = f"document:{keeper}"
            for m in members:
                reason = None if m == keeper else f"duplicate_document: of {keeper}"
                out[m] = [reason, None, gid, float(len(members))]
                if reason:
                    dropped.add(m.rsplit("/", 1)[0])
        return dropped

    def _decide_images(self, sig: pa.Table, ids: list[str], kinds: list[str], dropped_docs: set[str],
                       out: dict[str, list[Any]]) -> None:
        cfg = self.cfg
        # images of documents dropped as duplicates still link groups (the partitioned decide finds
        # image edges before it knows document decisions) but are the last choice as keeper
        rows = [i for i, k in enumerate(kinds) if k == "pair" or (k == "doc_image" and cfg.mmc4_policy == "drop_image")]
        if not rows or not self._images:
            return
        scale = DedupClusters(cfg, dedup_tasks(cfg, self._images))
        scale.fit([scale.sample(sig)])  # the same centroids the engine fits on its bottom-M sample
        # every row is an image row for pair data: no copy then
        image_sig = sig if len(rows) == sig.num_rows else sig.take(pa.array(rows, type=pa.int64()))
        sha, scores, publishable, sizes = (image_sig.column(c).to_pylist() for c in (
            "sha256", "clip_score", "publishable", "pixels"))
        # thumbnails and embeddings stay in Arrow-backed numpy arrays: as Python lists they cost ~2.5 KB a row
        payload = confirm_payload(image_sig.column("thumb"), image_sig.column("embedding"))
        per_method: dict[str, np.ndarray] = {}
        if "exact" in cfg.methods:
            per_method["exact"] = exact_pairs(sha)
        if "phash" in cfg.methods:
            per_method["phash"] = self._phash_pairs(image_sig, payload, scale)
        emb_idx = np.flatnonzero(payload[3])
        if "semantic" in cfg.methods and emb_idx.size > 1:
            labels = scale.labels(image_sig, "semantic", emb_idx)
            emb = payload[2] if emb_idx.size == len(payload[2]) else payload[2][emb_idx]
            local = semantic_cluster_pairs(emb, labels, cfg.semantic_eps)
            per_method["semantic"] = emb_idx[local] if local.size else local
        union = UnionFind()
        method_uf: dict[str, UnionFind] = {}
        for method in IMAGE_METHODS:
            pairs = per_method.get(method)
            if pairs is None or pairs.size == 0:
                continue
            uf = method_uf[method] = UnionFind()
            for a, b in pairs.tolist():
                uf.union(a, b)
                union.union(a, b)
        for group in union.groups():
            keeper = min(group, key=lambda g: (ids[rows[g]].rsplit("/", 1)[0] in dropped_docs,
                                               keeper_sort_key(publishable[g], sizes[g], scores[g], ids[rows[g]])))
            kid = ids[rows[keeper]]
            gid = f"image:{kid}"
            for g in group:
                reason = None
                if g != keeper:
                    method = next((m for m in IMAGE_METHODS if m in method_uf and g in method_uf[m]
                                   and keeper in method_uf[m] and method_uf[m].connected(g, keeper)), None)
                    method = method or next(m for m in IMAGE_METHODS if m in method_uf and g in method_uf[m])
                    reason = f"duplicate_{method}: of {kid}"
                out[ids[rows[g]]] = [reason, None, gid, float(len(group))]

    def _phash_pairs(self, image_sig: pa.Table, payload: Payload, scale: DedupClusters) -> np.ndarray:
        """pHash candidates within k (multi-index join: identical hashes linked through one representative,
        as a partitioned group sees them), plus thumbnail nearest neighbours within 2k inside each coarse
        thumbnail cluster (crops), each confirmed by a second signal: thumbnail distance (or CLIP cosine
        when configured and present)."""
        cfg = self.cfg
        phash = image_sig.column("phash")
        idx = np.flatnonzero(bool_mask(pc.is_valid(phash)))
        if idx.size < 2:
            return np.empty((0, 2), dtype=np.int64)
        hashes = pc.fill_null(phash, 0).to_numpy()
        pairs = idx[hamming_pairs(hashes[idx], cfg.phash_max_distance, "mih")]
        if cfg.phash_confirm == "none":
            return pairs
        thumbs, has_thumb = payload[0], payload[1]
        with_thumb = idx[has_thumb[idx]]
        if cfg.thumbnail_neighbours and with_thumb.size > 1:
            labels = scale.labels(image_sig, "thumb", with_thumb)
            extra = thumb_candidate_pairs(thumbs, with_thumb, labels, cfg.thumbnail_neighbours)
            if extra.size:
                pairs = np.unique(np.concatenate([pairs, extra]), axis=0) if pairs.size else extra
        return confirm_candidates(pairs, *payload, cfg)

    # ---- the scale path: schemas.stage.PartitionedDecide (curation/dedup/partitioned.py) ---
    def _scale(self) -> PartitionedDedup:
        if getattr(self, "_partitioned", None) is None:
            self._partitioned = PartitionedDedup(self)
        return self._partitioned

    def sample(self, signatures: pa.Table) -> pa.Table:
        return self._scale().sample(signatures)

    def fit(self, samples: Iterable[pa.Table]) -> None:
        self._scale().fit(samples)

    def partition(self, signatures: pa.Table) -> pa.Table:
        return self._scale().partition(signatures)

    def decide_partition(self, rows: pa.Table) -> pa.Table:
        return self._scale().decide_partition(rows)

    def split_pending(self, partial: pa.Table) -> tuple[pa.Table, pa.Table]:
        return self._scale().split_pending(partial)

    def attach_pending(self, pending: pa.Table, signatures: pa.Table, end: str) -> pa.Table:
        return self._scale().attach_pending(pending, signatures, end)

    def confirm_pending(self, attached: pa.Table) -> pa.Table:
        return self._scale().confirm_pending(attached)

    def combine(self, partials: list[pa.Table]) -> pa.Table:
        return self._scale().combine(partials)

    def shard_decisions(self, combined: pa.Table, signatures: pa.Table) -> pa.Table:
        return self._scale().shard_decisions(combined, signatures)

    # ---- step 3 on the engine: schemas.stage.CombinesOnEngine (curation/dedup/components.py) ----
    @property
    def large_component(self) -> int:
        return self.cfg.large_component

    def component_edges(self, confirmed: pa.Table) -> pa.Table:
        return components.layer_edges(confirmed)

    def component_phases(self) -> tuple[str, ...]:
        return ("document", "image", "caption")  # images need document drops; captions need both

    def phase_members(self, phase: str, labels: pa.Table, signatures: pa.Table,
                      earlier: pa.Table | None) -> pa.Table | None:
        if phase == "document":
            return components.document_members(labels, signatures)
        if phase == "image":
            return components.image_members(labels, signatures, earlier)
        return components.caption_members(labels, signatures, earlier)

    def decide_components(self, phase: str, members: pa.Table) -> pa.Table:
        if phase == "document":
            return components.decide_documents(members)
        if phase == "image":
            return components.decide_images(members)
        return components.decide_captions(members, self.cfg.boilerplate_min_images)

    def merge_decisions(self, parts: list[pa.Table]) -> pa.Table:
        return components.shard_decisions(parts)

    def _decide_captions(self, sig: pa.Table, ids: list[str], kinds: list[str],
                         out: dict[str, list[Any]]) -> None:
        if "minhash_captions" not in self.cfg.methods:
            return
        rows = [i for i, k in enumerate(kinds) if k == "pair"]
        pairs = _minhash_pairs(sig, rows, self.cfg.minhash_threshold)
        sha = sig.column("sha256").to_pylist()
        for group in _groups(len(rows), pairs):
            images = {sha[rows[g]] or ids[rows[g]] for g in group}
            if len(images) < self.cfg.boilerplate_min_images:
                continue
            gid = f"caption:{ids[rows[group[0]]]}"
            for g in group:
                entry = out.setdefault(ids[rows[g]], [None, None, gid, float(len(images))])
                entry[1] = BOILERPLATE_FLAG


def _canonical(signatures: pa.Table) -> pa.Table:
    """Sorted by (source, key, image_index), one row per id: makes decide() independent of row order.
    Variable-width columns become 64-bit-offset types: one array of 1.5M thumbnails passes 2 GiB."""
    sig = signatures.select([f.name for f in SIGNATURE_SCHEMA]).cast(_WIDE_SIGNATURE_SCHEMA)
    order = pc.sort_indices(sig, sort_keys=[("source", "ascending"), ("key", "ascending"),
                                            ("image_index", "ascending")])
    sig = sig.take(order).combine_chunks()
    keep = np.flatnonzero(first_of_each_id(sig))
    return sig.take(pa.array(keep, type=pa.int64())) if len(keep) < sig.num_rows else sig


def _minhash_pairs(sig: pa.Table, rows: list[int], threshold: float) -> np.ndarray:
    values = sig.column("minhash").take(pa.array(rows, type=pa.int64()))
    have = np.flatnonzero(has_values(values))
    if len(have) < 2:
        return np.empty((0, 2), dtype=np.int64)
    mat = list_matrix(values.take(pa.array(have)), np.uint32)  # not Python ints: ~5 KB a row at 128 permutations
    pairs = near_duplicate_pairs(mat, threshold)
    return have[pairs] if pairs.size else pairs


def _groups(n: int, pairs: np.ndarray) -> list[list[int]]:
    uf = UnionFind()
    for a, b in pairs.tolist():
        uf.union(a, b)
    return uf.groups()


def summarize(decisions: pa.Table, signatures: pa.Table | None = None, examples: int = 10) -> dict[str, Any]:
    """Group-size histogram, per-source counts and up to ``examples`` largest groups, for reports."""
    d = decisions.to_pylist()
    texts: dict[str, str | None] = {}
    if signatures is not None and signatures.num_rows:
        for s, k, i, t in zip(*(signatures.column(c).to_pylist()
                                for c in ("source", "key", "image_index", "text")), strict=True):
            texts[item_id(s, k, i)] = t
    groups: dict[str, list[dict[str, Any]]] = {}
    per_source: dict[str, Counter] = {}
    for r in d:
        iid = item_id(r["source"], r["key"], r["image_index"])
        if r["group"]:
            groups.setdefault(r["group"], []).append({"id": iid, "drop_reason": r["drop_reason"],
                                                      "flag": r["flag"], "text": texts.get(iid)})
        c = per_source.setdefault(r["source"], Counter())
        if r["drop_reason"]:
            c["dropped"] += 1
            c[r["drop_reason"].split(":", 1)[0]] += 1
        if r["flag"]:
            c[r["flag"]] += 1
    hist = Counter(len(m) for m in groups.values())
    top = sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))[:examples]
    return {
        "groups": len(groups),
        "group_size_histogram": {str(k): hist[k] for k in sorted(hist)},
        "per_source": {s: dict(sorted(c.items())) for s, c in sorted(per_source.items())},
        "examples": [{"group": g, "size": len(m), "members": sorted(m, key=lambda x: x["id"])} for g, m in top],
    }
