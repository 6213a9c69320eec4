"""Cheap dedup (exact, pHash, MinHash captions and documents) on the offline sample, scored against its ground truth.

The sample plants exact copies, near-duplicate re-encodings, pHash-colliding distinct pictures, a boilerplate
caption and re-crawled MMC4 pages, and knows the right answer for each: this test is the end-to-end check
that the local engine's dedup finds what is there and merges nothing that is not.
"""

from __future__ import annotations

import glob
import itertools
import json
import pickle
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from vila2_curate.pipelines.validate import read_vila_samples

DEDUP = {"type": "dedup", "methods": ["exact", "phash", "minhash_captions", "minhash_documents"]}
NEAR_PAIR_RECALL = 0.95

Ident = tuple[str, str]


class Outcome:
    """What one run kept and rejected, joined on the ground truth's (source, key) and document url."""

    def __init__(self, out: Path, truth: dict[str, Any]) -> None:
        self.truth = truth
        self.flags: dict[Ident, list[str]] = {}
        for s in read_vila_samples(str(out)):
            j = s[".json"]
            # readers rewrite unsafe keys (the dotted img2dataset key): source_key holds the original one
            self.flags[(j["source"], j.get("source_key") or j["key"])] = list(j.get("flags") or [])
        self.rejects: dict[Ident, dict[str, Any]] = {}
        self.doc_rejects: dict[str, str] = {}  # document url -> reason
        for p in (out / "rejects").rglob("*.parquet"):
            for r in pq.read_table(p).to_pylist():
                if r["source"] == "mmc4":
                    self.doc_rejects[r["url"]] = r["reason"]
                else:
                    self.rejects[(r["source"], r["source_key"] or r["key"])] = r
        self.docs: list[dict[str, Any]] = []
        for p in sorted(glob.glob(str(out / "mmc4" / "*.pkl"))):
            with open(p, "rb") as f:
                self.docs += pickle.load(f)  # noqa: S301 - our own output, written by this run
        self.doc_urls = {d["url"] for d in self.docs}
        self.mmc4_images = {im["image_name"] for d in self.docs for im in d["image_info"]}
        self.by_ident = {(r["source"], r["key"]): r for r in truth["records"]}
        self.doc_of_image = {r["key"]: r["doc_url"] for r in truth["records"] if r["source"] == "mmc4"}

    def kept(self, m: dict[str, Any]) -> bool:
        if m["source"] == "mmc4":
            return m["key"] in self.mmc4_images
        return (m["source"], m["key"]) in self.flags

    def dedup_reason(self, m: dict[str, Any]) -> str | None:
        """The dedup reason a dropped member got (pairs only: MMC4 images are dropped inside their document)."""
        r = self.rejects.get((m["source"], m["key"]))
        return r["reason"] if r is not None and r["stage"] == "dedup" else None


@pytest.fixture(scope="module")
def outcome(sample_dir: Path, curated_sample) -> Outcome:
    return Outcome(curated_sample([{"type": "normalize"}, DEDUP]),
                   json.loads((sample_dir / "ground_truth.json").read_text()))


def test_every_exact_group_keeps_exactly_one(outcome: Outcome) -> None:
    groups = outcome.truth["exact_groups"]
    assert groups
    for gid, members in groups.items():
        kept = [m for m in members if outcome.kept(m)]
        assert len(kept) == 1, (gid, kept)
        for m in members:
            if m not in kept and m["source"] != "mmc4":
                assert (outcome.dedup_reason(m) or "").startswith("duplicate_"), (gid, m, outcome.dedup_reason(m))


def test_every_near_duplicate_group_keeps_exactly_one(outcome: Outcome) -> None:
    groups = outcome.truth["near_groups"]
    assert groups, "the sample planted no near-duplicate group"
    kept_per_group = {gid: [(m["source"], m["key"]) for m in members if outcome.kept(m)]
                      for gid, members in groups.items()}
    wrong = {gid: kept for gid, kept in kept_per_group.items() if len(kept) != 1}
    assert not wrong, f"near-duplicate groups that kept other than one member: {wrong}"


