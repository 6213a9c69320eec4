"""grounding: zero-shot detection of the current caption's noun phrases (OWLv2 / Grounding DINO).

Queries come from the row's current caption (newest usable recaption, else the alt-text) through the
lexicon chunker in :mod:`specialists.phrases`; the detector is loaded with transformers' Auto API
(``AutoProcessor`` + ``AutoModelForZeroShotObjectDetection``), so an OWLv2 / OWL-ViT or a Grounding DINO
checkpoint (local folder or hub id) works unchanged. Boxes are normalised xyxy in [0, 1] of the upright
image, kept when score >= ``box_threshold``, de-duplicated per label with NMS. Sets
``specialists.grounding``, ``grounding_text`` ("red ellipse [0.12, 0.30, 0.45, 0.61]; ...") and
``models["grounding"]`` (model, weights sha256 prefix, ``demo`` for random weights).

Decoding and the processor (resize/pad to the model's input, tokenised queries) run on ``runtime.cpus``
threads for the next batches while the detector runs the current one, and a batch's boxes are
post-processed on the CPU while the next batch's forward pass runs, so the GPU waits for neither. On a
GPU, an OWL checkpoint's image processor (pad to square, anti-aliased resize to 960x960: ~0.1-0.2 CPU
seconds per 720p photo, more than the GPU's forward pass) runs on the device instead, with the same
operations; the threads then decode to uint8 tensors and tokenise.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import pyarrow as pa
from PIL import Image

from vila2_curate.recaption.backends.prefetch import PerThread, ahead, pinned
from vila2_curate.schemas.config import GroundingConfig
from vila2_curate.schemas.demo_model import is_demo_model
from vila2_curate.schemas.stage import StageBase
from vila2_curate.specialists._common import (
    SampleError,
    SpecialistRows,
    current_caption,
    decode_image,
    failure_reason,
    model_tag,
    weights_digest,
)
from vila2_curate.specialists.geometry import area, format_box, nms, normalise_xyxy
from vila2_curate.specialists.phrases import noun_phrases
from vila2_curate.specialists.sidecar import specialist_sidecars

NMS_IOU = 0.5  # boxes of one label overlapping more than this are one object
MAX_PER_LABEL = 3  # instances kept per phrase: the sidecar text stays short, spatial uses the best one
_PAD_QUERY = " "  # OWL batches pad every image's query list to the same length with this
MAX_AHEAD = 8  # batches prepared ahead at most (each holds its pixel tensors)


class Prepared(NamedTuple):
    """One batch's processor tensors (CPU) and what post-processing needs."""

    inputs: dict[str, Any]
    images: list[Any] | None  # uint8 CHW tensors the image processor turns into pixels on the device
    queries: list[list[str]]
    phrases: list[list[str]]
    sizes: list[tuple[int, int]]


class Launched(NamedTuple):
    """A forward pass queued on the device; its outputs arrive on the CPU once ``done`` has fired."""

    prepared: Prepared
    outputs: Any
    input_ids: Any
    done: Any  # a CUDA event, or None on CPU


def grounding_text(dets: list[dict[str, Any]]) -> str:
    return "; ".join(f"{d['label']} {format_box(d['box'])}" for d in dets)


def select_detections(
    raw: list[tuple[str, list[float], float]], phrases: list[str], width: int, height: int,
    threshold: float, nms_iou: float = NMS_IOU, max_per_label: int = MAX_PER_LABEL,
) -> list[dict[str, Any]]:
    """Pixel detections (label, xyxy, score) -> normalised, thresholded, NMS'd per label, ordered.

    Order: labels in caption order, then score (best first): deterministic and readable. Boxes that clip
    to nothing (outside the image) are dropped; labels not among ``phrases`` (padding queries) too.
    """
    by_label: dict[str, list[tuple[list[float], float]]] = {}
    for label, box, score in raw:
        if label not in phrases or score < threshold:
            continue
        nb = normalise_xyxy(box, width, height)
        if area(nb) <= 0:
            continue
        by_label.setdefault(label, []).append((nb, float(score)))
    out: list[dict[str, Any]] = []
    for label in phrases:
        cands = by_label.get(label, [])
        keep = nms([b for b, _ in cands], [s for _, s in cands], nms_iou)[:max_per_label]
        out.extend({"label": label, "box": cands[k][0], "score": cands[k][1]} for k in keep)
    return out


