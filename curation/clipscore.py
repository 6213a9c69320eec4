"""clipscore: open_clip image and caption embeddings -> CLIP-S, raw cosine and the image embedding.

One model pass gives both the score the CLIP filter ranks by and the L2-normalised image embedding that
semantic dedup clusters, so no stage has to run CLIP twice. CLIP-S = 2.5 * max(cos, 0) (Hessel et al.
2021, "CLIPScore"); the raw cosine is kept too, because negative cosines all map to CLIP-S 0.

Pairs score the image against ``schemas.captions.CLIPSCORE_CAPTION`` (the newest ``captions`` entry as
written, else the original ``text``; that module says which caption each stage judges and why); MMC4 documents score every alive image against its matched sentence
``text_list[matched_text_index]``, as MMC4 itself assigns images to sentences by CLIP similarity.

Pairs also get the cosine of their image with *each* round's caption (round 0 = the alt-text) in
``run_metrics.round_clip``: with a clipscore stage after a recaption, summaries.json's round saturation
reports CLIP agreement per round (``recaption.saturation``). Only texts other than the scored one are
encoded again (text encoding is a small fraction of the image pass).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from vila2_curate.curation.models import autocast, identity_tag, load_open_clip, resolve_device, resolve_dtype
from vila2_curate.schemas.captions import CLIPSCORE_CAPTION, judged_texts
from vila2_curate.schemas.config import ClipScoreConfig
from vila2_curate.schemas.documents import NO_USABLE_IMAGES, has_kept_image
from vila2_curate.schemas.images import UndecodableImage, decode_rgb, decoding
from vila2_curate.schemas.run_metrics import add_metrics, round_texts
from vila2_curate.schemas.stage import StageBase
from vila2_curate.schemas.table_ops import replace_columns

CLIPS_WEIGHT = 2.5  # Hessel et al. 2021: rescales typical cosines (0..0.4) to roughly 0..1


def clip_score(cosine: float) -> float:
    return CLIPS_WEIGHT * max(cosine, 0.0)


class ClipScoreStage(StageBase):
    """Map stage: sets clip_cosine, clip_score, clip_model and embedding on alive rows / document images.

    ``setup()`` loads the open_clip model on ``runtime.device`` (auto -> cuda) in ``runtime.precision``
    (fp16/bf16 on GPU only) plus a decode thread pool of ``runtime.cpus`` threads, so JPEG decoding and
    resizing of the next batch overlap the GPU work of the current one (PIL releases the GIL); batches go
    to the device from page-locked memory and the features come back once per call, so the GPU is not
    stopped between batches.
    """

    name = "clipscore"
    version = "1"
    loads_model = True  # engines route it like a model (Beam RunInference, GPU actor pools)

    def __init__(self, cfg: ClipScoreConfig | None = None) -> None:
        self.cfg = cfg or ClipScoreConfig()
        self._bundle = None
        self._pool: ThreadPoolExecutor | None = None

    # -- lifecycle -------------------------------------------------------------------------------------
    def setup(self) -> None:
        if self._bundle is not None:
            return
        self.device = resolve_device(self.cfg.runtime)
        self.dtype = resolve_dtype(self.cfg.runtime, self.device)
        self._bundle = load_open_clip(self.cfg.model, self.cfg.pretrained, self.device, self.dtype)
        self.identity = self._bundle.identity
        self.model_tag = identity_tag(self.identity)
        size = self._bundle.model.visual.preprocess_cfg.get("size", 224)
        self.input_size = (size, size) if isinstance(size, int) else tuple(size)
        self._pool = ThreadPoolExecutor(
            max_workers=max(1, round(self.cfg.runtime.cpus)), thread_name_prefix="clipscore-decode"
        )
        self._token_lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        """Ship the config only: engines pickle stages to workers, which call setup() themselves."""
        keep = {"cfg", "resources", "name"}  # name: the planner renames repeated stages per instance
        return {k: v for k, v in self.__dict__.items() if k in keep} | {"_bundle": None, "_pool": None}

    def __del__(self) -> None:
        if getattr(self, "_pool", None) is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    # -- batch transform -------------------------------------------------------------------------------
    def __call__(self, batch: pa.Table) -> pa.Table:
        self.setup()
        if "image_info" in batch.column_names:
            return self._documents(batch)
        return self._pairs(batch)

    def _pairs(self, batch: pa.Table) -> pa.Table:
        drop = batch.column("drop_reason").to_pylist()
        todo = [i for i, r in enumerate(drop) if r is None]
        if not todo:
            return batch
        images = batch.column("image").take(todo).to_pylist()
        captions = batch.column("captions").take(todo).to_pylist()
        texts = judged_texts(CLIPSCORE_CAPTION, captions, batch.column("text").take(todo).to_pylist())
        emb, cos, errors = self.score(images, texts)

        n = batch.num_rows
        cosine = batch.column("clip_cosine").to_pylist()
        score = batch.column("clip_score").to_pylist()
        model = batch.column("clip_model").to_pylist()
        stage, quarantined = batch.column("drop_stage").to_pylist(), batch.column("quarantined").to_pylist()
        emb_rows: list[np.ndarray | None] = [None] * n
        old_emb = batch.column("embedding")
        for j, i in enumerate(todo):
            if errors[j] is not None:
                drop[i], stage[i], quarantined[i] = errors[j], self.name, True
                continue
            model[i] = self.model_tag
            emb_rows[i] = emb[j]
            c = cos[j]
            cosine[i], score[i] = (None, None) if np.isnan(c) else (float(c), clip_score(float(c)))
        embedding = _embedding_column(emb_rows, old_emb)
        metrics = batch.column("run_metrics").to_pylist()
        originals = batch.column("text").take(todo).to_pylist()
        for j, rc in enumerate(self.round_cosines(emb, errors, captions, originals, texts, cos)):
            if rc:
                metrics[todo[j]] = add_metrics(metrics[todo[j]], round_clip=rc)
        return replace_columns(
            batch,
            {
                "run_metrics": metrics,
                "clip_cosine": cosine,
                "clip_score": score,
                "clip_model": model,
                "embedding": embedding,
                "drop_reason": drop,
                "drop_stage": stage,
                "quarantined": quarantined,
            },
        )

    def _documents(self, batch: pa.Table) -> pa.Table:
        infos = batch.column("image_info").to_pylist()
        text_lists = batch.column("text_list").to_pylist()
        drop, dstage = batch.column("drop_reason").to_pylist(), batch.column("drop_stage").to_pylist()
        refs: list[tuple[int, int]] = []
        images: list[bytes | None] = []
        texts: list[str | None] = []
        for d, ims in enumerate(infos):
            if drop[d] is not None:
                continue
            sentences = text_lists[d] or []
            for k, im in enumerate(ims or []):
                if im.get("drop_reason") is not None:
                    continue
                idx = im.get("matched_text_index")
                if idx is None or not 0 <= idx < len(sentences):
                    im["drop_reason"] = (
                        f"clip_no_matched_text: matched_text_index {idx} not in 0..{len(sentences) - 1}"
                    )
                    im["drop_stage"] = self.name
                    continue
                refs.append((d, k))
                images.append(im.get("image"))
                texts.append(sentences[idx])
        if refs:
            emb, cos, errors = self.score(images, texts)
            for j, (d, k) in enumerate(refs):
                im = infos[d][k]
                if errors[j] is not None:
                    im["drop_reason"], im["drop_stage"] = errors[j], self.name
                    continue
                c = float(cos[j])
                im["embedding"] = emb[j].tolist()
                im["clip_model"] = self.model_tag
                im["clip_cosine"], im["clip_score"] = (None, None) if np.isnan(c) else (c, clip_score(c))
        for d, ims in enumerate(infos):
            if drop[d] is None and ims and not has_kept_image(ims):
                drop[d], dstage[d] = NO_USABLE_IMAGES, self.name
        return replace_columns(batch, {"image_info": infos, "drop_reason": drop, "drop_stage": dstage})

    # -- scoring ---------------------------------------------------------------------------------------
    def score(
        self, images: list[bytes | None], texts: list[str | None]
    ) -> tuple[np.ndarray, np.ndarray, list[str | None]]:
        """Embed images and texts pairwise.

        Returns (image embeddings [n, d] float32, L2-normalised; cosines [n], NaN where the text is empty;
        per image an error reason or None). Undecodable images get a zero embedding and a reason instead
        of failing the batch.

        The pool tokenizes the captions first and decodes the images behind them; the text batches keep
        the device busy while the first images decode, and every batch is queued without waiting for the
        device, which is read once at the end.
        """
        self.setup()
        n = len(images)
        bundle, bs = self._bundle, self.cfg.runtime.batch_size
        uniq = sorted({t for t in texts if t})
        tokens = [self._pool.submit(self._tokenize, uniq[s : s + bs]) for s in range(0, len(uniq), bs)]
        futures = [self._pool.submit(self._load_image, data) for data in images]
        txt_parts = [self._encode_async(bundle.model.encode_text, f.result()) for f in tokens]
        errors: list[str | None] = [None] * n
        img_parts, rows = [], []
        for start in range(0, n, bs):
            tensors = []
            for j in range(start, min(start + bs, n)):
                try:
                    tensors.append(futures[j].result())
                    rows.append(j)
                except UndecodableImage as e:
                    errors[j] = str(e)
            if tensors:
                img_parts.append(self._encode_async(bundle.model.encode_image, self._stack(tensors)))
        with torch.inference_mode():
            feats = torch.cat(img_parts).cpu().numpy() if img_parts else None
            txt = torch.cat(txt_parts).cpu().numpy() if txt_parts else None
        # every image failed: no row reads an embedding
        img_emb = np.zeros((n, 0 if feats is None else feats.shape[1]), dtype=np.float32)
        if feats is not None:
            img_emb[rows] = feats
        txt_emb = dict(zip(uniq, txt, strict=True)) if txt is not None else {}
        cos = np.full(n, np.nan, dtype=np.float32)
        for j, t in enumerate(texts):
            if errors[j] is None and t:
                cos[j] = float(np.dot(img_emb[j], txt_emb[t]))
        return img_emb, cos, errors

    def text_embeddings(self, texts: set[str]) -> dict[str, np.ndarray]:
        """L2-normalised embedding of each distinct text, encoded in batches of ``runtime.batch_size``."""
        self.setup()
        uniq, bs = sorted(texts), self.cfg.runtime.batch_size
        out: dict[str, np.ndarray] = {}
        for start in range(0, len(uniq), bs):
            chunk = uniq[start : start + bs]
            feats = self._encode(self._bundle.model.encode_text, self._tokenize(chunk))
            out.update(zip(chunk, feats, strict=True))
        return out

    def round_cosines(self, emb: np.ndarray, errors: list[str | None], captions: list[Any],
                      originals: list[str | None], texts: list[str | None],
                      cos: np.ndarray) -> list[dict[int, float]]:
        """Per scored row, the cosine of its image with each round's caption (round 0 = alt-text): the
        round-saturation report's CLIP agreement per round. The scored (latest) text reuses its cosine."""
        per_row = [round_texts(c, t) if errors[j] is None else {}
                   for j, (c, t) in enumerate(zip(captions, originals, strict=True))]
        missing = {t for j, rt in enumerate(per_row) for t in rt.values() if t != texts[j]}
        txt_emb = self.text_embeddings(missing) if missing else {}
        out: list[dict[int, float]] = []
        for j, rt in enumerate(per_row):
            row: dict[int, float] = {}
            for k, t in rt.items():
                c = float(cos[j]) if t == texts[j] else float(np.dot(emb[j], txt_emb[t]))
                if not np.isnan(c):
                    row[k] = c
            out.append(row)
        return out

    def _encode_async(self, fn: Any, x: torch.Tensor) -> torch.Tensor:
        """Normalised features, left on the device: nothing here waits for the GPU."""
        if self.device.type == "cuda":
            x = (x if x.is_pinned() else x.pin_memory()).to(self.device, non_blocking=True)
        with torch.inference_mode(), autocast(self.device, self.dtype):
            return torch.nn.functional.normalize(fn(x).float(), dim=-1)

    def _encode(self, fn: Any, x: torch.Tensor) -> np.ndarray:
        feats = self._encode_async(fn, x)
        with torch.inference_mode():
            return feats.cpu().numpy()

    def _stack(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """One batch tensor; straight into page-locked memory on CUDA (an asynchronous copy, no extra one)."""
        if self.device.type != "cuda":
            return torch.stack(tensors)
        out = torch.empty((len(tensors), *tensors[0].shape), dtype=tensors[0].dtype, pin_memory=True)
        return torch.stack(tensors, out=out)

    def _tokenize(self, texts: list[str]) -> torch.Tensor:
        """Token ids; one thread at a time (an HF tokenizer changes its own padding state per call)."""
        with self._token_lock:
            return self._bundle.tokenizer(texts)

    def _load_image(self, data: bytes | None) -> torch.Tensor:
        """Decode (JPEG draft-decoded to about the model input size) and preprocess one image."""
        with decoding():  # a failure in decoding or preprocessing quarantines this row only
            img = decode_rgb(data, self.input_size if self.cfg.draft else None)
            return self._bundle.preprocess(img)


def _embedding_column(rows: list[np.ndarray | None], old: pa.ChunkedArray) -> pa.Array:
    """list<float32> column built from one contiguous buffer; rows without a new embedding keep the old."""
    old_list = old.to_pylist() if any(r is None for r in rows) else None
    offsets, values, valid = [0], [], []
    for i, r in enumerate(rows):
        if r is None and old_list is not None and old_list[i] is not None:
            r = np.asarray(old_list[i], dtype=np.float32)
        if r is None:
            valid.append(False)
        else:
            values.append(r.astype(np.float32, copy=False))
            valid.append(True)
        offsets.append(offsets[-1] + (0 if r is None else len(r)))
    flat = np.concatenate(values) if values else np.zeros(0, dtype=np.float32)
    mask = pa.array([not v for v in valid])
    return pa.ListArray.from_arrays(
        pa.array(offsets, type=pa.int32()), pa.array(flat, type=pa.float32()), mask=mask
    )

