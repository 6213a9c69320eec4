"""What a validation run found, and the per-file cap that keeps one broken shard from flooding the report."""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_PROBLEMS_PER_FILE = 25


@dataclass
class Validation:
    """Everything ``vila2-curate validate`` found: problems fail it, warnings and info are printed."""

    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    info: list[str] = field(default_factory=list)


def add_capped(problems: list[str], rel: str, local: list[str]) -> None:
    """Add one file's problems prefixed with its path, at most ``MAX_PROBLEMS_PER_FILE`` plus a count of the rest."""
    for msg in local[:MAX_PROBLEMS_PER_FILE]:
        problems.append(f"{rel}: {msg}")
    if len(local) > MAX_PROBLEMS_PER_FILE:
        problems.append(f"{rel}: ... and {len(local) - MAX_PROBLEMS_PER_FILE} more problems")
