"""ocr: text lines with boxes from rapidocr-onnxruntime (PP-OCRv4 det + cls + rec ONNX models in the wheel).

Sets ``specialists.ocr`` (lines with normalised xyxy boxes and scores, in reading order) and
``specialists.ocr_text`` (the lines: words of one visual line joined by spaces, lines by newlines), plus the
engine version under ``models["ocr"]``. RapidOCR ships its models inside the wheel, so it runs offline and
needs no checkpoint path; with ``cfg.vlm`` set, the answer of recaption's VLM to the "ocr" prompt set is
appended to ``ocr_text`` after the ``[vlm]`` marker. A failure on one image quarantines that row only.
"""

from __future__ import annotations

import os
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from vila2_curate.schemas.config import OcrConfig
from vila2_curate.schemas.stage import StageBase
from vila2_curate.specialists._common import (
    SampleError,
    SpecialistRows,
    decode_image,
    failure_reason,
    with_vlm_text,
)
from vila2_curate.specialists.geometry import quad_to_xyxy, reading_order
from vila2_curate.specialists.sidecar import specialist_sidecars
from vila2_curate.specialists.vlm import VlmPrompter


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "unknown"


# PaddleOCR's own inference defaults for detection (limit the long side to 960 px): RapidOCR's wheel default
# ("min" side 736) upscales every small web image 2-3x before detection, which costs 4-9x the time and
# gains nothing on text that is already legible.
DET_LIMIT_TYPE = "max"
DET_LIMIT_SIDE_LEN = 960
DET_BOX_THRESH = 0.5  # RapidOCR defaults, passed explicitly (see OcrEngine.read)
DET_UNCLIP_RATIO = 1.6
SPACE_GAP = 0.3  # ink-free run >= this x ink height between two characters: a space (letter gaps <= ~0.25)
_INK_DELTA = 60  # grey levels between ink and the line's background


def restore_spaces(gray: np.ndarray, quad: Any, text: str, char_boxes: Any, chars: Any) -> str:
    """Put back word spaces the PP-OCR recogniser drops in some lines (often all-caps: "OPENMUSEUM").

    Uses the per-character boxes RapidOCR returns with ``return_word_box`` and the image itself: between
    two consecutive characters, a run of ink-free columns at least ``SPACE_GAP`` x the line's ink height
    wide is a word gap (letter gaps are a few percent of it). Only for horizontal lines whose characters map
    one to one onto the text; anything else is returned unchanged.
    """
    chars = [str(c) for c in chars or []]
    if len(chars) < 2 or "".join(chars) != text.replace(" ", "") or " " in text:
        return text
    if not char_boxes or len(char_boxes) != len(chars):
        return text
    xs = [float(p[0]) for p in quad]
    ys = [float(p[1]) for p in quad]
    x0, x1 = max(0, int(min(xs))), min(gray.shape[1], int(max(xs)) + 1)
    y0, y1 = max(0, int(min(ys))), min(gray.shape[0], int(max(ys)) + 1)
    if x1 - x0 < 2 or y1 - y0 < 2 or (y1 - y0) > (x1 - x0):  # vertical text: leave as recognised
        return text
    crop = gray[y0:y1, x0:x1]
    ink = np.abs(crop - np.median(crop)) > _INK_DELTA
    rows = np.flatnonzero(ink.any(axis=1))
    if rows.size == 0:
        return text
    ink_height = rows[-1] - rows[0] + 1
    blank = ~ink.any(axis=0)
    centres = [((float(b[0][0]) + float(b[1][0])) / 2.0) - x0 for b in char_boxes]
    out = [chars[0]]
    for k in range(1, len(chars)):
        a, b = int(max(0, centres[k - 1])), int(min(len(blank), centres[k]))
        run = best = 0
        for v in blank[a:b]:
            run = run + 1 if v else 0
            best = max(best, run)
        if best >= SPACE_GAP * ink_height:
            out.append(" ")
        out.append(chars[k])
    return "".join(out)


def engine_tag() -> str:
    """Package versions + the bundled det/rec model names: the models live in the wheel, so this pins them."""
    import yaml
    from rapidocr_onnxruntime.main import DEFAULT_CFG_PATH

    cfg = yaml.safe_load(Path(DEFAULT_CFG_PATH).read_text())
    models = "+".join(Path(cfg[k]["model_path"]).stem for k in ("Det", "Rec"))
    return (f"rapidocr-onnxruntime=={_version('rapidocr-onnxruntime')}|{models}"
            f"|onnxruntime=={_version('onnxruntime')}")


