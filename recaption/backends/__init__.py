"""Captioner backends: in-process transformers VLMs and OpenAI-compatible servers (SGLang, vLLM)."""

from __future__ import annotations

from vila2_curate.recaption.backends.base import CaptionerUnavailable, CaptionResult, RemoteCodeRequired
from vila2_curate.schemas.config import CaptionerConfig

__all__ = ["CaptionResult", "CaptionerUnavailable", "RemoteCodeRequired", "make_captioner"]


def make_captioner(cfg: CaptionerConfig):  # -> TransformersCaptioner | OpenAICaptioner
    """The backend named by ``cfg.backend`` (not loaded yet: call ``load()``)."""
    if cfg.backend == "transformers":
        from vila2_curate.recaption.backends.transformers_vlm import TransformersCaptioner

        return TransformersCaptioner(cfg)
    if cfg.backend == "openai":
        from vila2_curate.recaption.backends.openai_client import OpenAICaptioner

        return OpenAICaptioner(cfg)
    raise ValueError(f"unknown captioner backend {cfg.backend!r}")
