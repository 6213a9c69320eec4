"""VILA² self-augment: round k appends a new caption, with lineage, to every alive pair row.

For each alive pair row (``drop_reason`` null) the stage chooses a prompt from the prompt set (seeded by
key), captions the image with the configured backend, cleans the text (``recaption.postprocess``) and
APPENDS a caption record ``{round, model, prompt_id, params_hash, text, created_at, flags}``. Earlier
rounds are never touched. A row that already holds a caption of this round by this model (a rerun, a
resumed run) is left as it is, so rerunning a round is a no-op.

- ``model`` is the captioner's ``model_tag`` (default: the last part of ``captioner.model``); a checkpoint
  folder holding a ``DEMO_MODEL`` marker adds the flag ``demo_model`` to every caption it writes.
- ``created_at``: resumed runs must write byte-identical output, so it is not the wall clock per row. The
  engine sets ``stage.run_started_at`` (ISO-8601 or datetime; the run's recorded start time) before the
  first batch; without it, the time the stage object was created is used for all its captions.
- Undecodable images and samples that make the model raise (alone: a failing batch is retried sample by
  sample) are quarantined: ``drop_reason`` ``image_undecodable: ...`` / ``recaption_failed: ...``,
  ``drop_stage`` the stage name, ``quarantined`` true. Backend outages (:class:`CaptionerUnavailable`)
  raise and fail the batch.
- MMC4 document rows pass through untouched: VILA² does not recaption interleaved data.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any

import pyarrow as pa

from vila2_curate.recaption.backends import make_captioner
from vila2_curate.recaption.postprocess import HYGIENE_FLAG, clean_caption
from vila2_curate.recaption.prompts import PromptSet, load_prompt_set
from vila2_curate.recaption.runtime import iso_utc, load_image, params_hash
from vila2_curate.recaption.sidecar import RoundCaption, caption_folder
from vila2_curate.schemas.config import RecaptionConfig
from vila2_curate.schemas.images import UndecodableImage
from vila2_curate.schemas.run_metrics import add_metrics
from vila2_curate.schemas.stage import StageBase
from vila2_curate.schemas.table_ops import replace_columns

DEMO_FLAG = "demo_model"


def model_tag(cfg: RecaptionConfig) -> str:
    """The lineage tag and sidecar folder name: ``captioner.model_tag`` or the model's last path part."""
    c = cfg.captioner
    return c.model_tag or c.model.rstrip("/").split("/")[-1]


