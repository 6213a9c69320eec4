"""What the run's own records say it did, so the output can be held to it.

``manifest.parquet`` is the run's commit point: every shard's row carries the run's ``stage_versions``
(stage name -> version, e.g. ``{"dedup": "2", "recaption_r1": "1"}``) and its sidecar files (kind
``sidecar``). ``summaries.json`` holds each global stage's summary under the stage's name and, under
``"rounds"``, how many published samples hold a caption of each recaption round. Neither records a dedup
stage's ``methods``; a summary that lists them is honoured, otherwise a dedup stage counts as exact.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import fsspec

from vila2_curate.pipelines.io.parquet_read import read_parquet
from vila2_curate.pipelines.io.writers.records import MANIFEST

RECAPTION_STAGE = re.compile(r"recaption_r(\d+)(?:_\d+)?")  # RecaptionStage.name (+ build_plan's _<n>)
DEDUP_STAGE = re.compile(r"dedup(?:_\d+)?")  # DedupStage.name (+ build_plan's _<n> for a second one)


@dataclass
class RunRecord:
    """The stages the manifest lists, the sidecar folders it lists, and summaries.json's figures."""

    stages: dict[str, str] = field(default_factory=dict)  # name -> version, over every manifest row
    sidecar_folders: set[str] = field(default_factory=set)  # caption folders of the manifest's sidecar rows
    round_captions: dict[int, int] = field(default_factory=dict)  # summaries.json["rounds"][k]["captions"]
    summaries: dict[str, Any] = field(default_factory=dict)

    @property
    def recaption_rounds(self) -> set[int]:
        """The rounds a recaption stage of this run wrote captions for."""
        return {int(m.group(1)) for s in self.stages if (m := RECAPTION_STAGE.fullmatch(s))}

    def exact_dedup(self) -> str | None:
        """The record saying exact (sha256) dedup ran over this output, or None.

        A dedup stage whose summary lists ``methods`` counts only with "exact" in them; one whose summary does
        not (the writer does not record them) counts as exact: exact is in the default ``[exact, phash]``,
        and pHash and SemDeDup group byte-identical copies as well.
        """
        for name, version in sorted(self.stages.items()):
            if not DEDUP_STAGE.fullmatch(name):
                continue
            summary = self.summaries.get(name)
            methods = summary.get("methods") if isinstance(summary, dict) else None
            if isinstance(methods, list):
                if "exact" in methods:
                    return f"{MANIFEST} lists stage {name}@{version}, summaries.json[{name!r}] methods {methods}"
                continue
            return f"{MANIFEST} lists stage {name}@{version}; its methods are not recorded, exact is a default"
        return None


def _json_object(text: Any) -> dict[str, Any]:
    try:
        obj = json.loads(text) if isinstance(text, str) else None
    except ValueError:
        return {}
    return obj if isinstance(obj, dict) else {}


def read_run_record(fs: fsspec.AbstractFileSystem, base: str, files: dict[str, int]) -> RunRecord:
    """The run's records as far as they are readable (``check_manifest`` reports a broken manifest)."""
    record = RunRecord()
    if MANIFEST in files:
        try:
            rows = read_parquet(fs, f"{base}/{MANIFEST}").to_pylist()
        except Exception:  # noqa: BLE001 - check_manifest reports why
            rows = []
        for r in rows:
            stages = _json_object(r.get("stage_versions"))
            record.stages.update({str(k): str(v) for k, v in stages.items()})
            shard = r.get("shard")
            if r.get("kind") == "sidecar" and isinstance(shard, str) and shard.count("/") >= 2:
                record.sidecar_folders.add(shard.split("/")[1])
    if "summaries.json" in files:
        try:
            with fs.open(f"{base}/summaries.json", "rb") as fh:
                summaries = json.load(fh)
        except ValueError:
            summaries = {}
        record.summaries = summaries if isinstance(summaries, dict) else {}
    rounds = record.summaries.get("rounds")
    for k, rec in (rounds.items() if isinstance(rounds, dict) else ()):
        n = rec.get("captions") if isinstance(rec, dict) else None
        if str(k).isdigit() and isinstance(n, int) and not isinstance(n, bool):
            record.round_captions[int(k)] = n
    return record
