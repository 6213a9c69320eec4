"""Prompt sets: YAML data identified by a content hash, and a deterministic per-sample choice.

A prompt set is a YAML mapping ``{name, description, prompts: [str, ...]}``. Built-in sets live in
``recaption/prompt_sets/`` (self_augment, spatial, ocr, grounding); a path to any YAML file works too.
Its identity is ``sha256`` of the *canonical* content (parsed YAML dumped as sorted, compact JSON), first
12 hex digits: comments and formatting do not change it, editing any prompt does. Each caption records
``prompt_id = "<set hash>/<sha256(prompt text)[:8]>"``, so the exact words behind a caption are known.
The prompt for a sample depends only on (set hash, seed, key): same on every engine, batch and resume.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import yaml

PROMPT_SET_DIR = Path(__file__).parent / "prompt_sets"


@dataclass(frozen=True)
class PromptSet:
    name: str
    description: str
    prompts: tuple[str, ...]
    hash: str  # content hash of the canonical YAML content (12 hex)

    def prompt_id(self, index: int) -> str:
        text_hash = hashlib.sha256(self.prompts[index].encode()).hexdigest()[:8]
        return f"{self.hash}/{text_hash}"

    def choose(self, seed: int, key: str) -> tuple[str, str]:
        """(prompt_id, prompt text) for one sample, from a hash of (set hash, seed, key)."""
        digest = hashlib.sha256(f"{self.hash}\x1f{seed}\x1f{key}".encode("utf-8", "surrogateescape")).digest()
        index = int.from_bytes(digest[:8], "big") % len(self.prompts)
        return self.prompt_id(index), self.prompts[index]


def builtin_prompt_sets() -> list[str]:
    return sorted(p.stem for p in PROMPT_SET_DIR.glob("*.yaml"))


def content_hash(data: object) -> str:
    canonical = json.dumps(data, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def parse_prompt_set(raw: object, origin: str = "<prompt set>") -> PromptSet:
    if not isinstance(raw, dict):
        raise ValueError(f"{origin}: a prompt set must be a mapping with 'name' and 'prompts'")
    unknown = set(raw) - {"name", "description", "prompts"}
    if unknown:
        raise ValueError(f"{origin}: unknown prompt-set keys {sorted(unknown)}")
    prompts = raw.get("prompts")
    if (
        not isinstance(prompts, list)
        or not prompts
        or not all(isinstance(p, str) and p.strip() for p in prompts)
    ):
        raise ValueError(f"{origin}: 'prompts' must be a non-empty list of non-empty strings")
    if not isinstance(raw.get("name"), str) or not raw["name"]:
        raise ValueError(f"{origin}: 'name' must be a non-empty string")
    return PromptSet(
        name=raw["name"],
        description=str(raw.get("description") or ""),
        prompts=tuple(p.strip() for p in prompts),
        hash=content_hash(raw),
    )


def load_prompt_set(name_or_path: str | Path) -> PromptSet:
    """A built-in set by name (``self_augment``, ``spatial``, ``ocr``, ``grounding``) or a YAML file path."""
    path = Path(name_or_path)
    if not path.is_file():
        builtin = PROMPT_SET_DIR / f"{name_or_path}.yaml"
        if not builtin.is_file():
            raise FileNotFoundError(
                f"prompt set {str(name_or_path)!r} is neither a YAML file nor a built-in set "
                f"({', '.join(builtin_prompt_sets())})"
            )
        path = builtin
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML: {e}") from e
    return parse_prompt_set(raw, origin=str(path))
