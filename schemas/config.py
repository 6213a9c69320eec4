"""Pydantic config models, loaded from YAML. Unknown keys are errors that name the field."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SourceConfig(_Strict):
    """One input dataset. ``paths`` are fsspec URLs or globs (local, memory://, s3://, gs://)."""

    name: str
    kind: Literal["img2dataset", "coyo_parquet", "mmc4"]
    paths: list[str]
    storage_options: dict[str, Any] = Field(default_factory=dict)
    # coyo_parquet: where the image comes from (a bytes column, or a path/url column read through fsspec)
    image_column: str | None = None
    image_path_column: str | None = None
    image_root: str | None = None  # prefix for relative paths in image_path_column
    key_column: str = "id"
    text_column: str = "text"
    url_column: str = "url"
    # mmc4: image folder (default: the jsonl's own folder)
    image_dir: str | None = None

    @field_validator("name")
    @classmethod
    def _name_is_path_safe(cls, v: str) -> str:
        if not v or any(c in v for c in "/\\. ") or len(v) > 40:
            raise ValueError("source name must be 1-40 chars without '/', '\\\\', '.' or spaces")
        return v


class NormalizeConfig(_Strict):
    """Decode probe, EXIF orientation, sha256, pHash, size/aspect filters (img2dataset COYO defaults)."""

    type: Literal["normalize"] = "normalize"
    min_side: int = 200
    max_aspect: float = 3.0
    max_pixels: int = 89_478_485  # PIL's own decompression-bomb limit (~0.25 GiB of 24-bit RGB)
    draft: bool = True  # JPEG draft decoding for the probe and pHash (2-8x faster)
    apply_exif_orientation: bool = True
    reencode_quality: int = 95


StageConfig = Annotated[NormalizeConfig, Field(discriminator="type")]


class CaptionPolicy(_Strict):
    """Which caption becomes the trainer's ``.txt``."""

    mode: Literal["latest", "original", "mix"] = "latest"
    mix_ratio: float = 0.5  # mix: share of samples that get the latest recaption
    seed: int = 0


class OutputConfig(_Strict):
    path: str
    storage_options: dict[str, Any] = Field(default_factory=dict)
    shard_max_samples: int | None = 10_000
    shard_max_bytes: int | None = None  # either or both; a shard closes at whichever comes first
    mmc4_docs_per_pkl: int = 1_000
    mmc4_max_images_per_doc: int = 6  # VILA's interleaved loader
    caption_policy: CaptionPolicy = CaptionPolicy()
    keep_quarantine_payloads: bool = True  # write quarantined rows' bytes to quarantine/ for inspection


class RunConfig(_Strict):
    name: str = "vila2-curate"
    engine: Literal["local", "ray", "beam"] = "local"
    batch_size: int = 256
    sources: list[SourceConfig]
    stages: list[StageConfig] = Field(default_factory=lambda: [NormalizeConfig()])
    output: OutputConfig

    def config_hash(self) -> str:
        """Hash of everything that changes the output (not the engine, not the batch size)."""
        payload = self.model_dump(mode="json", exclude={"engine", "batch_size"})
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


class ConfigError(ValueError):
    pass


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Load and validate a YAML config; relative local paths resolve against the YAML's folder."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    raw.update(overrides or {})
    _resolve_relative(raw, path.parent.resolve())
    return parse_config(raw, origin=str(path))


def parse_config(raw: dict[str, Any], origin: str = "<config>") -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = ".".join(str(p) for p in err["loc"])
            lines.append(f"  {loc}: {err['msg']}")
        raise ConfigError(f"{origin}: invalid config\n" + "\n".join(lines)) from None


def _is_local_relative(p: str) -> bool:
    return "://" not in p and not p.startswith("/")


def _resolve_relative(raw: dict[str, Any], base: Path) -> None:
    for src in raw.get("sources") or []:
        if isinstance(src, dict):
            if isinstance(src.get("paths"), list):
                src["paths"] = [str(base / p) if isinstance(p, str) and _is_local_relative(p) else p
                                for p in src["paths"]]
            for k in ("image_root", "image_dir"):
                if isinstance(src.get(k), str) and _is_local_relative(src[k]):
                    src[k] = str(base / src[k])
    out = raw.get("output")
    if isinstance(out, dict) and isinstance(out.get("path"), str) and _is_local_relative(out["path"]):
        out["path"] = str(base / out["path"])
