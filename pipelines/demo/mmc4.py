"""The MMC4 source: ``docs_shard_<n>_v2.jsonl`` (shard 1 gzipped) documents with their images beside them.

Each line is an MMC4 document (``url``, ``text_list``, ``image_info`` with ``image_name``, ``raw_url``,
``matched_text_index``, ``matched_sim``, ``face_detections``; ``similarity_matrix``;
``could_have_url_duplicate``), as the MMC4 README describes. The only near-duplicate documents are the
DOC_NEAR_GROUPS planted re-crawls (``doc_near_groups`` in the ground truth).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from pathlib import Path
from typing import Any

from vila2_curate.pipelines.demo.items import SampleItem
from vila2_curate.pipelines.demo.ledger import GroundTruthLedger
from vila2_curate.pipelines.demo.pictures import PictureGenerator
from vila2_curate.pipelines.demo.prose import DOC_TOPICS, ProseGenerator

DOC_NEAR_GROUPS = 2  # planted re-crawled MMC4 page pairs (the only near-duplicate documents)


def plan_documents(t: ProseGenerator, docs: list[list[SampleItem]],
                   half: int) -> list[list[dict[str, Any]]]:
    """Text and URL of every document, per shard; plants DOC_NEAR_GROUPS re-crawled page pairs.

    Ordinary documents are 3-12 sentences from the combinatorial grammar (distinct pages). A planted
    pair is an original of 12 sentences and its re-crawl (the AMP copy of the same URL) with one
    number edited and one sentence added: word-trigram Jaccard ~0.85-0.95, what MinHash document dedup
    at 0.8 must catch. Both sides hold ordinary pool images, so image counts do not change.
    """
    topics = sorted(DOC_TOPICS)
    plans: list[list[dict[str, Any]]] = [[], []]
    for d, images in enumerate(docs):
        shard, line = (0, d) if d < half else (1, d - half)
        topic = t.pick(topics)
        n_sent = int(t.rng.integers(max(3, len(images)), 13))
        plans[shard].append({
            "images": images, "topic": topic, "text_list": t.document(topic, n_sent),
            "url": f"https://www.{topic}-blog-{shard}.example.org/posts/{line}-{topic}.html",
            "doc_near_group": None, "doc_near_role": None,
        })

    def ordinary(plan: dict[str, Any]) -> bool:
        return all(it.kind in {"shape", "text", "photo"} and it.expected == "keep" and not (
            it.exact_group or it.near_group or it.similar_group) for it in plan["images"])

    plain = [[pl for pl in plans[sh] if ordinary(pl)] for sh in (0, 1)]
    for g in range(DOC_NEAR_GROUPS):
        gid = f"doc-near-{g + 1}"
        # group 1: original in the .jsonl, re-crawl in the .jsonl.gz; group 2 the other way round
        orig, dup = (plain[0][g], plain[1][g]) if g % 2 == 0 else (plain[1][g], plain[0][g])
        topic = orig["topic"]
        text = t.document(topic, 12)
        edited = [i for i, x in enumerate(text) if re.search(r"\d", x)] or [0]
        i_edit = edited[int(t.rng.integers(0, len(edited)))]
        i_add = int(t.rng.integers(1, len(text)))
        recrawl = list(text)
        recrawl[i_edit] = t.edit_number(recrawl[i_edit])
        extra = min(t.document(topic, 6), key=lambda x: (len(x.split()), x))  # a short update note
        recrawl.insert(i_add, extra)
        orig.update(text_list=text, doc_near_group=gid, doc_near_role="original")
        dup.update(topic=topic, text_list=recrawl, url=orig["url"] + "?output=amp",
                   doc_near_group=gid, doc_near_role="recrawl")
    return plans


def write_mmc4(out: Path, g: PictureGenerator, ledger: GroundTruthLedger, shard: int,
               plans: list[dict[str, Any]], gz: bool) -> None:
    """Write one shard of planned documents (gzipped when ``gz``) and their image files; every image is
    recorded in ``ledger`` and every document in ``ledger.documents``."""
    folder = out / "mmc4"
    folder.mkdir(parents=True, exist_ok=True)
    fname = f"docs_shard_{shard:05d}_v2.jsonl" + (".gz" if gz else "")
    lines = []
    for line_no, plan in enumerate(plans):
        images, topic, text_list, doc_url = plan["images"], plan["topic"], plan["text_list"], plan["url"]
        n_sent = len(text_list)
        sim = g.rng.uniform(0.12, 0.3, size=(len(images), n_sent))
        image_info, doc_issues = [], []
        for i, it in enumerate(images):
            raw_url = f"https://www.{topic}-blog-{shard}.example.org/wp-content/uploads/{line_no}_{i}.jpg"
            name = hashlib.sha256(raw_url.encode()).hexdigest()[:12] + ".jpg"
            j = int(g.rng.integers(0, n_sent))
            sim[i, j] = float(g.rng.uniform(0.24, 0.34))
            matched_sim = float(sim[i, j])
            if it.expected == "matched_text_index_out_of_range":
                j = n_sent + 2
                doc_issues.append(it.expected)
            if it.kind == "missing_file":
                doc_issues.append(it.expected)
            else:
                (folder / name).write_bytes(it.data or b"")
            image_info.append({"image_name": name, "raw_url": raw_url, "matched_text_index": j,
                               "matched_sim": matched_sim, "face_detections": None})
            ledger.record("mmc4", f"mmc4/{name}", name, it, doc_file=f"mmc4/{fname}", doc_line=line_no,
                          doc_url=doc_url, image_index=i, matched_text_index=j,
                          caption=text_list[j] if j < n_sent else None)
        could_dup = int(g.rng.random() < 0.1)
        doc = {"url": doc_url, "text_list": text_list, "image_info": image_info,
               "similarity_matrix": [[float(v) for v in r] for r in sim],
               "could_have_url_duplicate": 1 if plan["doc_near_group"] else could_dup}
        lines.append(json.dumps(doc))
        entry = {"source": "mmc4", "file": f"mmc4/{fname}", "line": line_no, "key": doc_url,
                 "n_images": len(images), "n_sentences": n_sent, "issues": sorted(set(doc_issues)),
                 "image_names": [x["image_name"] for x in image_info],
                 "doc_near_group": plan["doc_near_group"]}
        ledger.documents.append(entry)
        if plan["doc_near_group"]:
            member = {k: entry[k] for k in ("source", "file", "line", "key")}
            member["role"] = plan["doc_near_role"]
            member["text"] = " ".join(text_list)
            ledger.doc_near_groups.setdefault(plan["doc_near_group"], []).append(member)
    payload = ("\n".join(lines) + "\n").encode()
    path = folder / fname
    if gz:
        with path.open("wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as f:
            f.write(payload)
    else:
        path.write_bytes(payload)
