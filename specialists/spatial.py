"""spatial: plain-English spatial relations derived from the grounded boxes, plus an optional VLM prompt.

Runs after grounding and reads ``specialists.grounding``: one object per label (its best-scoring box),
relations from :func:`specialists.geometry.spatial_sentences` (left of / right of, above / below,
overlapping, larger than, nearest), at most ``max_relations``. No model is needed for the geometry; with
``cfg.vlm`` set, the answer of recaption's VLM to the "spatial" prompt set is appended to ``spatial_text``
after the ``[vlm]`` marker.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
from PIL import Image

from vila2_curate.schemas.config import SpatialConfig
from vila2_curate.schemas.stage import StageBase
from vila2_curate.specialists._common import SampleError, SpecialistRows, decode_image, with_vlm_text
from vila2_curate.specialists.geometry import spatial_sentences
from vila2_curate.specialists.sidecar import specialist_sidecars
from vila2_curate.specialists.vlm import VlmPrompter

GEOMETRY_TAG = "geometry-v1"  # bump with any change to the sentences for the same boxes


def objects_from_grounding(dets: list[dict[str, Any]] | None) -> tuple[list[str], list[list[float]]]:
    """One object per label: its best box (ties: first listed), in order of first appearance."""
    best: dict[str, tuple[float, list[float]]] = {}
    for d in dets or []:
        label, score = d["label"], float(d.get("score") or 0.0)
        if label not in best or score > best[label][0]:
            best[label] = (score, list(d["box"]))
    names = list(best)
    return names, [best[n][1] for n in names]


def sentences_text(sentences: list[str]) -> str:
    return " ".join(s[:1].upper() + s[1:] for s in sentences)


class SpatialStage(StageBase):
    """Map stage: fills ``specialists.spatial`` / ``spatial_text`` / ``models["spatial"]``."""

    name = "spatial"
    version = "1"

    @property
    def runtime(self) -> Any:
        """The VLM's runtime when spatial prompts one (else none: a CPU stage)."""
        return self.cfg.vlm.runtime if self.cfg.vlm is not None else None

    def __init__(self, cfg: SpatialConfig | None = None) -> None:
        self.cfg = cfg or SpatialConfig()
        self.loads_model = self.cfg.vlm is not None
        self._vlm: VlmPrompter | None = None

    def setup(self) -> None:
        if self.cfg.vlm is not None and self._vlm is None:
            self._vlm = VlmPrompter(self.cfg.vlm, "spatial")
            self._vlm.setup()

    def sidecars(self) -> dict[str, Any]:
        return specialist_sidecars("spatial")

    def __getstate__(self) -> dict[str, Any]:
        keep = {"cfg", "resources", "name", "loads_model"}
        return {k: v for k, v in self.__dict__.items() if k in keep} | {"_vlm": None}

    def __call__(self, batch: pa.Table) -> pa.Table:
        if "specialists" not in batch.column_names:
            return batch
        self.setup()
        rows = SpecialistRows(batch, self.name)
        for i in rows.alive:
            names, boxes = objects_from_grounding((rows.spec[i] or {}).get("grounding"))
            sents = spatial_sentences(names, boxes, self.cfg.max_relations)
            rows.set(i, spatial=sents, spatial_text=sentences_text(sents), models={"spatial": GEOMETRY_TAG})
        if self._vlm is not None:
            self._ask_vlm(rows)
        return rows.table()

    def _ask_vlm(self, rows: SpecialistRows) -> None:
        images: dict[int, Image.Image] = {}
        for i, data in zip(rows.alive, rows.column("image"), strict=True):
            try:
                images[i] = decode_image(data)
            except SampleError as e:
                rows.quarantine(i, str(e))
        todo = list(images)
        keys = rows.column("key") if todo else []
        key_of = dict(zip(rows.alive, keys, strict=True))
        answers = self._vlm.ask([images[i] for i in todo], [key_of[i] for i in todo])
        for i, answer in zip(todo, answers, strict=True):
            if answer.error:
                rows.quarantine(i, f"spatial_vlm_failed: {answer.error}"[:200])
                continue
            spec = rows.spec[i] or {}
            rows.set(i, spatial_text=with_vlm_text(spec.get("spatial_text") or "", answer.text),
                     models={"spatial_vlm": self._vlm.model_tag()})
