"""Shard writer and reader throughput against a raw tarfile write/read of the same bytes (target >= 0.9x).

    python benchmarks/bench_io.py [--n 3000] [--kb 60]

Writer: WdsShardWriter (caption policy, sample json, USTAR, hashing, atomic rename) vs tarfile.addfile of
the already-encoded members. Reader: Img2DatasetReader (streaming, key grouping, quarantine checks, Arrow
batches) vs a bare streaming tarfile loop that reads every member. Same bytes, same run, best of 3.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tarfile
import tempfile

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from _common import best_of, report

from pipelines.readers.img2dataset import Img2DatasetReader
from pipelines.writers.wds import WdsShardWriter
from schemas.config import CaptionPolicy, SourceConfig
from schemas.rows import PAIR_SCHEMA, make_table


def _rows(n: int, kb: int) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        size = int(kb * 1024 * rng.uniform(0.5, 1.5))
        rows.append({"key": f"{i:09d}", "source": "bench", "shard": "00000", "url": f"https://e.com/{i}.jpg",
                     "image": b"\xff\xd8" + rng.bytes(size), "image_format": "jpg", "width": 640,
                     "height": 480, "sha256": f"{i:064x}", "phash": i,
                     "text": f"a photo of thing number {i} on a table", "quarantined": False})
    return rows


def _members(rows: list[dict]) -> list[tuple[str, bytes]]:
    out = []
    for r in rows:
        meta = {k: r[k] for k in ("url", "key", "width", "height", "sha256")}
        out += [(f"{r['key']}.jpg", r["image"]), (f"{r['key']}.txt", r["text"].encode()),
                (f"{r['key']}.json", json.dumps(meta).encode())]
    return out


def _raw_write(path: str, members: list[tuple[str, bytes]]) -> None:
    with open(path, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _raw_read(path: str) -> int:
    n = 0
    with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
        for m in tar:
            n += len(tar.extractfile(m).read())
    return n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--kb", type=int, default=60)
    args = ap.parse_args()
    rows = _rows(args.n, args.kb)
    members = _members(rows)
    table = make_table(rows, PAIR_SCHEMA)
    payload_mb = sum(len(d) for _, d in members) / 1e6
    fs = fsspec.filesystem("file")
    with tempfile.TemporaryDirectory() as tmp:
        raw_path = os.path.join(tmp, "raw.tar")

        def ours_write() -> None:
            w = WdsShardWriter(fs, os.path.join(tmp, "ours"), "bench/00000", max_samples=None, max_bytes=None,
                               caption_policy=CaptionPolicy())
            for off in range(0, table.num_rows, 256):
                w.write(table.slice(off, 256))
            w.close()

        t_raw_w = best_of(lambda: _raw_write(raw_path, members))
        t_ours_w = best_of(ours_write)
        report("shard_writer_vs_raw_tarfile", samples=args.n, payload_mb=round(payload_mb, 1),
               raw_mb_per_s=round(payload_mb / t_raw_w, 1), ours_mb_per_s=round(payload_mb / t_ours_w, 1),
               ratio=round(t_raw_w / t_ours_w, 3), target=0.9)

        # an img2dataset-layout shard (tar + parquet) of the same members for the reader
        shard_dir = os.path.join(tmp, "i2d")
        os.makedirs(shard_dir)
        _raw_write(os.path.join(shard_dir, "00000.tar"), members)
        pq.write_table(pa.table({"key": [r["key"] for r in rows], "url": [r["url"] for r in rows],
                                 "caption": [r["text"] for r in rows], "status": ["success"] * len(rows),
                                 "error_message": [None] * len(rows)}),
                       os.path.join(shard_dir, "00000.parquet"))
        reader = Img2DatasetReader(SourceConfig(name="bench", kind="img2dataset",
                                                paths=[os.path.join(shard_dir, "*.tar")]))
        (shard,) = reader.list_shards()

        def ours_read() -> None:
            n = sum(t.num_rows for t in reader.read(shard, 256))
            assert n == args.n, n

        t_raw_r = best_of(lambda: _raw_read(os.path.join(shard_dir, "00000.tar")))
        t_ours_r = best_of(ours_read)
        report("shard_reader_vs_raw_tarfile", samples=args.n, payload_mb=round(payload_mb, 1),
               raw_mb_per_s=round(payload_mb / t_raw_r, 1), ours_mb_per_s=round(payload_mb / t_ours_r, 1),
               ratio=round(t_raw_r / t_ours_r, 3), target=0.9)


if __name__ == "__main__":
    main()
