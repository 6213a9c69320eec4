"""Offline sample dataset in the three real source layouts, with a ground truth of what curation must do.

``write_sample(out_dir)`` draws every image with PIL (no downloads) and writes, under ``out_dir``::

    img2dataset/00000.tar .parquet _stats.json, 00001.*   as ``img2dataset --output_format webdataset
                                                           --resize_mode no --skip_reencode True
                                                           --save_additional_columns '["similarity","NSFW",
                                                           "LICENSE"]' --caption_col TEXT`` writes them
    coyo/part-00000.parquet                               COYO-700M columns + ``image`` (encoded bytes)
    coyo/part-00001.parquet, coyo/images/*                COYO-700M columns + ``image_path`` (relative to coyo/)
    mmc4/docs_shard_00000_v2.jsonl, ..._00001_v2.jsonl.gz MMC4 documents; images beside them by image_name
    ground_truth.json                                     per (source, key): kind, expected outcome, groups...

Why synthetic but faithful: tests and the README quickstart need a dataset that exercises every reader,
every drop reason and every dedup path without network access, and whose right answers are known.

Modules: pictures.py draws the pictures and their captions, prose.py the document text, items.py holds an
item with its ground truth and the factories of ordinary and planted pictures, hostile.py the broken
records, ledger.py what the ground truth records while writing; img2dataset.py, coyo.py and mmc4.py write
each source format (the real-format details each reproduces are in its docstring). This module decides
which item goes where and writes ``ground_truth.json``.

Deliberate departures, each a case that real data produces by other routes, recorded in ground truth:
a truncated JPEG in a tar (``--skip_reencode`` keeps bytes cv2 can still half-decode), a ``.txt`` in
cp1252 instead of UTF-8 (a user re-pack), and one sample re-packed with a version suffix,
``000010030.v2.jpg/.json/.txt`` with ``"key": "000010030.v2"`` in json and parquet (COYO ids are int64
and MMC4 has no keys, so the tar is the only place a dotted key can honestly appear; a reader that
splits at the first dot sees key ``000010030`` with extensions ``v2.jpg``..., one that takes the last
known suffix recovers ``000010030.v2`` and must rewrite it to a safe key).

Text is as distinct as the web's: MMC4 documents are 3-12 sentences from a combinatorial grammar (unrelated
documents share < 0.3 of their word trigrams, in practice < 0.1), and pair captions are made distinct
(trigram Jaccard < ledger.CAPTION_MAX_JACCARD) except where the ground truth says they repeat: copies of one
picture (``exact_groups``, ``near_groups``) and the boilerplate caption. The only near-duplicate documents
are mmc4.DOC_NEAR_GROUPS planted re-crawls (``doc_near_groups``: an original and its AMP copy with one number
edited and one sentence added, trigram Jaccard ~0.85-0.9; each document's ``doc_near_group`` names its
group). Text draws use their own seeded stream, so they do not move image bytes.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from vila2_curate.pipelines.demo.coyo import write_coyo
from vila2_curate.pipelines.demo.hostile import (
    HOSTILE_KINDS,
    bad_matched_index_item,
    bomb_item,
    corrupt_bytes_item,
    dotted_key_item,
    failed_fetch,
    missing_file_item,
    not_utf8_item,
    truncated_jpeg_item,
    zero_byte_item,
)
from vila2_curate.pipelines.demo.img2dataset import DOWNLOAD_ERRORS, write_img2dataset
from vila2_curate.pipelines.demo.items import BOILERPLATE_CAPTION, ItemFactory, SampleItem
from vila2_curate.pipelines.demo.ledger import GroundTruthLedger
from vila2_curate.pipelines.demo.mmc4 import plan_documents, write_mmc4
from vila2_curate.pipelines.demo.pictures import PictureGenerator
from vila2_curate.pipelines.demo.prose import ProseGenerator, jaccard, word_shingles

SOURCES = ("img2dataset", "coyo_bytes", "coyo_paths", "mmc4")


def _build(out: Path, seed: int, scale: int) -> dict[str, Any]:
    """Make every item, assign it to its source, write the sources and return the ground truth.

    The order of the calls below is the order of the random draws: moving one changes the bytes written.
    """
    s = scale
    g = PictureGenerator(seed)
    t = ProseGenerator(seed)
    ledger = GroundTruthLedger(t)
    make = ItemFactory(g)
    ex1 = make.exact_group("exact-1", 4)  # photo across img2dataset x2, coyo_bytes, mmc4
    ex2 = make.exact_group("exact-2", 3)  # shape across coyo_bytes, coyo_paths, mmc4
    ex3 = make.exact_group("exact-3", 2)  # shape within img2dataset shard 0
    ex4 = make.exact_group("exact-4", 2)  # shape within mmc4 (two image names)
    near = [make.near_group(f"near-{i + 1}") for i in range(2 * s)]
    sim_flat = make.similar_pair("similar-1", "flat")
    sim_shape = make.similar_pair("similar-2", "shapes")

    def bp(n: int) -> list[SampleItem]:
        return [make.photo_item(boilerplate=True) for _ in range(n)]

    not_utf8 = not_utf8_item(make)
    dotted = dotted_key_item(make)

    i2d0: list[tuple[SampleItem, str | None]] = [(x, None) for x in (
        make.plain_items(22 * s) + bp(3) + [ex1[0], ex3[0], ex3[1], near[0][0], sim_flat[0],
                                             make.too_small_item(), truncated_jpeg_item(g)])]
    i2d0 += [failed_fetch(g, "failed_to_download", DOWNLOAD_ERRORS[i % 4]) for i in range(2 * s)]
    for (plain, _), kind in zip(i2d0, HOSTILE_KINDS, strict=False):  # the first entries are plain items
        plain.hostile = kind
    i2d1: list[tuple[SampleItem, str | None]] = [(x, None) for x in (
        make.plain_items(22 * s) + bp(2) + [ex1[1], near[0][1], sim_flat[1], sim_shape[0],
                                             make.aspect_item(), not_utf8, dotted])]
    i2d1 += [failed_fetch(g, "failed_to_download", DOWNLOAD_ERRORS[(i + 2) % 4]) for i in range(s)]
    i2d1 += [failed_fetch(g, "failed_to_resize", "Image decoding error")]
    for extra_near in near[1:]:
        i2d1.append((extra_near[0], None))

    coyo0 = (make.plain_items(20 * s) + bp(3) + [ex1[2], ex2[0], near[0][2], sim_shape[1], make.exif6_item(),
                                                 corrupt_bytes_item(g), zero_byte_item(),
                                                 make.too_small_item()] + [n[1] for n in near[1:]])
    missing = missing_file_item("Vintage poster of a seaside town",
                                "image_path points to a file that does not exist")
    zero_file = zero_byte_item()
    coyo1 = (make.plain_items(20 * s) + bp(3) + [ex2[1], near[0][3], bomb_item(), zero_file, missing,
                                                 make.aspect_item()] + [n[2] for n in near[1:]])

    mm_pool = make.plain_items(24 * s) + [n[3] for n in near[1:]] + [n[4] for n in near[1:]]
    special = [[ex1[3], near[0][4]], [ex2[2], ex4[0]], [ex4[1]], [make.exif6_item()]]
    miss_img = missing_file_item("", "image_info entry whose image file is absent")
    oor = bad_matched_index_item(make)
    special += [[make.shape_item(), miss_img], [oor, make.text_item()]]
    docs: list[list[SampleItem]] = [list(d) for d in special]
    while mm_pool:
        k = min(len(mm_pool), g.randint(1, 3))
        docs.append(mm_pool[:k])
        mm_pool = mm_pool[k:]
    order = [int(i) for i in g.rng.permutation(len(docs))]
    docs = [docs[i] for i in order]
    half = len(docs) // 2

    write_img2dataset(out, seed, g, ledger, [i2d0, i2d1])
    write_coyo(out, g, ledger, 0, coyo0, "bytes")
    write_coyo(out, g, ledger, 1, coyo1, "paths")
    plans = plan_documents(t, docs, half)
    write_mmc4(out, g, ledger, 0, plans[0], gz=False)
    write_mmc4(out, g, ledger, 1, plans[1], gz=True)
    return ground_truth(ledger, seed, scale)


def ground_truth(ledger: GroundTruthLedger, seed: int, scale: int) -> dict[str, Any]:
    """The ground truth of a written sample: summary, duplicate groups, every row and every document."""
    def groups(field: str) -> dict[str, list[dict[str, str]]]:
        out: dict[str, list[dict[str, str]]] = {}
        for r in ledger.records:
            if r[field]:
                out.setdefault(r[field], []).append({"source": r["source"], "key": r["key"],
                                                      "sha256": r["sha256"]})
        return dict(sorted(out.items()))

    summary = {
        "rows": len(ledger.records),
        "rows_per_source": dict(sorted(Counter(r["source"] for r in ledger.records).items())),
        "by_expected": dict(sorted(Counter(r["expected"] for r in ledger.records).items())),
        "by_kind": dict(sorted(Counter(r["kind"] for r in ledger.records).items())),
        "keep": sum(r["expected"] == "keep" for r in ledger.records),
        "boilerplate_rows": sum(r["boilerplate"] for r in ledger.records),
        "documents": len(ledger.documents),
        "documents_with_issues": sum(bool(d["issues"]) for d in ledger.documents),
        "exact_groups": len(groups("exact_group")),
        "near_groups": len(groups("near_group")),
        "similar_groups": len(groups("similar_group")),
        "doc_near_groups": len(ledger.doc_near_groups),
    }
    doc_near: dict[str, list[dict[str, Any]]] = {}
    for gid, members in sorted(ledger.doc_near_groups.items()):
        members = sorted(members, key=lambda m: m["role"] != "original")
        base = word_shingles(members[0]["text"])
        doc_near[gid] = [{**{k: v for k, v in m.items() if k != "text"},
                          "jaccard_to_original": round(jaccard(base, word_shingles(m["text"])), 4)}
                         for m in members]
    return {
        "version": 1, "seed": seed, "scale": scale, "boilerplate_caption": BOILERPLATE_CAPTION,
        "sources": {"img2dataset": "img2dataset/*.tar (+ .parquet, _stats.json)",
                    "coyo_bytes": "coyo/part-00000.parquet (column image)",
                    "coyo_paths": "coyo/part-00001.parquet (column image_path, relative to coyo/)",
                    "mmc4": "mmc4/docs_shard_*_v2.jsonl[.gz], images beside them"},
        "summary": summary,
        "exact_groups": groups("exact_group"), "near_groups": groups("near_group"),
        "similar_groups": groups("similar_group"), "doc_near_groups": doc_near,
        "records": ledger.records, "documents": ledger.documents,
    }


def write_sample(out_dir: str, seed: int = 0, scale: int = 1) -> dict[str, Any]:
    """Write the sample dataset under ``out_dir`` and return its ground truth (also ``ground_truth.json``).

    Same ``seed`` and ``scale`` give byte-identical files; ``scale`` multiplies the ordinary rows and
    near-duplicate groups (the edge cases stay one of each).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    truth = _build(out, seed, max(1, int(scale)))
    (out / "ground_truth.json").write_text(json.dumps(truth, indent=1, ensure_ascii=False) + "\n")
    return truth