class RecaptionStage(StageBase):
    """Map stage: append round ``cfg.round``'s caption to alive pair rows."""

    version = "1"
    loads_model = True  # engines route it like a model (Beam RunInference, GPU actor pools)
    writes_captions = True

    def __init__(self, cfg: RecaptionConfig, run_started_at: str | datetime | None = None) -> None:
        if cfg.round < 1:
            raise ValueError(
                f"recaption round must be >= 1 (round 0 is the original alt-text), got {cfg.round}"
            )
        self.cfg = cfg
        self.name = f"recaption_r{cfg.round}"
        self.run_started_at = iso_utc(run_started_at)
        self.model_tag = model_tag(cfg)
        self.prompt_set: PromptSet = load_prompt_set(cfg.prompts)  # fail at construction, not on a worker
        self.params_hash = params_hash(
            cfg.captioner.generation,
            backend=cfg.captioner.backend,
            image_max_side=cfg.captioner.image_max_side,
        )
        self.backend: Any = None

    @property
    def runtime(self) -> Any:
        """The captioner's runtime: its actor-pool size and batch reach the engine like any model stage's."""
        return self.cfg.captioner.runtime

    @property
    def run_started_at(self) -> str:
        """The ``created_at`` of every caption this stage writes (ISO-8601 UTC, ``Z``)."""
        return self._run_started_at

    @run_started_at.setter
    def run_started_at(self, value: str | datetime | None) -> None:
        self._run_started_at = iso_utc(value)

    def __getstate__(self) -> dict[str, Any]:
        """Ship the config only: engines pickle stages to workers, which call setup() themselves."""
        state = dict(self.__dict__)
        state["backend"] = None
        return state

    def sidecars(self) -> dict[str, RoundCaption]:
        """This round's caption folder beside the shards (``recaption.sidecars: true``)."""
        if not self.cfg.sidecars:
            return {}
        return {caption_folder(self.cfg.round, self.model_tag): RoundCaption(self.cfg.round, self.model_tag)}

    def setup(self) -> None:
        if self.backend is not None:
            return
        backend = make_captioner(self.cfg.captioner)
        backend.load()
        self.backend = backend
        self.demo = bool(backend.identity.get("demo"))

    def _decode(self, images: list[bytes | None], max_side: int | None) -> list[tuple[Any, str | None]]:
        """(image, None) or (None, why undecodable) per row, decoded on ``runtime.cpus`` threads (Pillow
        releases the GIL while decoding): one thread would keep the model waiting for every image."""

        def one(data: bytes | None) -> tuple[Any, str | None]:
            try:
                return load_image(data, max_side), None
            except UndecodableImage as e:
                return None, str(e)

        threads = max(1, int(self.runtime.cpus))
        if threads == 1 or len(images) < 2:
            return [one(d) for d in images]
        with ThreadPoolExecutor(threads) as pool:
            return list(pool.map(one, images))

    def __call__(self, batch: pa.Table) -> pa.Table:
        if "image_info" in batch.column_names or "captions" not in batch.column_names:
            return batch  # MMC4 documents: VILA² does not recaption interleaved data
        drop = batch.column("drop_reason").to_pylist()
        captions = batch.column("captions").to_pylist()
        keys = batch.column("key").to_pylist()
        todo = []
        for i, reason in enumerate(drop):
            if reason is not None:
                continue
            if any(
                c and c.get("round") == self.cfg.round and c.get("model") == self.model_tag
                for c in captions[i] or ()
            ):
                continue
            todo.append(i)
        if not todo:
            return batch
        self.setup()
        stage_col, quarantined = (
            batch.column("drop_stage").to_pylist(),
            batch.column("quarantined").to_pylist(),
        )
        images_col = batch.column("image").take(todo).to_pylist()
        metrics = batch.column("run_metrics").to_pylist()  # hygiene counts -> stats.json (schemas.run_metrics)
        max_side = self.cfg.captioner.image_max_side
        ready: list[int] = []
        images, prompts, prompt_ids = [], [], []
        for i, (img, error) in zip(todo, self._decode(images_col, max_side), strict=True):
            if error is not None:
                drop[i], stage_col[i], quarantined[i] = error, self.name, True
                continue
            pid, prompt = self.prompt_set.choose(self.cfg.captioner.generation.seed, keys[i])
            ready.append(i)
            images.append(img)
            prompts.append(prompt)
            prompt_ids.append(pid)
        results = self.backend.generate(images, prompts, sample_ids=[keys[i] for i in ready]) if ready else []
        for i, pid, res in zip(ready, prompt_ids, results, strict=True):
            if res.error is not None:
                drop[i], stage_col[i], quarantined[i] = f"recaption_failed: {res.error}", self.name, True
                continue
            cleaned = clean_caption(res.text, res.hit_max_tokens)
            flags = set(cleaned.flags) | ({DEMO_FLAG} if self.demo else set())
            metrics[i] = add_metrics(metrics[i], {f"recaption_hygiene.{f[len(HYGIENE_FLAG):]}": 1
                                                  for f in cleaned.flags if f.startswith(HYGIENE_FLAG)})
            captions[i] = [
                *(captions[i] or []),
                {
                    "round": self.cfg.round,
                    "model": self.model_tag,
                    "prompt_id": pid,
                    "params_hash": self.params_hash,
                    "text": cleaned.text,
                    "created_at": self.run_started_at,
                    "flags": sorted(flags),
                },
            ]
        return replace_columns(
            batch,
            {"captions": captions, "drop_reason": drop, "drop_stage": stage_col, "quarantined": quarantined,
             "run_metrics": metrics},
        )
