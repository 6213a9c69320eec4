"""VILA² specialist-augment stages: OCR, grounding and spatial relations, plus their sidecar texts.

Run order: ocr and grounding (independent), then spatial (reads the grounding boxes). Each stage fills
only its own fields of the ``specialists`` struct. The stage classes import their heavy libraries
(rapidocr, transformers) in ``setup()``, so importing this package stays cheap.
"""

from vila2_curate.specialists.grounding import GroundingStage
from vila2_curate.specialists.ocr import OcrStage
from vila2_curate.specialists.sidecar import SIDECAR_DIRS, specialist_texts
from vila2_curate.specialists.spatial import SpatialStage

__all__ = ["SIDECAR_DIRS", "GroundingStage", "OcrStage", "SpatialStage", "specialist_texts"]
