"""The stage registry: the one place that maps a config ``type:`` to the stage class(es) it runs.

Adding a stage touches its config class (a pydantic model with ``type: Literal["<name>"]``), its own module
(a class built on ``schemas.stage.StageBase``) and one ``register_stage`` line (the built-in ones are at the
end of ``schemas/config.py``, beside their config classes). Registering extends ``RunConfig.stages``, so a
config naming the new ``type:`` validates with the same discriminated-union errors as a built-in one.

The stage is named by ``"module:attribute"`` so that importing the configs never imports a model library;
a class or a callable ``cfg -> stage | list[stage]`` works too (a test registers its own class). The target
is called with the config and may return several stages (a scoring map stage and its global decision).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel

StageFactory = str | Callable[[Any], Any]

_STAGES: dict[type[BaseModel], StageFactory] = {}
_listeners: list[Callable[[], None]] = []


def register_stage(config_cls: type[BaseModel], stage: StageFactory) -> None:
    """Map ``config_cls`` (its ``type:`` value) to ``stage``; a re-registration replaces the old one."""
    tag = stage_type(config_cls)
    for known in list(_STAGES):
        if known is not config_cls and stage_type(known) == tag:
            raise ValueError(f"stage type {tag!r} is already registered by {known.__name__}")
    _STAGES[config_cls] = stage
    for rebuild in _listeners:
        rebuild()


def stage_type(config_cls: type[BaseModel]) -> str:
    """The ``type:`` a config class answers to (its ``type`` field's default)."""
    field = config_cls.model_fields.get("type")
    if field is None or not isinstance(field.default, str):
        raise TypeError(f"{config_cls.__name__} needs a field `type: Literal[...] = \"<name>\"`")
    return field.default


def config_classes() -> tuple[type[BaseModel], ...]:
    """Every registered config class, in registration order (the order of the config union)."""
    return tuple(_STAGES)


def on_register(listener: Callable[[], None]) -> None:
    """Called after each registration (``schemas.config`` rebuilds ``RunConfig``)."""
    _listeners.append(listener)


def expand_stage(cfg: BaseModel) -> list[Any]:
    """One config entry -> its stage objects, in run order."""
    target = _STAGES.get(type(cfg))
    if target is None:
        raise ValueError(f"no stage implements config {type(cfg).__name__}")
    if isinstance(target, str):
        module, _, attr = target.partition(":")
        target = getattr(importlib.import_module(module), attr)
    made = target(cfg)
    return list(made) if isinstance(made, list | tuple) else [made]