class OcrEngine:
    """RapidOCR built once: one ONNX Runtime session per model, ``threads`` intra-op threads each.

    Thread count comes from the stage's CPU share: ONNX Runtime's default (all cores) would oversubscribe
    a machine where several Ray workers or stages share the CPUs.
    """

    def __init__(self, min_score: float, threads: int) -> None:
        os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")  # before the first InferenceSession
        from rapidocr_onnxruntime import RapidOCR

        self.min_score = min_score
        self._engine = RapidOCR(text_score=min_score, print_verbose=False, intra_op_num_threads=threads,
                                inter_op_num_threads=1, det_limit_type=DET_LIMIT_TYPE,
                                det_limit_side_len=DET_LIMIT_SIDE_LEN)
        self.tag = engine_tag()

    def read(self, img: Image.Image) -> list[dict[str, Any]]:
        """Lines with score >= min_score: {text, box (normalised xyxy), score}, in reading order."""
        # return_word_box gives per-character boxes, used to put back the word spaces the recogniser drops;
        # passing any keyword resets the thresholds to RapidOCR's defaults, so all three are passed again.
        result, _elapse = self._engine(img, return_word_box=True, text_score=self.min_score,
                                       box_thresh=DET_BOX_THRESH, unclip_ratio=DET_UNCLIP_RATIO)
        w, h = img.size
        gray = np.asarray(img.convert("L"), dtype=np.int16) if result else None
        lines = []
        for quad, text, score, *word_info in result or []:
            score = float(score)
            text = str(text).strip()
            if score < self.min_score or not text:
                continue
            if len(word_info) >= 2:
                text = restore_spaces(gray, quad, text, word_info[0], word_info[1])
            lines.append({"text": text, "box": quad_to_xyxy(quad, w, h), "score": score})
        order = reading_order([ln["box"] for ln in lines])
        return [lines[i] for line in order for i in line] if lines else []

    @staticmethod
    def text_of(lines: list[dict[str, Any]]) -> str:
        """Words of one visual line joined by spaces, visual lines by newlines."""
        if not lines:
            return ""
        groups = reading_order([ln["box"] for ln in lines])
        return "\n".join(" ".join(lines[i]["text"] for i in g) for g in groups)


class OcrStage(StageBase):
    """Map stage: fills ``specialists.ocr`` / ``ocr_text`` / ``models["ocr"]`` on alive pair rows."""

    name = "ocr"
    version = "1"
    loads_model = True

    def __init__(self, cfg: OcrConfig | None = None) -> None:
        self.cfg = cfg or OcrConfig()
        self._engine: OcrEngine | None = None
        self._vlm: VlmPrompter | None = None

    def setup(self) -> None:
        if self._engine is not None:
            return
        self._engine = OcrEngine(self.cfg.min_score, threads=max(1, round(self.cfg.runtime.cpus)))
        if self.cfg.vlm is not None:
            self._vlm = VlmPrompter(self.cfg.vlm, "ocr")
            self._vlm.setup()

    def sidecars(self) -> dict[str, Any]:
        return specialist_sidecars("ocr")

    def __getstate__(self) -> dict[str, Any]:
        """Ship the config only: workers build their own engine in setup()."""
        keep = {"cfg", "resources", "name"}
        return {k: v for k, v in self.__dict__.items() if k in keep} | {"_engine": None, "_vlm": None}

    @property
    def engine_tag(self) -> str:
        self.setup()
        return self._engine.tag

    def __call__(self, batch: pa.Table) -> pa.Table:
        if "specialists" not in batch.column_names:  # MMC4 documents are not specialist-augmented
            return batch
        self.setup()
        rows = SpecialistRows(batch, self.name)
        images: dict[int, Image.Image] = {}
        for i, data in zip(rows.alive, rows.column("image"), strict=True):
            try:
                images[i] = decode_image(data)
                lines = self._engine.read(images[i])
            except SampleError as e:
                rows.quarantine(i, str(e))
                continue
            except Exception as e:  # noqa: BLE001 - an engine failure on one image quarantines that row
                rows.quarantine(i, failure_reason("ocr_failed", e))
                continue
            rows.set(i, ocr=lines, ocr_text=self._engine.text_of(lines), models={"ocr": self._engine.tag})
        if self._vlm is not None:
            self._ask_vlm(rows, images)
        return rows.table()

    def _ask_vlm(self, rows: SpecialistRows, images: dict[int, Image.Image]) -> None:
        todo = [i for i in images if rows.drop[i] is None]
        keys = rows.column("key") if todo else []
        key_of = dict(zip(rows.alive, keys, strict=True))
        answers = self._vlm.ask([images[i] for i in todo], [key_of[i] for i in todo])
        for i, answer in zip(todo, answers, strict=True):
            if answer.error:
                rows.quarantine(i, f"ocr_vlm_failed: {answer.error}"[:200])
                continue
            spec = rows.spec[i] or {}
            rows.set(i, ocr_text=with_vlm_text(spec.get("ocr_text") or "", answer.text),
                     models={"ocr_vlm": self._vlm.model_tag()})

