"""Build stage objects from their config models: the one place that maps a config ``type`` to a class."""

from __future__ import annotations

from curation.normalize import NormalizeStage
from schemas.config import NormalizeConfig, RunConfig
from schemas.stage import Stage


def build_stage(cfg: object) -> Stage:
    if isinstance(cfg, NormalizeConfig):
        return NormalizeStage(cfg)
    raise ValueError(f"no stage implements config {type(cfg).__name__}")


def build_stages(config: RunConfig) -> list[Stage]:
    return [build_stage(c) for c in config.stages]


def stage_versions(stages: list[Stage]) -> dict[str, str]:
    return {s.name: s.version for s in stages}
