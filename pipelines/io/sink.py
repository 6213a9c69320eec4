"""ShardSink: routes one input shard's final rows to kept shards, rejects and quarantine, and counts them.

Engine-independent: the local engine feeds it batch by batch; Ray and Beam feed it per input shard.
"""

from __future__ import annotations

from collections import Counter

import pyarrow as pa
import pyarrow.compute as pc

from vila2_curate.pipelines.io.readers.base import InputShard
from vila2_curate.pipelines.io.writers.atomic import OutputFile
from vila2_curate.pipelines.io.writers.mmc4 import Mmc4PklWriter, mark_imageless
from vila2_curate.pipelines.io.writers.records import write_quarantine, write_rejects
from vila2_curate.pipelines.io.writers.wds import WdsShardWriter
from vila2_curate.recaption.saturation import RoundAccumulator
from vila2_curate.schemas.config import OutputConfig
from vila2_curate.schemas.records import ShardStats
from vila2_curate.schemas.run_metrics import read_metrics
from vila2_curate.schemas.table_ops import reason_class, replace_columns


class ShardSink:
    def __init__(self, fs, root: str, out: OutputConfig, shard: InputShard,
                 sidecars: dict | None = None) -> None:
        self.fs, self.root, self.out, self.shard = fs, root, out, shard
        prefix = f"{shard.source}/{shard.shard_id}"
        # a round's input tar keeps its name (coyo/00000_0000.tar -> coyo/00000_0000.tar), not _0000_0000
        part_name = _same_name(shard.shard_id) if shard.kind == "vila_wds" else None
        if shard.row_kind == "document":
            self.writer = Mmc4PklWriter(fs, root, prefix, docs_per_pkl=out.mmc4_docs_per_pkl,
                                        max_images_per_doc=out.mmc4_max_images_per_doc,
                                        min_files=out.mmc4_min_files)
        else:
            self.writer = WdsShardWriter(fs, root, prefix, max_samples=out.shard_max_samples,
                                         max_bytes=out.shard_max_bytes, caption_policy=out.caption_policy,
                                         part_name=part_name, sidecars=sidecars)
        self.stats = ShardStats(source=shard.source, shard=shard.shard_id)
        self._reasons: Counter = Counter()
        self._image_reasons: Counter = Counter()
        self._rejected: list[pa.Table] = []
        self._quarantined: list[pa.Table] = []
        self._run_counters: Counter = Counter()  # stages' per-row counts (run_metrics), e.g. caption hygiene
        self._rounds = RoundAccumulator()

    def write(self, batch: pa.Table) -> None:
        """Route one batch of final rows: kept rows to the writer, the rest to rejects / quarantine."""
        if "image_info" in batch.column_names:
            batch = mark_imageless(batch)  # VILA's MMC4 loader crashes on a document without images
        kept_mask = pc.is_null(batch.column("drop_reason"))
        if pc.any(kept_mask).as_py():
            refused = self.writer.write(batch.filter(kept_mask))
            if refused:
                batch = self._reject_refused(batch, kept_mask, refused)
        self._measure(batch)
        self._account(batch)

    def _measure(self, batch: pa.Table) -> None:
        """Add the stages' per-row counts (every row) and the round figures of the published pairs."""
        metrics = batch.column("run_metrics").to_pylist()
        for m in metrics:
            if m:
                self._run_counters.update(read_metrics(m).get("counters") or {})
        if "captions" not in batch.column_names:
            return
        published = batch.filter(pc.is_null(batch.column("drop_reason")))
        for text, caps, m in zip(published.column("text").to_pylist(), published.column("captions").to_pylist(),
                                 published.column("run_metrics").to_pylist(), strict=True):
            self._rounds.add(text, caps, m)

    def _reject_refused(self, batch: pa.Table, kept_mask, refused: list[tuple[int, str]]) -> pa.Table:
        """Rows the writer could not publish (no url, no caption, ...) become quarantined with its reason."""
        kept_rows = [i for i, k in enumerate(kept_mask.to_pylist()) if k]
        drop = batch.column("drop_reason").to_pylist()
        stage = batch.column("drop_stage").to_pylist()
        quarantined = batch.column("quarantined").to_pylist()
        for idx, why in refused:
            row = kept_rows[idx]
            drop[row], stage[row], quarantined[row] = f"unpublishable: {why}", "write", True
        return replace_columns(batch, {"drop_reason": drop, "drop_stage": stage, "quarantined": quarantined})

    def _account(self, batch: pa.Table) -> None:
        st = self.stats
        st.rows_in += batch.num_rows
        dropped_mask = pc.is_valid(batch.column("drop_reason"))
        quarantined_mask = pc.and_(dropped_mask, pc.fill_null(batch.column("quarantined"), False))
        rejected = batch.filter(dropped_mask)
        st.kept += batch.num_rows - rejected.num_rows
        nq = pc.sum(quarantined_mask).as_py() or 0
        st.quarantined += nq
        st.dropped += rejected.num_rows - nq
        for stage, reason in zip(rejected.column("drop_stage").to_pylist(),
                                 rejected.column("drop_reason").to_pylist(), strict=True):
            self._reasons[f"{stage}:{reason_class(reason)}"] += 1
        if "image_info" in batch.column_names:
            self._count_images(batch, dropped_mask)
        if rejected.num_rows:
            # rejects keep keys and reasons only; the payload of quarantined rows is kept apart for inspection
            self._rejected.append(rejected.drop_columns([c for c in ("image", "image_info")
                                                         if c in rejected.column_names]))
            if self.out.keep_quarantine_payloads and nq:
                self._quarantined.append(batch.filter(quarantined_mask))

    def _count_images(self, batch: pa.Table, dropped_mask: pa.ChunkedArray) -> None:
        for doc_dropped, images in zip(dropped_mask.to_pylist(),
                                       batch.column("image_info").to_pylist(), strict=True):
            for im in images or []:
                self.stats.images_in += 1
                if im.get("drop_reason") is None and not doc_dropped:
                    self.stats.images_kept += 1
                elif im.get("drop_reason") is not None:
                    self._image_reasons[f"{im.get('drop_stage')}:{reason_class(im['drop_reason'])}"] += 1
                else:
                    self._image_reasons["document:dropped_with_document"] += 1

    def close(self) -> tuple[ShardStats, list[OutputFile]]:
        files = self.writer.close()
        truncated = getattr(self.writer, "counters", {}).get("images_truncated", 0)
        if truncated:  # VILA reads at most N images per document; the rest are cut when writing
            self.stats.images_kept -= truncated
            self._image_reasons["mmc4_write:over_image_limit"] += truncated
            self.stats.counters["mmc4_images_truncated"] = truncated
        sid, src = self.shard.shard_id, self.shard.source
        rejected = pa.concat_tables(self._rejected) if self._rejected else None
        write_rejects(self.fs, self.root, src, sid, rejected)
        if self._quarantined:
            write_quarantine(self.fs, self.root, src, sid, pa.concat_tables(self._quarantined))
        st = self.stats
        st.reasons = dict(sorted(self._reasons.items()))
        st.image_reasons = dict(sorted(self._image_reasons.items()))
        files = files + list(getattr(self.writer, "sidecar_files", []))
        collisions = getattr(self.writer, "counters", {}).get("sidecar_url_collisions", 0)
        if collisions:
            st.counters["sidecar_url_collisions"] = collisions
        st.counters.update(self._run_counters)
        st.counters = dict(sorted(st.counters.items()))
        st.round_sums = self._rounds.to_json()
        st.output_shards = [f.relpath for f in files]
        if not st.balanced():  # an engine bug, never bad input: fail loudly rather than publish
            raise RuntimeError(f"accounting broken for {src}/{sid}: {st.model_dump()}")
        return st, files


class _same_name:  # noqa: N801 - a picklable naming function
    """Part i of a re-written tar: the input's own name for part 0, ``<stem>-<i>`` after that."""

    def __init__(self, stem: str) -> None:
        self.stem = stem

    def __call__(self, i: int) -> str:
        return f"{self.stem}.tar" if i == 0 else f"{self.stem}-{i}.tar"
