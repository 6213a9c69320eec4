"""Duplicate removal: exact (sha256), pHash (+ thumbnail / CLIP confirmation), MinHash documents and
boilerplate captions, SemDeDup; joined with union-find in :class:`DedupStage`."""

from vila2_curate.curation.dedup.stage import BOILERPLATE_FLAG, SIGNATURE_SCHEMA, DedupStage, summarize

__all__ = ["BOILERPLATE_FLAG", "SIGNATURE_SCHEMA", "DedupStage", "summarize"]
