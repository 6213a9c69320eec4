"""Caption sidecars: ``captions/<caption_choice>/<tar relpath>.json`` = ``{url: {"output": str}}``, which VILA
looks up by each sample's url and falls back to the sample's .txt where there is no entry."""

from __future__ import annotations

import posixpath
from dataclasses import dataclass

import fsspec

from vila2_curate.pipelines.io.writers.wds import SIDECAR_ROOT
from vila2_curate.pipelines.validate.shards import TarFacts, strict_json

SPECIALIST_KEYWORDS = ("spatial", "ocr", "bbox_interleaved")  # coyo_qa picks a specialist question by substring


@dataclass
class SidecarTally:
    """One caption folder's coverage, summed over the tars (the INFO line of ``vila2-curate validate``)."""

    covered: int = 0
    samples: int = 0
    tars_with_file: int = 0
    tars: int = 0


def caption_folders(sidecar_files: set[str]) -> list[str]:
    """The caption folders (VILA's ``caption_choice`` names) under the sidecar root, sorted."""
    return sorted({r.split("/")[1] for r in sidecar_files if r.count("/") >= 2})


def check_sidecar_layout(sidecar_files: set[str], folders: list[str], tars: list[str], problems: list[str]) -> None:
    """Folder names VILA's specialist loader would misread, and sidecar files no tar of this output owns."""
    for folder in folders:
        hits = [k for k in SPECIALIST_KEYWORDS if k in folder]
        if len(hits) > 1:
            problems.append(f"{SIDECAR_ROOT}/{folder}: name contains {hits}; VILA's specialist loader takes the "
                            f"first of spatial/ocr/bbox_interleaved it finds")
    for rel in sorted(sidecar_files):
        tar = rel.split("/", 2)[2][: -len(".json")] if rel.count("/") >= 2 and rel.endswith(".json") else None
        if tar not in tars:
            problems.append(f"{rel}: not <caption folder>/<tar relpath>.json of a tar in this output; VILA never "
                            f"reads it")


def check_sidecars_of_tar(
    fs: fsspec.AbstractFileSystem, base: str, tar: str, facts: TarFacts, folders: list[str],
    sidecar_files: set[str], tallies: dict[str, SidecarTally], problems: list[str],
) -> None:
    """VILA reads ``<caption_choice>/<tar relpath>.json`` = ``{url: {"output": str}}``, looked up by url."""
    urls = set(facts.urls.values())
    has_any = False
    for folder in folders:
        rel = f"{SIDECAR_ROOT}/{folder}/{tar}.json"
        tally = tallies.setdefault(folder, SidecarTally())
        tally.tars += 1
        tally.samples += len(facts.urls)
        if rel not in sidecar_files:
            continue
        has_any = True
        tally.tars_with_file += 1
        try:
            with fs.open(f"{base}/{rel}", "rb") as fh:
                data = strict_json(fh.read())
        except ValueError as e:
            problems.append(f"{rel}: not valid JSON ({e})")
            continue
        if not isinstance(data, dict):
            problems.append(f"{rel}: top level must be an object {{url: {{\"output\": str}}}}")
            continue
        foreign = [k for k in data if k not in urls]
        if foreign:
            problems.append(f"{rel}: {len(foreign)} key(s) are not a url of {tar} (VILA looks captions up by the "
                            f"sample's url, so they are never read), e.g. {foreign[0]!r}")
        bad = [k for k, v in data.items() if not isinstance(v, dict) or not isinstance(v.get("output"), str)
               or not v["output"].strip()]
        if bad:
            problems.append(f"{rel}: {len(bad)} entr(y/ies) lack a non-empty {{\"output\": str}}, e.g. {bad[0]!r}")
        tally.covered += len(urls & set(data))
    if has_any and facts.duplicate_urls:
        url, keys = next(iter(facts.duplicate_urls.items()))
        problems.append(f"{tar}: {len(facts.duplicate_urls)} url(s) shared by several samples, e.g. {url!r} by "
                        f"{keys}: sidecars are keyed by url, so those samples get one another's captions")


def warn_shared_urls(
    tar: str, facts: TarFacts, folders: list[str], sidecar_files: set[str], warnings: list[str],
) -> None:
    """Samples sharing a url in a tar with no sidecar yet: legal now, mixed up by a later recaption round."""
    if facts.duplicate_urls and not any(f"{SIDECAR_ROOT}/{f}/{tar}.json" in sidecar_files for f in folders):
        url, keys = next(iter(facts.duplicate_urls.items()))
        warnings.append(f"{tar}: {len(facts.duplicate_urls)} url(s) shared by several samples, e.g. {url!r} "
                        f"by {keys}: a recaption round's sidecars (keyed by url) would mix them up")


def report_sidecar_coverage(tallies: dict[str, SidecarTally], metas: dict[str, list[str]], info: list[str]) -> None:
    """One line per caption folder: the share of samples it covers and the caption_choice path per data_path."""
    for folder, tally in sorted(tallies.items()):
        share = tally.covered / tally.samples if tally.samples else 0.0
        roots = ", ".join(f"data_path {d or '.'} -> caption_choice "
                          f"{posixpath.join(SIDECAR_ROOT, folder, d).rstrip('/')}" for d in sorted(metas))
        info.append(
            f"{SIDECAR_ROOT}/{folder}: covers {tally.covered} of {tally.samples} samples ({share:.1%}) in "
            f"{tally.tars_with_file} of {tally.tars} tars; samples without an entry fall back to their .txt "
            f"({roots})"
        )