def _match_phrase(text_label: str, phrases: list[str]) -> str | None:
    """Grounding DINO returns the query tokens above text_threshold; map them back to one phrase."""
    t = " ".join(text_label.lower().split())
    if not t:
        return None
    if t in phrases:
        return t
    words = set(t.split())
    best = max(phrases, key=lambda p: (len(words & set(p.split())), -phrases.index(p)), default=None)
    return best if best is not None and words & set(best.split()) else None


class Detector:
    """A zero-shot detector loaded through the Auto API; ``detect`` returns pixel detections per image."""

    def __init__(self, model: str, runtime: Any, trust_remote_code: bool = False) -> None:
        import torch
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

        self.device = torch.device(
            ("cuda" if torch.cuda.is_available() else "cpu") if runtime.device == "auto" else runtime.device)
        half = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(runtime.precision)
        self.dtype = half if (half is not None and self.device.type == "cuda") else torch.float32
        self.processor = AutoProcessor.from_pretrained(model, trust_remote_code=trust_remote_code)
        self.model = AutoModelForZeroShotObjectDetection.from_pretrained(
            model, dtype=self.dtype, trust_remote_code=trust_remote_code)
        self.model.to(self.device).eval().requires_grad_(False)
        self.kind = "dino" if "grounding" in (self.model.config.model_type or "") else "owl"
        folder = Path(model) if Path(model).is_dir() else _hub_snapshot(model)
        digest = weights_digest(folder) if folder else None
        self.tag = model_tag(model, digest, is_demo_model(folder))
        self.demo = is_demo_model(folder)
        self._processors = PerThread(self.processor)
        self.images_on_device = (self.device.type == "cuda" and self.kind == "owl"
                                 and _takes_tensors(self.processor.image_processor))

    def prepare(self, images: list[Image.Image], phrases: list[list[str]]) -> Prepared:
        """The processor's tensors for one batch, on the CPU; safe on any thread (a processor per thread)."""
        processor = self._processors.get()
        sizes = [(im.height, im.width) for im in images]
        kwargs: dict[str, Any] = {}
        if self.kind == "owl":
            n = max(len(p) for p in phrases)
            queries = [p + [_PAD_QUERY] * (n - len(p)) for p in phrases]
            kwargs["truncation"] = True  # OWL's text tower has 16 positions: cut a longer phrase
        else:  # the processor joins each image's phrases into Grounding DINO's "a. b." prompt
            queries = phrases
        cuda = self.device.type == "cuda"
        if not self.images_on_device:
            inputs = dict(processor(text=queries, images=images, return_tensors="pt", **kwargs).items())
            return Prepared(pinned(inputs) if cuda else inputs, None, queries, phrases, sizes)
        import numpy as np
        import torch

        inputs = dict(processor(text=queries, return_tensors="pt", **kwargs).items())
        pixels = [torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in images]
        if cuda:
            inputs, pixels = pinned(inputs), [t.pin_memory() for t in pixels]
        return Prepared(inputs, pixels, queries, phrases, sizes)

    def to_device(self, prepared: Prepared) -> dict[str, Any]:
        """The model inputs on the device; raw images go through the image processor there."""
        inputs = {k: (v.to(self.device, self.dtype, non_blocking=True) if v.is_floating_point()
                      else v.to(self.device, non_blocking=True)) for k, v in prepared.inputs.items()}
        if prepared.images is not None:
            images = [t.to(self.device, non_blocking=True) for t in prepared.images]
            pixels = self.processor.image_processor(images=images, device=self.device, return_tensors="pt")
            inputs["pixel_values"] = pixels["pixel_values"].to(self.dtype)
        return inputs

    def launch(self, prepared: Prepared) -> Launched:
        """Queue the forward pass and the copy of its logits and boxes back; returns at once on a GPU."""
        import torch

        inputs = self.to_device(prepared)
        cuda = self.device.type == "cuda"
        with torch.inference_mode():
            outputs = self.model(**inputs)
            for name in ("logits", "pred_boxes"):
                setattr(outputs, name, getattr(outputs, name).float().to("cpu", non_blocking=cuda))
        done = None
        if cuda:
            done = torch.cuda.Event()
            done.record()
        return Launched(prepared, outputs, prepared.inputs.get("input_ids"), done)

    def finish(self, launched: Launched, threshold: float) -> list[list[tuple[str, list[float], float]]]:
        """Wait for that batch's outputs only, then the processor's post-processing: pixel detections."""
        if launched.done is not None:
            launched.done.synchronize()
        prep, outputs = launched.prepared, launched.outputs
        if self.kind == "owl":
            results = self.processor.post_process_grounded_object_detection(
                outputs, threshold=threshold, target_sizes=prep.sizes, text_labels=prep.queries)
        else:
            results = self.processor.post_process_grounded_object_detection(
                outputs, input_ids=launched.input_ids, threshold=threshold, text_threshold=threshold,
                target_sizes=prep.sizes)
        out = []
        for res, ph in zip(results, prep.phrases, strict=True):
            dets = []
            for label, box, score in zip(res["text_labels"], res["boxes"].tolist(), res["scores"].tolist(),
                                         strict=True):
                name = label if self.kind == "owl" else _match_phrase(label, ph)
                if name in ph:
                    dets.append((name, box, float(score)))
            out.append(dets)
        return out

    def detect(self, images: list[Image.Image], phrases: list[list[str]],
               threshold: float) -> list[list[tuple[str, list[float], float]]]:
        """Pixel detections per image, synchronously."""
        return self.finish(self.launch(self.prepare(images, phrases)), threshold)


