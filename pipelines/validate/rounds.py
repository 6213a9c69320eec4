"""Recaption rounds held to their records: a round the manifest says ran must have written its sidecar for
every tar whose samples hold one of its captions, and its sidecars must cover what the round captioned.
VILA looks each sample up in ``captions/r<k>-<model-tag>/<tar relpath>.json`` and, on a miss, prints
"fallback to original caption" and trains on the sample's .txt: a silent loss of the round's work.

What a sidecar should hold comes from the writer's own rules applied to each sample's lineage (the
``captions`` list of its .json): ``RoundCaption`` (the last caption of a round and model, unless flagged
truncated/refusal/empty) and ``round_texts`` (what summaries.json["rounds"] counts per round).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from vila2_curate.pipelines.io.writers.wds import SIDECAR_ROOT
from vila2_curate.pipelines.validate.findings import Validation
from vila2_curate.pipelines.validate.run_record import RunRecord
from vila2_curate.recaption.sidecar import RoundCaption, caption_folder
from vila2_curate.schemas.run_metrics import round_texts

ROUND_FOLDER = re.compile(r"r(\d+)-.+")  # recaption.sidecar.caption_folder


def _caption_records(captions: Any) -> list[dict[str, Any]]:
    """The lineage records the writer's rules can read; anything else in a (hand-edited) .json is skipped."""
    if not isinstance(captions, list):
        return []
    return [c for c in captions if isinstance(c, dict) and type(c.get("round")) is int
            and isinstance(c.get("model"), str) and isinstance(c.get("text"), str | None)
            and isinstance(c.get("flags") or [], list) and all(isinstance(f, str) for f in c.get("flags") or [])]


def sample_caption_folders(captions: Any) -> tuple[set[str], set[int]]:
    """(sidecar folders that should hold this sample's caption, rounds >= 1 with a non-empty caption)."""
    caps = _caption_records(captions)
    folders = set()
    for k, model in {(c["round"], c["model"]) for c in caps}:
        try:
            folder = caption_folder(k, model)
        except ValueError:  # a name the writer refuses: it never wrote such a folder
            continue
        if RoundCaption(k, model)({"captions": caps}):
            folders.add(folder)
    return folders, {k for k in round_texts(caps, None) if k >= 1}


@dataclass
class RoundLineage:
    """Sums over the tars of what the samples' lineage says each round's sidecar folder should hold."""

    usable: Counter[str] = field(default_factory=Counter)  # folder -> samples with a usable caption for it
    captioned: Counter[int] = field(default_factory=Counter)  # round -> samples with a non-empty caption


def folder_round(folder: str) -> int | None:
    """The round of a recaption folder ``r<k>-<model-tag>``; None for specialist folders."""
    m = ROUND_FOLDER.fullmatch(folder)
    return int(m.group(1)) if m else None


def check_round_sidecars_of_tar(
    tar: str, usable: Counter[str], rounds: set[int], folders: list[str], sidecar_files: set[str],
    problems: list[str],
) -> None:
    """A tar without its sidecar in a folder the round wrote, though its samples hold that round's captions."""
    for folder, n in sorted(usable.items()):
        k = folder_round(folder)
        if k in rounds and folder in folders and f"{SIDECAR_ROOT}/{folder}/{tar}.json" not in sidecar_files:
            problems.append(
                f"{tar}: no sidecar {SIDECAR_ROOT}/{folder}/{tar}.json, though round {k} recaptioned it ({n} "
                f"sample(s) hold a usable round-{k} caption; manifest stage recaption_r{k}): VILA prints "
                f"'fallback to original caption' for each and trains on the .txt")


def check_round_coverage(
    record: RunRecord, lineage: RoundLineage, covered: dict[str, tuple[int, int]], folders: list[str],
    min_coverage: float | None, report: Validation,
) -> None:
    """Each recaptioned round's folder covers at least ``min_coverage`` of the samples; by default, every
    sample the round's stats say it captioned, less those whose lineage says the sidecar leaves out."""
    for k in sorted(record.recaption_rounds):
        names = {f for f in {*lineage.usable, *folders} if folder_round(f) == k}
        for folder in sorted(names):
            if folder not in folders:
                if folder not in record.sidecar_folders:  # listed ones: check_manifest reports each file
                    report.warnings.append(
                        f"{SIDECAR_ROOT}/{folder}: missing, though round {k} gave {lineage.usable[folder]} "
                        f"sample(s) a usable caption (manifest stage recaption_r{k}; recaption.sidecars: "
                        f"false?): a VILA config whose caption_choice names it trains them on the .txt")
                continue
            hit, n = covered.get(folder, (0, 0))
            share = hit / n if n else 1.0
            if min_coverage is not None:
                if hit < min_coverage * n - 1e-9:
                    report.problems.append(
                        f"{SIDECAR_ROOT}/{folder}: covers {hit} of {n} samples ({share:.1%}), under "
                        f"--min-caption-coverage {min_coverage:.1%}; VILA prints 'fallback to original "
                        f"caption' for the others and trains them on the .txt")
                continue
            stats = record.round_captions.get(k)
            left_out = lineage.captioned[k] - lineage.usable[folder]  # flagged bad, or another model's
            expected = min(max(lineage.usable[folder] if stats is None else stats - left_out, 0), n)
            if hit < expected:
                source = (f"summaries.json rounds[{k}] captions {stats}, less {left_out} the samples' lineage "
                          f"keeps out of it: flagged truncated/refusal/empty" if stats is not None
                          else "the samples' lineage")
                report.problems.append(
                    f"{SIDECAR_ROOT}/{folder}: covers {hit} of {n} samples ({share:.1%}), but round {k} "
                    f"captioned {expected} ({source}): VILA prints 'fallback to original caption' for the "
                    f"{expected - hit} others and trains them on the .txt (--min-caption-coverage sets the bar)")