def test_near_duplicate_pairs_found(outcome: Outcome) -> None:
    """A pair is found when both variants end in one dedup group: the same kept row.

    A kept variant is its own group; a dropped pair row names its keeper in the reason ("... of <id>");
    an MMC4 image is dropped inside its document without a per-image reason, so it matches any group.
    """
    def group(m: dict[str, Any]) -> str | None:
        if outcome.kept(m):
            return f"{m['source']}/{m['key']}/-1" if m["source"] != "mmc4" else f"mmc4:{m['key']}"
        reason = outcome.dedup_reason(m)
        return reason.rsplit(" of ", 1)[-1] if reason else None

    pairs, missed = 0, []
    for gid, members in outcome.truth["near_groups"].items():
        for a, b in itertools.combinations(members, 2):
            pairs += 1
            ga, gb = group(a), group(b)
            if ga is not None and gb is not None and ga != gb:
                missed.append((gid, (a["source"], a["key"]), (b["source"], b["key"])))
    assert pairs and 1 - len(missed) / pairs >= NEAR_PAIR_RECALL, f"{len(missed)}/{pairs} pairs missed: {missed}"


def test_distinct_images_are_not_merged(outcome: Outcome) -> None:
    for gid, members in outcome.truth["similar_groups"].items():
        for m in members:
            assert outcome.kept(m), (gid, m, outcome.dedup_reason(m))
    dropped_docs = {url for url, why in outcome.doc_rejects.items() if why.startswith("duplicate_document")}
    for r in outcome.truth["records"]:
        if r["expected"] != "keep" or r["exact_group"] or r["near_group"]:
            continue
        if r["source"] == "mmc4" and outcome.doc_of_image[r["key"]] in dropped_docs:
            continue  # went with its re-crawled document, checked below
        assert outcome.kept(r), ((r["source"], r["key"]), r["kind"], outcome.dedup_reason(r),
                                 outcome.doc_rejects.get(outcome.doc_of_image.get(r["key"], "")))


def test_only_planted_documents_dropped_as_duplicates(outcome: Outcome) -> None:
    planted = {m["key"] for g in outcome.truth["doc_near_groups"].values() for m in g}
    dup_dropped = {url for url, why in outcome.doc_rejects.items() if why.startswith("duplicate_document")}
    assert dup_dropped <= planted, sorted(dup_dropped - planted)
    # a document dropped for having no image left lost only images that were duplicates or bad anyway
    for doc in outcome.truth["documents"]:
        if outcome.doc_rejects.get(doc["key"], "").startswith("no_usable_images"):
            for name in doc["image_names"]:
                r = outcome.by_ident[("mmc4", name)]
                assert r["expected"] != "keep" or r["exact_group"] or r["near_group"], (doc["key"], name)


def test_planted_near_duplicate_documents_found(outcome: Outcome) -> None:
    groups = outcome.truth["doc_near_groups"]
    assert groups and all(m["jaccard_to_original"] > 0.8 for g in groups.values() for m in g)
    for gid, members in groups.items():
        kept = [m["key"] for m in members if m["key"] in outcome.doc_urls]
        assert len(kept) == 1, (gid, kept, [outcome.doc_rejects.get(m["key"]) for m in members])
        for m in members:
            if m["key"] not in kept:
                assert outcome.doc_rejects[m["key"]].startswith("duplicate_document"), (gid, m["key"])


def test_boilerplate_captions_flagged_not_dropped(outcome: Outcome) -> None:
    bp = [r for r in outcome.truth["records"] if r["boilerplate"]]
    assert len(bp) >= 5
    for r in bp:
        assert outcome.kept(r), ((r["source"], r["key"]), outcome.rejects.get((r["source"], r["key"])))
        assert "boilerplate_caption" in outcome.flags[(r["source"], r["key"])], (r["source"], r["key"])
    flagged = {i for i, f in outcome.flags.items() if "boilerplate_caption" in f}
    assert flagged == {(r["source"], r["key"]) for r in bp}