def _takes_tensors(image_processor: Any) -> bool:
    """Whether the image processor runs its operations on a given device (torch-backed processors)."""
    import torch

    try:
        image_processor(images=[torch.zeros((3, 8, 8), dtype=torch.uint8)], device="cpu", return_tensors="pt")
    except Exception:  # noqa: BLE001 - a PIL/numpy processor: it stays on the CPU threads
        return False
    return True


def _hub_snapshot(repo_id: str) -> Path | None:
    """The cached snapshot folder of a hub model (from_pretrained fetched it already), if any."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached as a full snapshot: identity without a digest
        return None


class GroundingStage(StageBase):
    """Map stage: fills ``specialists.grounding`` / ``grounding_text`` / ``models["grounding"]``."""

    name = "grounding"
    version = "1"
    loads_model = True

    def __init__(self, cfg: GroundingConfig) -> None:
        self.cfg = cfg
        self._detector: Detector | None = None
        self._pool: ThreadPoolExecutor | None = None

    def setup(self) -> None:
        if self._detector is None:
            self._detector = Detector(self.cfg.model, self.cfg.runtime, self.cfg.trust_remote_code)
            self._workers = max(1, round(self.cfg.runtime.cpus))
            self._pool = ThreadPoolExecutor(max_workers=self._workers, thread_name_prefix="grounding-prepare")

    def sidecars(self) -> dict[str, Any]:
        return specialist_sidecars("bbox_interleaved")

    def __getstate__(self) -> dict[str, Any]:
        keep = {"cfg", "resources", "name"}
        return {k: v for k, v in self.__dict__.items() if k in keep} | {"_detector": None, "_pool": None}

    def __del__(self) -> None:
        if getattr(self, "_pool", None) is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    @property
    def model_tag(self) -> str:
        self.setup()
        return self._detector.tag

    def __call__(self, batch: pa.Table) -> pa.Table:
        if "specialists" not in batch.column_names:
            return batch
        self.setup()
        det = self._detector
        rows = SpecialistRows(batch, self.name)
        todo: list[tuple[int, bytes | None, list[str]]] = []
        for i, data, caps, text in zip(rows.alive, rows.column("image"), rows.column("captions"),
                                       rows.column("text"), strict=True):
            phrases = noun_phrases(current_caption(caps, text), self.cfg.max_phrases)
            if not phrases:  # nothing to ground: an empty result, not a failure
                rows.set(i, grounding=[], grounding_text="", models={"grounding": det.tag})
                continue
            todo.append((i, data, phrases))
        bs = max(1, self.cfg.runtime.batch_size)
        chunks = [todo[s:s + bs] for s in range(0, len(todo), bs)]
        pending: tuple[list[tuple[int, Image.Image, list[str]]], Any] | None = None
        depth = min(self._workers, MAX_AHEAD)
        for _, ready in ahead(chunks, self._prepare, self._pool, depth):
            decoded, failed, prepared = ready.result()
            for i, reason in failed:
                rows.quarantine(i, reason)
            launched = self._launch(decoded, prepared)
            if pending is not None:  # post-processed while this batch's forward pass runs
                self._finish(rows, *pending)
            pending = (decoded, launched)
        if pending is not None:
            self._finish(rows, *pending)
        return rows.table()

    def _prepare(self, chunk: list[tuple[int, bytes | None, list[str]]]
                 ) -> tuple[list[tuple[int, Image.Image, list[str]]], list[tuple[int, str]], Any]:
        """On a pool thread: decode the batch's images and build its tensors. Returns (decoded rows,
        (row, reason) of undecodable ones, the prepared batch or the exception building it raised)."""
        decoded, failed = [], []
        for i, data, phrases in chunk:
            try:
                decoded.append((i, decode_image(data), phrases))
            except SampleError as e:
                failed.append((i, str(e)))
        if not decoded:
            return decoded, failed, None
        try:
            prepared: Any = self._detector.prepare([d[1] for d in decoded], [d[2] for d in decoded])
        except Exception as e:  # noqa: BLE001 - the batch is retried image by image
            prepared = e
        return decoded, failed, prepared

    def _launch(self, decoded: list[tuple[int, Image.Image, list[str]]], prepared: Any) -> Any:
        """The queued batch, or (when building or queueing it failed) per-image results already."""
        if isinstance(prepared, Prepared):
            try:
                return self._detector.launch(prepared)
            except Exception:  # noqa: BLE001 - retried one by one below
                pass
        return self._one_by_one(decoded) if decoded else []

    def _finish(self, rows: SpecialistRows, decoded: list[tuple[int, Image.Image, list[str]]],
                launched: Any) -> None:
        results = launched
        if isinstance(launched, Launched):
            try:
                results = self._detector.finish(launched, self.cfg.box_threshold)
            except Exception:  # noqa: BLE001 - retried one by one below
                results = self._one_by_one(decoded)
        for (i, img, phrases), res in zip(decoded, results, strict=True):
            if isinstance(res, BaseException):
                rows.quarantine(i, failure_reason("grounding_failed", res))
                continue
            dets = select_detections(res, phrases, img.width, img.height, self.cfg.box_threshold)
            rows.set(i, grounding=dets, grounding_text=grounding_text(dets),
                     models={"grounding": self._detector.tag})

    def _one_by_one(self, decoded: list[tuple[int, Image.Image, list[str]]]) -> list[Any]:
        """Image by image, so only the culprit is quarantined: detections, or the exception it raised."""
        out: list[Any] = []
        for _, img, ph in decoded:
            try:
                out.append(self._detector.detect([img], [ph], self.cfg.box_threshold)[0])
            except Exception as e:  # noqa: BLE001
                out.append(e)
        return out
