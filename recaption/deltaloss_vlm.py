"""NVILA DeltaLoss with VLM scorers: log-likelihood of the caption GIVEN the image.

Same contract and output columns as the text-only ``DeltaLossScoreStage`` (name ``deltaloss_score``;
sets ``logp_small``, ``logp_large``, ``delta_loss = logp_large - logp_small`` on alive rows), so the same
``DeltaLossTopKStage`` ranks its scores. The difference: ``small_model`` and ``large_model`` are VLMs
(``AutoModelForImageTextToText`` checkpoints) and each score is the mean per-token log p of the caption as
the model's answer to :data:`SCORING_PROMPT` about the row's image — closer to how NVILA scored its
training data than a text-only LM, since a caption that does not match its image is now unlikely.

- Pairs score the caption the trainer would read under the "latest" policy (highest round without a
  truncated/refusal/empty flag, ``schemas.captions.VLM_DELTALOSS_CAPTION``), else the original ``text``.
- MMC4 documents have many images and no single caption: their sentences (joined by spaces) are scored
  after a text-only prompt through the same VLMs.
- Captions are truncated to ``max_length`` tokens; batches are left padded with the position ids
  generation uses, so a row's score does not depend on its batch.
- An undecodable image quarantines its row (``image_undecodable: ...``) instead of failing the batch.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from vila2_curate.recaption.backends.transformers_vlm import TransformersCaptioner
from vila2_curate.recaption.runtime import load_image
from vila2_curate.schemas.captions import VLM_DELTALOSS_CAPTION, judged_texts
from vila2_curate.schemas.config import CaptionerConfig, DeltaLossConfig
from vila2_curate.schemas.documents import document_text
from vila2_curate.schemas.images import UndecodableImage
from vila2_curate.schemas.stage import StageBase
from vila2_curate.schemas.table_ops import replace_columns

SCORING_PROMPT = "Describe this image in detail."  # the same instruction for both models: a fair delta
DOCUMENT_PROMPT = "Write a passage of text."
IMAGE_MAX_SIDE = 1024


def deltaloss_stages(cfg: DeltaLossConfig) -> list[StageBase]:
    """The registry's entry for ``type: deltaloss``: the scorer ``cfg.scorer`` names, then the top-k decision.
    Here (not in curation/) because the vlm scorer is a recaption model and curation imports no recaption."""
    from vila2_curate.curation.deltaloss import DeltaLossScoreStage, DeltaLossTopKStage

    if cfg.scorer == "vlm":  # log p(caption | image) under two VLMs, as NVILA scored its data
        return [VlmDeltaLossScoreStage(cfg), DeltaLossTopKStage(cfg)]
    return [DeltaLossScoreStage(cfg), DeltaLossTopKStage(cfg)]


class VlmDeltaLossScoreStage(StageBase):
    """Map stage: logp_small, logp_large and delta_loss from two VLMs, captions scored given the image."""

    name = "deltaloss_score"
    version = "1-vlm"
    loads_model = True

    def __init__(self, cfg: DeltaLossConfig) -> None:
        self.cfg = cfg
        self.small: TransformersCaptioner | None = None
        self.large: TransformersCaptioner | None = None

    def __getstate__(self) -> dict[str, Any]:
        """Ship the config only: engines pickle stages to workers, which call setup() themselves."""
        keep = {"cfg", "resources", "name"}
        return {k: v for k, v in self.__dict__.items() if k in keep} | {"small": None, "large": None}

    def _scorer(self, model: str) -> TransformersCaptioner:
        cap = CaptionerConfig(
            backend="transformers",
            model=model,
            trust_remote_code=self.cfg.trust_remote_code,
            image_max_side=IMAGE_MAX_SIDE,
            runtime=self.cfg.runtime,
        )
        scorer = TransformersCaptioner(cap)
        scorer.load()
        return scorer

    def setup(self) -> None:
        if self.small is not None:
            return
        small, large = self._scorer(self.cfg.small_model), self._scorer(self.cfg.large_model)
        self.identities = {"small": small.identity, "large": large.identity}
        self.small, self.large = small, large

    def __call__(self, batch: pa.Table) -> pa.Table:
        drop = batch.column("drop_reason").to_pylist()
        todo = [i for i, r in enumerate(drop) if r is None]
        if not todo:
            return batch
        self.setup()
        stage, quarantined = batch.column("drop_stage").to_pylist(), batch.column("quarantined").to_pylist()
        images: list[Any] = []
        if "text_list" in batch.column_names:
            texts = [document_text(t) for t in batch.column("text_list").take(todo).to_pylist()]
            images = [None] * len(todo)
            prompts = [DOCUMENT_PROMPT] * len(todo)
        else:
            texts = judged_texts(VLM_DELTALOSS_CAPTION, batch.column("captions").take(todo).to_pylist(),
                                 batch.column("text").take(todo).to_pylist())
            prompts = [SCORING_PROMPT] * len(todo)
            for j, (i, data) in enumerate(
                zip(todo, batch.column("image").take(todo).to_pylist(), strict=True)
            ):
                try:
                    images.append(load_image(data, IMAGE_MAX_SIDE))
                except UndecodableImage as e:
                    images.append(None)
                    texts[j] = None
                    drop[i], stage[i], quarantined[i] = str(e), self.name, True
        n = self.cfg.max_length
        small = self.small.log_likelihood(images, prompts, texts, max_text_tokens=n)
        large = self.large.log_likelihood(images, prompts, texts, max_text_tokens=n)
        cols = {c: batch.column(c).to_pylist() for c in ("logp_small", "logp_large", "delta_loss")}
        for j, i in enumerate(todo):
            if drop[i] is not None:
                continue
            s, lg = small[j], large[j]
            cols["logp_small"][i], cols["logp_large"][i] = s, lg
            cols["delta_loss"][i] = None if s is None or lg is None else lg - s
        return replace_columns(
            batch, {**cols, "drop_reason": drop, "drop_stage": stage, "quarantined": quarantined}
        )
