"""Dedup benchmarks: MinHash signatures/s vs datasketch, pHash search vs brute force, bytes per item,
thumbnail CPU per image (own decode vs normalize's draft decode), signatures + decide CPU per image.

Every ratio is against a baseline measured in the same run.
Run: python benchmarks/bench_dedup.py [thumbnails] [decide]  (no argument: all)
"""

from __future__ import annotations

import io
import time

import numpy as np
from _common import best_of, distinct_photo_jpeg, report
from datasketch import MinHash

from vila2_curate.curation.dedup.minhash import minhash_signatures
from vila2_curate.curation.dedup.phash import brute_force_pairs, hamming_pairs
from vila2_curate.curation.dedup.stage import SIGNATURE_SCHEMA
from vila2_curate.curation.dedup.thumbnails import THUMB_BYTES


def _docs(n: int, words: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    vocab = np.array([f"word{i}" for i in range(20_000)])
    return [" ".join(vocab[rng.zipf(1.3, size=words) % vocab.size]) for _ in range(n)]


def _shingles(text: str, k: int = 3) -> list[bytes]:
    w = text.lower().split()
    return [" ".join(w[i:i + k]).encode() for i in range(max(1, len(w) - k + 1))]


def bench_minhash(n: int = 2000, words: int = 200, num_perm: int = 128) -> None:
    docs = _docs(n, words)
    ours = best_of(lambda: minhash_signatures(docs, num_perm, 3), 3)
    bulk = best_of(lambda: MinHash.bulk([_shingles(d) for d in docs], num_perm=num_perm), 2)
    sub = docs[: n // 10]

    def loop() -> None:
        for d in sub:
            m = MinHash(num_perm=num_perm)
            for s in _shingles(d):
                m.update(s)

    loop_t = best_of(loop, 1) * (len(docs) / len(sub))
    report("minhash_signatures", docs=n, words_per_doc=words, num_perm=num_perm,
           ours_docs_per_s=round(n / ours), bulk_docs_per_s=round(n / bulk), loop_docs_per_s=round(n / loop_t),
           speedup_vs_bulk=round(bulk / ours, 2), speedup_vs_update_loop=round(loop_t / ours, 2))


def bench_phash(n: int = 1_000_000, planted: int = 10_000, k: int = 4, queries: int = 2000) -> None:
    rng = np.random.default_rng(0)
    h = rng.integers(0, 2**64 - 1, size=n, dtype=np.uint64, endpoint=True)
    dst = rng.choice(n, planted, replace=False)
    src = rng.choice(np.setdiff1d(np.arange(n), dst), planted, replace=False)
    for j in range(planted):
        flips = rng.choice(64, size=int(rng.integers(1, k + 1)), replace=False).astype(np.uint64)
        h[dst[j]] = h[src[j]] ^ np.bitwise_or.reduce(np.uint64(1) << flips)
    t = time.perf_counter()
    pairs = hamming_pairs(h, k)
    ours = time.perf_counter() - t
    found = set(map(tuple, pairs.tolist()))
    recall = np.mean([(min(a, b), max(a, b)) in found for a, b in zip(src, dst, strict=True)])
    q = np.sort(rng.choice(n, queries, replace=False))
    t = time.perf_counter()
    ref = brute_force_pairs(h, k, queries=q)
    brute = (time.perf_counter() - t) * n / queries  # extrapolated: a full 1M x 1M scan takes ~20 min
    qset = set(q.tolist())
    ours_q = {p for p in found if p[0] in qset or p[1] in qset}
    report("phash_search", items=n, planted=planted, max_distance=k, ours_s=round(ours, 2),
           brute_force_s_extrapolated=round(brute, 1), brute_force_queries=queries,
           speedup=round(brute / ours, 1), planted_recall=float(recall),
           recall_vs_brute_on_queries=len(ours_q & set(map(tuple, ref.tolist()))) / max(1, len(ref)))


def bench_state_bytes(n_items: int = 1_000_000, sample: int = 10_000, num_perm: int = 128) -> None:
    rng = np.random.default_rng(1)
    sig = {"source": ["coyo"] * sample, "key": [f"{i:012d}" for i in range(sample)],
           "image_index": [-1] * sample, "kind": ["pair"] * sample,
           "sha256": [rng.bytes(32).hex() for _ in range(sample)],
           "phash": rng.integers(0, 2**63, size=sample, dtype=np.uint64),
           "thumb": [rng.bytes(THUMB_BYTES) for _ in range(sample)], "embedding": [None] * sample,
           "clip_score": [None] * sample, "text": ["a typical alt text caption of about sixty characters long"] * sample,
           "minhash": [None] * sample, "publishable": [True] * sample,
           "pixels": rng.integers(40_000, 2_000_000, size=sample, dtype=np.int64)}
    import pyarrow as pa
    image_only = pa.Table.from_pydict(sig, schema=SIGNATURE_SCHEMA)
    sig["minhash"] = list(rng.integers(0, 2**32, size=(sample, num_perm), dtype=np.uint32))
    with_minhash = pa.Table.from_pydict(sig, schema=SIGNATURE_SCHEMA)
    # pHash join state at n_items (k=4): hashes, unique hashes, 3 chunk keys/orders, 2^21-slot tables
    mih_bytes = n_items * 8 * 2 + n_items * 8 * 2 + 2 * (1 << 21) * 8
    report("dedup_state_bytes", items=n_items,
           signature_bytes_per_item_phash_exact_thumb=round(image_only.nbytes / sample),
           signature_bytes_per_item_with_caption_minhash=round(with_minhash.nbytes / sample),
           phash_index_bytes_per_item=round(mih_bytes / n_items, 1),
           signature_table_gib_at_n=round(with_minhash.nbytes / sample * n_items / 2**30, 2))


def _cpu_ms(fn, items: list) -> float:
    """Process CPU ms per item of ``fn`` over ``items``, best of two passes."""
    best = float("inf")
    for _ in range(2):
        t = time.process_time()
        for x in items:
            fn(x)
        best = min(best, time.process_time() - t)
    return 1000 * best / len(items)


def bench_thumbnail_cpu(n: int = 200) -> None:
    """CPU per image of dedup's thumbnail: ``thumbnail`` (its own draft decode at >= 256 px, then the
    signature) against ``thumbnail_of`` on the picture as normalize has already decoded it (JPEG draft at
    >= 128 px: a quarter of 1280x720), with that decode timed on its own; on 1280x720 photo-like JPEGs (the
    pipeline benchmark's input) and on the dedup evaluation set (~550 px cards, shapes, text, photos)."""
    from PIL import Image

    from vila2_curate.curation.dedup.thumbnails import thumbnail, thumbnail_of
    from vila2_curate.pipelines.demo.dedup_eval import make_dedup_eval

    def normalize_decode(data: bytes) -> Image.Image:
        img = Image.open(io.BytesIO(data))
        if img.format == "JPEG":
            img.draft("RGB", (128, 128))
        img.load()
        return img

    sets = {"photo_1280x720": [distinct_photo_jpeg(i) for i in range(n)],
            "dedup_eval": [it.data for it in make_dedup_eval(0, 24).items][:n]}
    for name, data in sets.items():
        decoded = [normalize_decode(d) for d in data]
        report("thumbnail_cpu", images=name, count=len(data),
               thumbnail_own_decode_ms=round(_cpu_ms(thumbnail, data), 3),
               normalize_draft_decode_ms=round(_cpu_ms(normalize_decode, data), 3),
               thumbnail_of_normalize_decode_ms=round(_cpu_ms(thumbnail_of, decoded), 3))


def bench_decide_cpu(seeds: int = 3, families: int = 80) -> None:
    """DedupStage signatures and decide CPU per image on ``seeds`` evaluation sets joined into one table."""
    import pyarrow as pa

    from vila2_curate.curation.dedup import DedupStage
    from vila2_curate.pipelines.demo.dedup_eval import eval_table, make_dedup_eval

    tables = []
    for seed in range(seeds):
        t = eval_table(make_dedup_eval(seed, families))
        tables.append(t.set_column(t.schema.get_field_index("key"), "key",
                                   pa.array([f"s{seed}_{k}" for k in t.column("key").to_pylist()])))
    table = pa.concat_tables(tables)
    stage = DedupStage()
    t = time.process_time()
    sigs = stage.signatures(table)
    sig = time.process_time() - t
    t = time.process_time()
    stage.decide(sigs)
    decide = time.process_time() - t
    report("dedup_cpu", images=table.num_rows, signature_ms_per_image=round(1000 * sig / table.num_rows, 3),
           decide_ms_per_image=round(1000 * decide / table.num_rows, 3))


if __name__ == "__main__":
    import sys

    only = set(sys.argv[1:])  # e.g. ``thumbnails decide``: just those; none: every benchmark
    if not only:
        bench_minhash()
        bench_phash()
        bench_state_bytes()
    if not only or "thumbnails" in only:
        bench_thumbnail_cpu()
    if not only or "decide" in only:
        bench_decide_cpu()
