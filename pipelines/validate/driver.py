"""The whole-output check: walk the tree once, run each concern's checks in a fixed order (so the findings
read the same on every run), and cross-check the counts they gather."""

from __future__ import annotations

import posixpath
from typing import Any

import fsspec

from vila2_curate.pipelines.io.writers.atomic import is_temp_name
from vila2_curate.pipelines.io.writers.mmc4 import VILA_MAX_IMAGES_PER_DOC
from vila2_curate.pipelines.io.writers.records import WIDS_META
from vila2_curate.pipelines.io.writers.wds import SIDECAR_ROOT
from vila2_curate.pipelines.validate.accounting import check_manifest, check_stats
from vila2_curate.pipelines.validate.findings import Validation
from vila2_curate.pipelines.validate.images import ImageDigests, report_duplicate_images
from vila2_curate.pipelines.validate.mmc4 import check_mmc4_dirs, check_mmc4_pairs, check_world_sizes
from vila2_curate.pipelines.validate.rounds import (
    RoundLineage,
    check_round_coverage,
    check_round_sidecars_of_tar,
)
from vila2_curate.pipelines.validate.run_record import read_run_record
from vila2_curate.pipelines.validate.shards import TarFacts, check_tar
from vila2_curate.pipelines.validate.sidecars import (
    SidecarTally,
    caption_folders,
    check_sidecar_layout,
    check_sidecars_of_tar,
    report_sidecar_coverage,
    warn_shared_urls,
)
from vila2_curate.pipelines.validate.wids_meta import check_coyo_len4, check_wids_meta

_COMPRESSED_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst", ".tar.lz4")
_RECORD_DIRS = ("rejects/", "quarantine/")  # parquet records, not shards


def _walk_tree(fs: fsspec.AbstractFileSystem, base: str, report: Validation) -> tuple[dict[str, int], set[str]]:
    """Regular files (relpath -> size) and every entry name; symlinks and other non-regular files are
    problems (VILA's sidecar lookup uses realpath, and a fifo would hang any reader)."""
    files: dict[str, int] = {}
    entries: set[str] = set()
    for path, info in sorted(fs.find(base, withdirs=True, detail=True).items()):
        rel = posixpath.relpath(fs._strip_protocol(path), base)
        if rel == ".":
            continue
        entries.add(rel)
        if info.get("islink"):
            report.problems.append(f"{rel}: symlink in the output tree (VILA resolves realpath for sidecars and "
                                   f"copies would not follow it); publish regular files only")
        elif info.get("type") == "file":
            files[rel] = int(info.get("size") or 0)
        elif info.get("type") != "directory":
            report.problems.append(f"{rel}: not a regular file ({info.get('type')})")
    return files, entries


def check_output(
    root: str, storage_options: dict[str, Any] | None = None, *, max_images_per_doc: int = VILA_MAX_IMAGES_PER_DOC,
    world_sizes: list[int] | tuple[int, ...] = (), min_caption_coverage: float | None = None,
) -> Validation:
    """Check the output folder at ``root`` against the output contract and VILA's loading rules.

    ``min_caption_coverage``: the share of samples each recaptioned round's sidecar folder must cover;
    None: every sample the round's records say it captioned with a caption the sidecar takes.
    """
    if min_caption_coverage is not None and not 0.0 <= min_caption_coverage <= 1.0:
        raise ValueError(f"min_caption_coverage must be between 0 and 1, got {min_caption_coverage}")
    report = Validation()
    problems = report.problems
    fs, base = fsspec.core.url_to_fs(root, **(storage_options or {}))
    base = base.rstrip("/")
    if not fs.isdir(base):
        problems.append(f"{root}: not a folder")
        return report
    files, entries = _walk_tree(fs, base, report)
    for rel in sorted(entries):
        if is_temp_name(rel):
            problems.append(f"{rel}: leftover temporary file (an interrupted write)")
    records = [r for r in files if not r.startswith(_RECORD_DIRS) and not is_temp_name(r)]
    for rel in records:
        if rel.endswith(_COMPRESSED_SUFFIXES):
            problems.append(f"{rel}: compressed tar; VILA's reader needs an uncompressed .tar")
    tars = [r for r in records if r.endswith(".tar")]
    sidecar_files = {r for r in records if r.startswith(SIDECAR_ROOT + "/")}
    folders = caption_folders(sidecar_files)
    check_sidecar_layout(sidecar_files, folders, tars, problems)
    record = read_run_record(fs, base, files)
    rounds = record.recaption_rounds
    lineage = RoundLineage()
    counts: dict[str, int | None] = {}
    facts: dict[str, TarFacts] = {}
    tallies: dict[str, SidecarTally] = {}
    digests = ImageDigests()
    for t_index, rel in enumerate(tars):
        tf = check_tar(fs, f"{base}/{rel}", rel, problems, report.warnings)
        counts[rel] = tf.nsamples
        check_sidecars_of_tar(fs, base, rel, tf, folders, sidecar_files, tallies, problems)
        warn_shared_urls(rel, tf, folders, sidecar_files, report.warnings)
        check_round_sidecars_of_tar(rel, tf.usable_captions, rounds, folders, sidecar_files, problems)
        lineage.usable.update(tf.usable_captions)
        lineage.captioned.update(tf.captioned_rounds)
        digests.add(t_index, tf.images)
        # keep only what the cross-file checks need, so memory stays per shard (plus the digests)
        facts[rel] = TarFacts(nsamples=tf.nsamples, last_keys=tf.last_keys)
    report_duplicate_images(fs, base, tars, digests, report, record.exact_dedup())
    if tars and WIDS_META not in files:
        problems.append(f"{WIDS_META} is missing but the output has {len(tars)} tar shards")
    metas: dict[str, list[str]] = {}
    for meta_rel in [r for r in records if posixpath.basename(r) == WIDS_META]:
        listed = check_wids_meta(fs, base, meta_rel, files, tars, counts, problems)
        metas[posixpath.dirname(meta_rel)] = listed
    check_coyo_len4(metas, facts, report)
    report_sidecar_coverage(tallies, metas, report.info)
    covered = {f: (t.covered, t.samples) for f, t in tallies.items()}
    check_round_coverage(record, lineage, covered, folders, min_caption_coverage, report)
    pairs = check_mmc4_dirs({r: s for r, s in files.items() if r in records}, problems)
    check_mmc4_pairs(fs, base, pairs, max_images_per_doc, counts, problems)
    if world_sizes:
        check_world_sizes(fs, base, entries, pairs, list(world_sizes), report)
    shards = {r: "wds" for r in tars} | {p: "mmc4" for p, _ in pairs}
    check_manifest(fs, base, files, shards, counts, problems)
    check_stats(fs, base, files, problems)
    return report


def validate_output(
    root: str, storage_options: dict[str, Any] | None = None, *, max_images_per_doc: int = VILA_MAX_IMAGES_PER_DOC,
    world_sizes: list[int] | tuple[int, ...] = (), min_caption_coverage: float | None = None,
) -> list[str]:
    """Return every way the output folder at ``root`` breaks the output contract (empty list = valid)."""
    return check_output(root, storage_options, max_images_per_doc=max_images_per_doc,
                        world_sizes=world_sizes, min_caption_coverage=min_caption_coverage).problems
