"""Scale benchmark: the CPU decision stages over N synthetic rows (default 1M), no images.

The global decisions are the only part of a run whose memory grows with the whole dataset (map stages
stream batch by batch), so this is what decides whether one driver can aggregate COYO-700M. Signature
tables are generated directly in each stage's SIGNATURE_SCHEMA with planted duplicates, then decided with
``pipelines.aggregate.decide_local`` exactly as the local engine does. Each stage runs in its own child
process so its peak RSS (VmHWM) is its own. Prints one JSON line per stage: rows/s of decide(), peak and
decide-only memory, and Arrow bytes per row of the signature table.

    python benchmarks/bench_scale.py --n 100000            # ~1 min on 2 cores
    python benchmarks/bench_scale.py                       # 1M rows: ~8 min, 5.8 GiB peak (dedup)
    python benchmarks/bench_scale.py --stages dedup_minhash_captions   # + caption MinHash: ~11 GiB at 1M

Measured here (2 shared cores): dedup exact+pHash decide 171 us/row at 20k, 315 at 100k, 427 at 1M
(superlinear) with ~5.2 KB/row of decide memory; clip_filter and deltaloss ~5-7 us/row, <250 B/row.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

SOURCES = ["coyo_a", "coyo_b", "img2dataset", "laion"]
STAGES = ["dedup_exact_phash", "dedup_minhash_captions", "clip_filter", "deltaloss"]
DEFAULT_STAGES = ["dedup_exact_phash", "clip_filter", "deltaloss"]  # fits ~10 min at 1M on 2 cores


def _mem_kib(field: str) -> int:
    """VmRSS / VmHWM of this process in KiB (Linux); ru_maxrss elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _keys(n: int) -> tuple[pa.Array, pa.Array]:
    src = pa.array(np.array(SOURCES)[np.arange(n) % len(SOURCES)])
    key = pa.array([f"{i:012d}" for i in range(n)])
    return src, key


def _binary(flat: np.ndarray, width: int) -> pa.Array:
    n = flat.size // width
    offsets = pa.py_buffer((np.arange(n + 1, dtype=np.int32) * width).tobytes())
    return pa.Array.from_buffers(pa.binary(), n, [None, offsets, pa.py_buffer(flat.tobytes())])


def dedup_signatures(n: int, seed: int, captions: bool) -> pa.Table:
    """Pair signatures with ~2% exact copies and ~3% near copies (pHash within 3 bits, thumbnail noise)."""
    from curation.dedup.stage import SIGNATURE_SCHEMA
    from curation.dedup.thumbnails import THUMB_BYTES

    rng = np.random.default_rng(seed)
    src, key = _keys(n)
    orig = np.arange(n)
    exact = rng.random(n) < 0.02
    near = (rng.random(n) < 0.03) & ~exact
    orig[exact | near] = rng.integers(0, n, size=int((exact | near).sum()))
    digests = rng.integers(0, 256, size=(n, 32), dtype=np.uint8)
    sha = digests[orig]
    sha_hex = pa.array([bytes(r).hex() for r in sha])
    phash = rng.integers(0, 2**63, size=n, dtype=np.uint64)[orig]
    flips = rng.integers(0, 64, size=(n, 3))
    for j in range(3):
        phash[near] ^= (np.uint64(1) << flips[near, j].astype(np.uint64))
    thumbs = rng.integers(0, 256, size=(n, THUMB_BYTES), dtype=np.uint8)[orig]
    noise = rng.integers(-3, 4, size=(int(near.sum()), THUMB_BYTES))
    thumbs[near] = np.clip(thumbs[near].astype(np.int16) + noise, 0, 255).astype(np.uint8)
    cols: dict[str, Any] = {
        "source": src, "key": key, "image_index": pa.array(np.full(n, -1, np.int32)),
        "kind": pa.array(["pair"] * n), "sha256": sha_hex, "phash": pa.array(phash),
        "thumb": _binary(thumbs.ravel(), THUMB_BYTES),
        "embedding": pa.nulls(n, pa.list_(pa.float32())), "clip_score": pa.nulls(n, pa.float32()),
    }
    if captions:
        from curation.dedup.minhash import minhash_signatures

        vocab = np.array([f"w{i}" for i in range(5000)])
        words = rng.integers(0, len(vocab), size=(n, 12))
        boiler = rng.random(n) < 0.01  # stock captions repeated across many images
        words[boiler] = words[0]
        texts = [" ".join(r) for r in vocab[words]]
        t = time.perf_counter()
        mh = minhash_signatures(texts, 128, 3)
        cols["_minhash_s"] = time.perf_counter() - t
        cols["text"] = pa.array(texts)
        cols["minhash"] = pa.ListArray.from_arrays(
            pa.array(np.arange(n + 1, dtype=np.int32) * 128), pa.array(mh.ravel()))
    else:
        cols["text"] = pa.nulls(n, pa.string())
        cols["minhash"] = pa.nulls(n, pa.list_(pa.uint32()))
    extra = {"minhash_signatures_s": round(cols.pop("_minhash_s"), 2)} if "_minhash_s" in cols else {}
    table = pa.table({f.name: cols[f.name] for f in SIGNATURE_SCHEMA}, schema=SIGNATURE_SCHEMA)
    return table.replace_schema_metadata({"extra": json.dumps(extra)})


