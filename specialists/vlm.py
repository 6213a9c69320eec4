"""Optional VLM prompts of the specialist stages, through recaption's captioner backends and prompt sets.

recaption/ owns the VLM backends (``make_captioner``: in-process transformers or an OpenAI-compatible
server) and the prompt sets ("ocr", "spatial"); the specialists only ask one prompt of a set per image,
chosen per sample from (set hash, seed, key) exactly as recaption does. Everything is imported inside
the methods: a stage config without ``vlm:`` never imports recaption's backends.

Failure policy follows recaption: a sample's own error (``CaptionResult.error``) quarantines that row; a
backend outage (``CaptionerUnavailable``) propagates and fails the batch, so a resume retries it.
"""

from __future__ import annotations

from typing import Any

from PIL import Image

from vila2_curate.schemas.config import CaptionerConfig


class VlmAnswer:
    """One answer: cleaned text, or the sample's error."""

    __slots__ = ("error", "flags", "text")

    def __init__(self, text: str = "", error: str | None = None, flags: list[str] | None = None) -> None:
        self.text, self.error, self.flags = text, error, flags or []


class VlmPrompter:
    """Asks one prompt of a recaption prompt set about each image with recaption's captioner."""

    def __init__(self, cfg: CaptionerConfig, prompt_set: str) -> None:
        self.cfg = cfg
        self.prompt_set = prompt_set
        self.tag = cfg.model_tag or cfg.model.rstrip("/").split("/")[-1]
        self._captioner: Any = None
        self._prompts: Any = None

    def setup(self) -> None:
        if self._captioner is not None:
            return
        from vila2_curate.recaption.backends import make_captioner
        from vila2_curate.recaption.prompts import load_prompt_set

        self._prompts = load_prompt_set(self.prompt_set)
        captioner = make_captioner(self.cfg)
        captioner.load()
        self._captioner = captioner

    def model_tag(self) -> str:
        """Model tag + prompt-set hash: which model and which questions produced the text."""
        self.setup()
        return f"{self.tag}|prompts:{self._prompts.name}@{self._prompts.hash}"

    def ask(self, images: list[Image.Image], keys: list[str]) -> list[VlmAnswer]:
        """One answer per image, in order; sample failures come back as ``VlmAnswer.error``."""
        self.setup()
        if not images:
            return []
        from vila2_curate.recaption.postprocess import clean_caption

        seed = self.cfg.generation.seed
        prompts = [self._prompts.choose(seed, k)[1] for k in keys]
        results = self._captioner.generate(images, prompts, sample_ids=keys)
        out = []
        for r in results:
            if r.error:
                out.append(VlmAnswer(error=r.error))
                continue
            cleaned = clean_caption(r.text, r.hit_max_tokens)
            bad = {"refusal", "empty"} & set(cleaned.flags)
            out.append(VlmAnswer(error=f"vlm answer rejected: {','.join(sorted(bad))}") if bad
                       else VlmAnswer(text=cleaned.text, flags=cleaned.flags))
        return out
