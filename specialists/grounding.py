"""grounding: zero-shot detection of the current caption's noun phrases (OWLv2 / Grounding DINO).

Queries come from the row's current caption (newest usable recaption, else the alt-text) through the
lexicon chunker in :mod:`specialists.phrases`; the detector is loaded with transformers' Auto API
(``AutoProcessor`` + ``AutoModelForZeroShotObjectDetection``), so an OWLv2 / OWL-ViT or a Grounding DINO
checkpoint (local folder or hub id) works unchanged. Boxes are normalised xyxy in [0, 1] of the upright
image, kept when score >= ``box_threshold``, de-duplicated per label with NMS. Sets
``specialists.grounding``, ``grounding_text`` ("red ellipse [0.12, 0.30, 0.45, 0.61]; ...") and
``models["grounding"]`` (model, weights sha256 prefix, ``demo`` for random weights).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
from PIL import Image

from vila2_curate.schemas.config import GroundingConfig
from vila2_curate.schemas.demo_model import is_demo_model
from vila2_curate.schemas.stage import Resources, StageBase
from vila2_curate.specialists._common import (
    SampleError,
    SpecialistRows,
    current_caption,
    decode_image,
    failure_reason,
    model_tag,
    weights_digest,
)
from vila2_curate.specialists.geometry import area, nms, normalise_xyxy
from vila2_curate.specialists.phrases import noun_phrases

NMS_IOU = 0.5  # boxes of one label overlapping more than this are one object
MAX_PER_LABEL = 3  # instances kept per phrase: the sidecar text stays short, spatial uses the best one
_PAD_QUERY = " "  # OWL batches pad every image's query list to the same length with this


def format_box(box: list[float]) -> str:
    return "[" + ", ".join(f"{v:.2f}" for v in box) + "]"


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

    def detect(self, images: list[Image.Image], phrases: list[list[str]],
               threshold: float) -> list[list[tuple[str, list[float], float]]]:
        import torch

        sizes = [(im.height, im.width) for im in images]
        if self.kind == "owl":
            n = max(len(p) for p in phrases)
            queries = [p + [_PAD_QUERY] * (n - len(p)) for p in phrases]
            inputs = self.processor(text=queries, images=images, return_tensors="pt")
        else:  # the processor joins each image's phrases into Grounding DINO's "a. b." prompt
            queries = phrases
            inputs = self.processor(text=phrases, images=images, return_tensors="pt")
        inputs = {k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device))
                  for k, v in inputs.items()}
        with torch.inference_mode():
            outputs = self.model(**inputs)
        for name in ("logits", "pred_boxes"):
            setattr(outputs, name, getattr(outputs, name).float().cpu())
        if self.kind == "owl":
            results = self.processor.post_process_grounded_object_detection(
                outputs, threshold=threshold, target_sizes=sizes, text_labels=queries)
        else:
            results = self.processor.post_process_grounded_object_detection(
                outputs, input_ids=inputs["input_ids"].cpu(), threshold=threshold, text_threshold=threshold,
                target_sizes=sizes)
        out = []
        for res, ph in zip(results, phrases, strict=True):
            dets = []
            for label, box, score in zip(res["text_labels"], res["boxes"].tolist(), res["scores"].tolist(),
                                         strict=True):
                name = label if self.kind == "owl" else _match_phrase(label, ph)
                if name in ph:
                    dets.append((name, box, float(score)))
            out.append(dets)
        return out


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
        rt = cfg.runtime
        self.resources = Resources(cpus=rt.cpus, gpus=rt.gpus)
        self._detector: Detector | None = None

    def setup(self) -> None:
        if self._detector is None:
            self._detector = Detector(self.cfg.model, self.cfg.runtime, self.cfg.trust_remote_code)

    def sidecars(self) -> dict[str, Any]:
        from vila2_curate.specialists.sidecar import (
            specialist_sidecars,  # specialists.sidecar imports the stage modules
        )

        return specialist_sidecars("bbox_interleaved")

    def __getstate__(self) -> dict[str, Any]:
        keep = {"cfg", "resources", "name"}
        return {k: v for k, v in self.__dict__.items() if k in keep} | {"_detector": None}

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
        todo: list[tuple[int, Image.Image, list[str]]] = []
        for i, data, caps, text in zip(rows.alive, rows.column("image"), rows.column("captions"),
                                       rows.column("text"), strict=True):
            phrases = noun_phrases(current_caption(caps, text), self.cfg.max_phrases)
            if not phrases:  # nothing to ground: an empty result, not a failure
                rows.set(i, grounding=[], grounding_text="", models={"grounding": det.tag})
                continue
            try:
                todo.append((i, decode_image(data), phrases))
            except SampleError as e:
                rows.quarantine(i, str(e))
        bs = max(1, self.cfg.runtime.batch_size)
        for start in range(0, len(todo), bs):
            chunk = todo[start:start + bs]
            for (i, img, phrases), res in zip(chunk, self._detect_isolated(chunk), strict=True):
                if isinstance(res, BaseException):
                    rows.quarantine(i, failure_reason("grounding_failed", res))
                    continue
                dets = select_detections(res, phrases, img.width, img.height, self.cfg.box_threshold)
                rows.set(i, grounding=dets, grounding_text=grounding_text(dets), models={"grounding": det.tag})
        return rows.table()

    def _detect_isolated(self, chunk: list[tuple[int, Image.Image, list[str]]]) -> list[Any]:
        """The batch in one forward pass; if it fails, image by image so only the culprit is quarantined."""
        images, phrases = [c[1] for c in chunk], [c[2] for c in chunk]
        try:
            return self._detector.detect(images, phrases, self.cfg.box_threshold)
        except Exception:  # noqa: BLE001 - retried one by one below
            out: list[Any] = []
            for img, ph in zip(images, phrases, strict=True):
                try:
                    out.append(self._detector.detect([img], [ph], self.cfg.box_threshold)[0])
                except Exception as e:  # noqa: BLE001
                    out.append(e)
            return out
