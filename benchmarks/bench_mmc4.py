"""MMC4 writer: streamed round-robin pkls vs one ``pickle.dump`` of the same documents (the old writer's way).

Prints JSON lines: write speed of Mmc4PklWriter (8 parts, documents streamed one at a time) against
``pickle.dump(list)`` of the same MMC4 dicts in one file, measured in the same run, and the peak Python
memory (tracemalloc) of each for N and 2N documents: the streamed writer's peak should not grow with the
documents in a pkl (growth ~1.0), the baseline's doubles.

    python benchmarks/bench_mmc4.py [--docs 400] [--images 4]
"""

from __future__ import annotations

import argparse
import pickle
import tempfile
import tracemalloc
from pathlib import Path

import fsspec
from _common import best_of, photo_like_jpegs, report

from vila2_curate.pipelines.io.writers.mmc4 import Mmc4PklWriter, mmc4_document
from vila2_curate.schemas.rows import DOCUMENT_SCHEMA, make_table


def _rows(n_docs: int, n_images: int) -> list[dict]:
    jpegs = photo_like_jpegs(8, size=(512, 384))
    rows = []
    for i in range(n_docs):
        infos = [{"image_name": f"{i}-{j}.jpg", "raw_url": f"https://example.com/{i}/{j}.jpg", "matched_text_index": j,
                  "matched_sim": 0.3, "image": jpegs[(i + j) % len(jpegs)], "image_format": "jpg",
                  "sha256": "0" * 64, "phash": 1, "width": 512, "height": 384, "drop_reason": None,
                  "drop_stage": None, "meta": None} for j in range(n_images)]
        rows.append({"key": f"d{i:06d}", "source": "mmc4", "shard": "00000", "url": f"https://example.com/doc/{i}",
                     "text_list": [f"sentence {s} of document {i} " * 4 for s in range(n_images + 2)],
                     "image_info": infos,
                     "similarity_matrix": [[0.1] * (n_images + 2) for _ in range(n_images)],
                     "could_have_url_duplicate": 0})
    return rows


def _ours(fs: fsspec.AbstractFileSystem, table, dest: str) -> int:
    w = Mmc4PklWriter(fs, dest, "mmc4/00000", docs_per_pkl=1_000_000, min_files=8)
    for off in range(0, table.num_rows, 64):
        w.write(table.slice(off, 64))
    return sum(f.bytes for f in w.close())


def _baseline(table, dest: str) -> int:
    """The previous writer's way: convert batch by batch, keep the documents, one pickle.dump per pkl."""
    docs = []
    for off in range(0, table.num_rows, 64):
        docs.extend(mmc4_document(r, 6)[0] for r in table.slice(off, 64).to_pylist())
    path = Path(dest, "baseline.pkl")
    with open(path, "wb") as f:
        pickle.dump(docs, f, protocol=4)
    return path.stat().st_size


def _peak(fn) -> int:
    tracemalloc.start()
    fn()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=400)
    ap.add_argument("--images", type=int, default=4)
    args = ap.parse_args()
    fs = fsspec.filesystem("file")
    small = make_table(_rows(args.docs, args.images), DOCUMENT_SCHEMA)
    large = make_table(_rows(2 * args.docs, args.images), DOCUMENT_SCHEMA)
    with tempfile.TemporaryDirectory() as tmp:
        t_ours = best_of(lambda: _ours(fs, small, f"{tmp}/a"))
        t_base = best_of(lambda: _baseline(small, tmp))
        size_ours, size_base = _ours(fs, small, f"{tmp}/a"), _baseline(small, tmp)
        peaks = {(name, n): _peak(fn) for (name, n), fn in {
            ("ours", args.docs): lambda: _ours(fs, small, f"{tmp}/b"),
            ("ours", 2 * args.docs): lambda: _ours(fs, large, f"{tmp}/c"),
            ("baseline", args.docs): lambda: _baseline(small, tmp),
            ("baseline", 2 * args.docs): lambda: _baseline(large, tmp),
        }.items()}
    mib = {k: round(v / 2**20, 1) for k, v in peaks.items()}
    report("mmc4_writer", docs=args.docs, images_per_doc=args.images, files=8,
           docs_per_s=round(args.docs / t_ours, 1), baseline_docs_per_s=round(args.docs / t_base, 1),
           speed_ratio=round(t_base / t_ours, 2), size_ratio=round(size_ours / size_base, 3))
    report("mmc4_writer_memory", peak_mib={f"ours_{n}_docs" if name == "ours" else f"baseline_{n}_docs": v
                                            for (name, n), v in mib.items()},
           ours_growth=round(peaks[("ours", 2 * args.docs)] / peaks[("ours", args.docs)], 2),
           baseline_growth=round(peaks[("baseline", 2 * args.docs)] / peaks[("baseline", args.docs)], 2))


if __name__ == "__main__":
    main()
