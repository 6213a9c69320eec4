"""Demo-model identity: the one rule that says "this model folder holds random (demo) weights".

Every demo builder (pipelines/demo/models.py, pipelines/demo/vlm.py, pipelines/demo/detector.py) writes the marker
with :func:`mark_demo_model`, and every model stage asks :func:`is_demo_model`, so the ``demo`` flag in a
score's or caption's lineage means the same thing everywhere.
"""

from __future__ import annotations

from pathlib import Path

DEMO_MARKER = "DEMO_MODEL"  # a checkpoint folder holding a file of this name has random (demo) weights


def is_demo_model(folder: str | Path | None) -> bool:
    """True when ``folder`` holds the demo marker (its outputs are meaningless)."""
    return folder is not None and Path(folder, DEMO_MARKER).is_file()


def mark_demo_model(folder: str | Path, note: str) -> None:
    """Write the demo marker into ``folder``; ``note`` is its one-line text (who built it, and why)."""
    Path(folder, DEMO_MARKER).write_text(note + "\n")