def clip_signatures(n: int, seed: int) -> pa.Table:
    from curation.clip_filter import SIGNATURE_SCHEMA

    rng = np.random.default_rng(seed)
    src, key = _keys(n)
    return pa.table({"source": src, "key": key, "image_index": pa.array(np.full(n, -1, np.int32)),
                     "shard": pa.array(np.array([f"{i:05d}" for i in range(1000)])[np.arange(n) % 1000]),
                     "group": src, "rule": pa.array(["clip_score"] * n),
                     "clip_score": pa.array(np.clip(rng.normal(0.75, 0.1, n), 0, 2.5)),
                     "clip_similarity_vitb32": pa.nulls(n, pa.float64()),
                     "clip_similarity_vitl14": pa.nulls(n, pa.float64())}, schema=SIGNATURE_SCHEMA)


def deltaloss_signatures(n: int, seed: int) -> pa.Table:
    from curation.deltaloss import SIGNATURE_SCHEMA

    rng = np.random.default_rng(seed)
    src, key = _keys(n)
    return pa.table({"source": src, "key": key, "image_index": pa.array(np.full(n, -1, np.int32)),
                     "subset": src, "delta_loss": pa.array(rng.normal(0.0, 1.0, n))}, schema=SIGNATURE_SCHEMA)


def make_stage(name: str):
    from schemas.config import ClipFilterConfig, DedupConfig, DeltaLossConfig

    if name == "dedup_exact_phash":
        from curation.dedup.stage import DedupStage

        return DedupStage(DedupConfig(methods=["exact", "phash"]))
    if name == "dedup_minhash_captions":
        from curation.dedup.stage import DedupStage

        return DedupStage(DedupConfig(methods=["exact", "phash", "minhash_captions"]))
    if name == "clip_filter":
        from curation.clip_filter import ClipFilterStage

        return ClipFilterStage(ClipFilterConfig(top_percent=95))
    from curation.deltaloss import DeltaLossTopKStage

    return DeltaLossTopKStage(DeltaLossConfig(small_model="unused", large_model="unused", keep_fraction=0.9))


def run_stage(name: str, n: int, seed: int) -> dict[str, Any]:
    """Generate the stage's signatures, decide them as the local engine does, measure."""
    from pipelines.aggregate import decide_local

    t = time.perf_counter()
    if name.startswith("dedup"):
        sig = dedup_signatures(n, seed, captions=name == "dedup_minhash_captions")
    elif name == "clip_filter":
        sig = clip_signatures(n, seed)
    else:
        sig = deltaloss_signatures(n, seed)
    gen_s = time.perf_counter() - t
    extra = json.loads((sig.schema.metadata or {}).get(b"extra", b"{}"))
    stage = make_stage(name)
    stage.setup()
    rss_before = _mem_kib("VmRSS")
    t = time.perf_counter()
    decisions = decide_local(stage, sig)
    decide_s = time.perf_counter() - t
    peak = _mem_kib("VmHWM")
    dropped = decisions.filter(pa.compute.is_valid(decisions.column("drop_reason"))).num_rows
    return {"bench": "scale", "stage": name, "rows": n, "decide_s": round(decide_s, 2),
            "rows_per_s": round(n / decide_s), "us_per_row": round(1e6 * decide_s / n, 2),
            "signature_bytes_per_row": round(sig.nbytes / n, 1),
            "signature_table_mib": round(sig.nbytes / 2**20, 1),
            "rss_before_decide_mib": round(rss_before / 1024), "peak_rss_mib": round(peak / 1024),
            "decide_extra_mib": round((peak - rss_before) / 1024),
            "decide_extra_bytes_per_row": round((peak - rss_before) * 1024 / n),
            "decisions": decisions.num_rows, "dropped": dropped, "generate_s": round(gen_s, 2), **extra}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000, help="rows (signatures) per stage")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stages", nargs="*", default=DEFAULT_STAGES, choices=STAGES)
    ap.add_argument("--child", help=argparse.SUPPRESS)  # run one stage in this process
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(run_stage(args.child, args.n, args.seed)), flush=True)
        return 0
    rc = 0
    for name in args.stages:  # one process per stage: VmHWM is then that stage's own peak
        proc = subprocess.run([sys.executable, __file__, "--child", name, "--n", str(args.n),
                               "--seed", str(args.seed)], capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
        line = (proc.stdout.strip().splitlines() or [""])[-1]
        if proc.returncode != 0 or not line.startswith("{"):
            print(json.dumps({"bench": "scale", "stage": name, "rows": args.n, "error": proc.stderr[-1500:]}))
            rc = 1
        else:
            print(line, flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
