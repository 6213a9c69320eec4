"""Check an output folder against the output contract, reading it the way VILA's trainer does.

``validate_output`` returns a list of problems (empty = valid) instead of raising, so a user sees every
problem of a run at once. Tars are indexed with the same raw-header walk as VILA's ``MMIndexedTar``
(llava/wids/wids_mmtar.py) and grouped with wids' ``os.path.splitext`` rule, so "valid" means "VILA sees
the samples we meant", not merely "Python's tarfile can open it".

One module per concern: ``tar_reader`` (VILA-style tar index and sample reading), ``shards`` (one tar's
members and samples), ``images``, ``wids_meta``, ``sidecars`` (caption sidecars), ``mmc4`` (pkl/count pairs
and VILA's rank rule), ``accounting`` (manifest and stats), ``run_record`` (what the manifest and
summaries.json say the run did), ``rounds`` (a recaptioned round's sidecars against that record) and
``driver`` (the whole-output run). The names below are the package's interface; callers import them from
here.
"""

from __future__ import annotations

from vila2_curate.pipelines.validate.driver import check_output, validate_output
from vila2_curate.pipelines.validate.findings import Validation
from vila2_curate.pipelines.validate.images import IMAGE_EXTS
from vila2_curate.pipelines.validate.mmc4 import vila_mmc4_ranks
from vila2_curate.pipelines.validate.shards import SAMPLE_EXTS, TarFacts, strict_json
from vila2_curate.pipelines.validate.tar_reader import (
    TarMember,
    TarScan,
    compression_of,
    read_vila_samples,
    scan_tar,
    vila_groups,
)
from vila2_curate.pipelines.validate.wids_meta import COYO_SAMPLES_PER_IDX

__all__ = [
    "COYO_SAMPLES_PER_IDX",
    "IMAGE_EXTS",
    "SAMPLE_EXTS",
    "TarFacts",
    "TarMember",
    "TarScan",
    "Validation",
    "check_output",
    "compression_of",
    "read_vila_samples",
    "scan_tar",
    "strict_json",
    "validate_output",
    "vila_groups",
    "vila_mmc4_ranks",
]
