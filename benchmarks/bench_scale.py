"""Scale benchmark: single-process vs partitioned decide of the global stages over N synthetic rows.

The global decisions are the only part of a run whose memory can grow with the whole dataset (map stages
stream batch by batch). For each stage this runs, on the same synthetic signatures:

* single: one process generates every shard's signatures and calls ``decide_local`` (the reference);
* partitioned: the steps of ``schemas.stage.PartitionedDecide`` as an engine runs them, each task in its
  own fresh process (a pool of ``--workers``, one task per process). For dedup (``CombinesOnEngine``)
  these are the runner's own step objects run by ``components.combine_on_engine`` on ``PoolEngine`` (a
  group-by through files, every task a fresh process): signatures written per shard first (not counted),
  per shard sample, fit on the driver, per shard partition -> per group ``decide_partition`` writing edges
  per shard, per shard confirmation of pending pHash candidates, the large-star / small-star rounds, the
  keeper phases, per shard decisions. For the cut-off stages: per shard partition, per partition
  ``decide_partition``, one ``combine``, per shard ``shard_decisions``.
* combine (dedup only): the partitioned path's own step-2 edges through the single-process ``combine``
  (pending candidates split off in one process, a's payload attached per shard, b's attached and
  confirmed per shard, one ``combine``, per shard ``shard_decisions``): the reference of the combine on
  the engine, on the same edges, so it needs no second run of steps 0-2.

Memory is each process's own peak RSS (VmHWM); ``largest_process_peak_mib`` is the largest over every
process of the mode (driver included); ``process_baseline_mib`` is a task process that only imports and
builds the stage (deltaloss imports torch: ~0.5 GiB before any row). ``us_per_row`` is the decide work per row: the summed seconds of
every decide step (CPU seconds of the task process, so that other load on a shared machine does not
count; signature generation excluded, done again in each task that needs a shard), over N. ``wall_s``
is the mode's elapsed time with ``--workers`` processes.
``identical_decisions`` compares the partitioned decisions with single's row by row (with combine's when
N is above ``--single-max-n``; ``identical_to_combine`` always for dedup); sketch stages are approximate
by design, so their line reports the kept-count difference and the stated rank error instead.

Signatures are generated per shard from counter-based hashes of the global row index, so any shard can be
made alone and duplicates cross shards: ~3% exact copies, ~3% near copies (3 pHash bits flipped,
thumbnail noise), ~1% crops (8 bits flipped: found by thumbnail neighbours), ~3% semantic copies
(embedding noise; 64-dim embeddings), 1% stock captions for MinHash.

    python benchmarks/bench_scale.py --n 200000 --partitions 16 --shard-rows 25000
    # 2M dedup and dedup_captions against the single-process combine on the same edges (``--keep``: the
    # work folder stays, both sides' decisions in it, for a row-by-row look):
    python benchmarks/bench_scale.py --n 2000000 --partitions 16 --shard-rows 25000 --stages dedup dedup_captions
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

STAGES = ["dedup", "dedup_captions", "clip_filter", "deltaloss", "clip_filter_sketch", "deltaloss_sketch"]
SOURCES = ["coyo_a", "coyo_b", "img2dataset", "laion"]
EMB_DIM = 64
_M1, _M2 = np.uint64(0xFF51AFD7ED558CCD), np.uint64(0xC4CEB9FE1A85EC53)


def _peak_kib() -> int:
    """VmHWM of this process in KiB (Linux); ru_maxrss elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _reset_peak() -> None:
    """Start VmHWM again from the current RSS (Linux ``clear_refs`` 5), to measure one step's peak."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _release_free_heap() -> None:
    """Return glibc's freed heap pages to the OS (malloc_trim), so VmHWM after it measures live memory."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _mix(x: np.ndarray, salt: int) -> np.ndarray:
    """murmur3 finaliser of (x + salt): a counter-based hash, so any row can be generated alone."""
    x = x.astype(np.uint64) + np.uint64(salt * 0x9E3779B97F4A7C15 % 2**64)
    x ^= x >> np.uint64(33)
    x *= _M1
    x ^= x >> np.uint64(33)
    x *= _M2
    return x ^ (x >> np.uint64(33))


def _palette(seed: int, what: str) -> np.ndarray:
    from vila2_curate.curation.dedup.thumbnails import THUMB_BYTES

    rng = np.random.default_rng([seed, len(what)])
    if what == "thumb":
        return rng.integers(0, 256, size=(2, 4096, THUMB_BYTES), dtype=np.int16)
    if what == "noise":
        return rng.integers(-2, 3, size=(4096, THUMB_BYTES), dtype=np.int16)
    return rng.normal(size=(3, 4096, EMB_DIM)).astype(np.float32)


def _base(j: np.ndarray, seed: int, pal: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Base attributes of rows j (what a copy of row j copies)."""
    h = [_mix(j, seed * 100 + s) for s in range(6)]
    thumb = ((pal["thumb"][0][h[2] % 4096] + pal["thumb"][1][h[3] % 4096]) % 256).astype(np.uint8)
    emb = pal["emb"][0][h[4] % 4096] + pal["emb"][1][h[5] % 4096]
    return {"sha_a": h[0], "sha_b": _mix(j, seed * 100 + 7), "phash": h[1], "thumb": thumb, "emb": emb}


def shard_range(n: int, shard_rows: int, s: int) -> tuple[int, int]:
    return s * shard_rows, min(n, (s + 1) * shard_rows)


def shard_name(s: int) -> str:
    return f"{SOURCES[s % len(SOURCES)]}/{s:05d}"


def dedup_signatures(n: int, start: int, end: int, seed: int, captions: bool) -> pa.Table:
    from vila2_curate.curation.dedup.stage import SIGNATURE_SCHEMA
    from vila2_curate.curation.dedup.thumbnails import THUMB_BYTES

    pal = {k: _palette(seed, k) for k in ("thumb", "noise", "emb")}
    i = np.arange(start, end, dtype=np.uint64)
    m = i.size
    u = _mix(i, seed * 100 + 50) % np.uint64(10000)
    exact, near, crop, sem = u < 300, (u >= 300) & (u < 600), (u >= 600) & (u < 700), (u >= 700) & (u < 1000)
    orig = _mix(i, seed * 100 + 51) % np.uint64(n)
    own, base = _base(i, seed, pal), _base(orig, seed, pal)
    copy = exact | near | crop
    att = {k: np.where(copy.reshape(-1, *([1] * (own[k].ndim - 1))), base[k], own[k]) for k in own}
    for k in ("sha_a", "sha_b"):
        att[k] = np.where(exact, base[k], own[k])
    for b in range(8):  # near: 3 bits, crop: 8 bits
        bit = np.uint64(1) << (_mix(i, seed * 100 + 60 + b) % np.uint64(64))
        att["phash"] = np.where((near & (b < 3)) | crop, att["phash"] ^ bit, att["phash"])
    noise = pal["noise"][_mix(i, seed * 100 + 70) % 4096]
    noisy = np.clip(att["thumb"].astype(np.int16) + noise, 0, 255).astype(np.uint8)
    att["thumb"] = np.where((near | crop)[:, None], noisy, att["thumb"])
    emb = np.where((near | sem)[:, None], base["emb"] + 0.08 * pal["emb"][2][_mix(i, seed * 100 + 71) % 4096],
                   att["emb"])
    emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)
    sha = pa.array([f"{a:016x}{b:016x}" for a, b in zip(att["sha_a"].tolist(), att["sha_b"].tolist(), strict=True)])
    hs = _mix(i, seed * 100 + 80)
    cols: dict[str, Any] = {
        "source": pa.array(np.array(SOURCES)[(i % np.uint64(len(SOURCES))).astype(np.int64)]),
        "key": pa.array([f"{x:012d}" for x in i.tolist()]), "image_index": pa.array(np.full(m, -1, np.int32)),
        "kind": pa.array(["pair"] * m), "sha256": sha, "phash": pa.array(att["phash"]),
        "thumb": _binary(att["thumb"], THUMB_BYTES),
        "embedding": pa.ListArray.from_arrays(pa.array(np.arange(m + 1, dtype=np.int32) * EMB_DIM),
                                              pa.array(emb.ravel())),
        "clip_score": pa.array((0.5 + (hs % np.uint64(5000)).astype(np.float32) / 10000).astype(np.float32)),
        "publishable": pa.array((hs >> np.uint64(20)) % np.uint64(20) != 0),
        "pixels": pa.array(((hs >> np.uint64(30)) % np.uint64(4) + 1).astype(np.int64) * 50000),
        "text": pa.nulls(m, pa.string()), "minhash": pa.nulls(m, pa.list_(pa.uint32())),
    }
    if captions:
        from vila2_curate.curation.dedup.minhash import minhash_signatures

        vocab = np.array([f"w{v}" for v in range(5000)])
        words = np.stack([_mix(i, seed * 100 + 90 + w) % np.uint64(5000) for w in range(12)], axis=1)
        stock = (_mix(i, seed * 100 + 89) % np.uint64(100)) == 0  # 1%: one of 20 stock captions
        words[stock] = np.stack([_mix(_mix(i[stock], 1) % np.uint64(20), 200 + w) % np.uint64(5000)
                                 for w in range(12)], axis=1)
        texts = [" ".join(r) for r in vocab[words.astype(np.int64)]]
        mh = minhash_signatures(texts, 128, 3)
        cols["text"] = pa.array(texts)
        cols["minhash"] = pa.ListArray.from_arrays(pa.array(np.arange(m + 1, dtype=np.int32) * 128),
                                                   pa.array(mh.ravel()))
    return pa.table({f.name: cols[f.name] for f in SIGNATURE_SCHEMA}, schema=SIGNATURE_SCHEMA)


def _binary(flat: np.ndarray, width: int) -> pa.Array:
    n = flat.size // width
    offsets = pa.py_buffer((np.arange(n + 1, dtype=np.int32) * width).tobytes())
    return pa.Array.from_buffers(pa.binary(), n, [None, offsets, pa.py_buffer(np.ascontiguousarray(flat).tobytes())])


def score_signatures(stage: str, start: int, end: int, seed: int) -> pa.Table:
    i = np.arange(start, end, dtype=np.uint64)
    m = i.size
    src = pa.array(np.array(SOURCES)[(i % np.uint64(len(SOURCES))).astype(np.int64)])
    key = pa.array([f"{x:012d}" for x in i.tolist()])
    h = _mix(i, seed * 100 + 95)
    score = (h % np.uint64(1_000_000)).astype(np.float64) / 1e6
    if stage.startswith("clip_filter"):
        from vila2_curate.curation.clip_filter import SIGNATURE_SCHEMA

        return pa.table({"source": src, "key": key, "image_index": pa.array(np.full(m, -1, np.int32)),
                         "shard": pa.array([f"{start:012d}"] * m), "group": src, "rule": pa.array(["clip_score"] * m),
                         "clip_score": pa.array(0.4 + 0.6 * score), "clip_similarity_vitb32": pa.nulls(m, pa.float64()),
                         "clip_similarity_vitl14": pa.nulls(m, pa.float64())}, schema=SIGNATURE_SCHEMA)
    from vila2_curate.curation.deltaloss import SIGNATURE_SCHEMA

    return pa.table({"source": src, "key": key, "image_index": pa.array(np.full(m, -1, np.int32)),
                     "subset": src, "delta_loss": pa.array(score * 4 - 2)}, schema=SIGNATURE_SCHEMA)


def signatures(stage: str, n: int, shard_rows: int, s: int, seed: int) -> pa.Table:
    start, end = shard_range(n, shard_rows, s)
    if stage.startswith("dedup"):
        return dedup_signatures(n, start, end, seed, captions=stage == "dedup_captions")
    return score_signatures(stage, start, end, seed)


def make_stage(name: str):
    from vila2_curate.schemas.config import ClipFilterConfig, DedupConfig, DeltaLossConfig

    if name == "dedup":
        from vila2_curate.curation.dedup.stage import DedupStage

        return DedupStage(DedupConfig(methods=["exact", "phash", "semantic"]))
    if name == "dedup_captions":
        from vila2_curate.curation.dedup.stage import DedupStage

        return DedupStage(DedupConfig(methods=["minhash_captions"]))
    method = "sketch" if name.endswith("_sketch") else "exact"
    if name.startswith("clip_filter"):
        from vila2_curate.curation.clip_filter import ClipFilterStage

        return ClipFilterStage(ClipFilterConfig(top_percent=95, method=method))
    from vila2_curate.curation.deltaloss import DeltaLossTopKStage

    return DeltaLossTopKStage(DeltaLossConfig(small_model="unused", large_model="unused", keep_fraction=0.9,
                                              method=method))


# ---- tasks (each in a fresh process) ----------------------------------------------------------------------
def _task(fn_args: tuple) -> dict[str, Any]:
    fn, args = fn_args
    t = time.perf_counter()
    out = fn(*args) or {}
    return {"seconds": time.perf_counter() - t, "peak_kib": _peak_kib(), **out}


def t_sample(stage_name: str, n: int, shard_rows: int, s: int, seed: int, work: str) -> dict[str, Any]:
    from vila2_curate.pipelines.engine.aggregate import with_shard

    sig = with_shard(signatures(stage_name, n, shard_rows, s, seed), shard_name(s))
    stage = make_stage(stage_name)
    t = time.process_time()
    pq.write_table(stage.sample(sig), f"{work}/sample/{s:05d}.parquet")
    return {"decide_s": time.process_time() - t}


def t_fit(stage_name: str, shards: int, work: str) -> dict[str, Any]:
    stage = make_stage(stage_name)
    t = time.process_time()
    stage.fit(pq.read_table(f"{work}/sample/{s:05d}.parquet") for s in range(shards))
    Path(f"{work}/stage.pkl").write_bytes(pickle.dumps(stage))
    return {"decide_s": time.process_time() - t}


def _load_stage(stage_name: str, work: str):
    p = Path(f"{work}/stage.pkl")
    return pickle.loads(p.read_bytes()) if p.exists() else make_stage(stage_name)


def t_partition(stage_name: str, n: int, shard_rows: int, s: int, seed: int, work: str, partitions: int) -> dict:
    from vila2_curate.pipelines.engine.aggregate import split_by_partition, with_shard

    sig = with_shard(signatures(stage_name, n, shard_rows, s, seed), shard_name(s))
    stage = _load_stage(stage_name, work)
    t = time.process_time()
    rows = stage.partition(sig)
    nbytes = rows.nbytes
    for p, part in split_by_partition(rows, partitions):
        pq.write_table(part, f"{work}/parts/{p:03d}/{s:05d}.parquet")
    return {"decide_s": time.process_time() - t, "shuffle_bytes": nbytes}


def t_decide_partition(stage_name: str, p: int, work: str) -> dict[str, Any]:
    stage = _load_stage(stage_name, work)
    t = time.process_time()
    folder = Path(f"{work}/parts/{p:03d}")
    files = sorted(folder.glob("*.parquet"))
    if not files:
        return {"decide_s": 0.0, "rows": 0}
    rows = pa.concat_tables([pq.read_table(f) for f in files])
    partial = stage.decide_partition(rows)
    pq.write_table(partial, f"{work}/partials/{p:03d}.parquet")
    return {"decide_s": time.process_time() - t, "rows": rows.num_rows}


def t_split_pending(stage_name: str, shards: int, work: str) -> dict[str, Any]:
    """Step 2b-a (pending candidates), the driver's part: holds the edges only, writes pending ones per a-shard."""
    from vila2_curate.pipelines.engine.aggregate import split_by_column
    from vila2_curate.schemas.stage import SHARD_COL

    stage = _load_stage(stage_name, work)
    t = time.process_time()
    pending = []
    for f in sorted(Path(f"{work}/partials").glob("*.parquet")):
        ready, q = stage.split_pending(pq.read_table(f))
        pq.write_table(ready, f"{work}/ready/{f.name}")
        if q.num_rows:
            pending.append(q)
    index = {shard_name(s): s for s in range(shards)}
    edges = pa.concat_tables(pending) if pending else None
    n = edges.num_rows if edges is not None else 0
    for name, part in split_by_column(edges, f"a_{SHARD_COL}") if edges is not None else []:
        pq.write_table(part, f"{work}/pending/a{index[name]:05d}.parquet")
    return {"decide_s": time.process_time() - t, "pending_edges": n}


def t_attach_a(stage_name: str, n: int, shard_rows: int, s: int, seed: int, work: str) -> dict[str, Any]:
    """Step 2b-b on shard s: a's payload attached, routed per b-shard."""
    from vila2_curate.pipelines.engine.aggregate import split_by_column, with_shard
    from vila2_curate.schemas.stage import SHARD_COL

    path = Path(f"{work}/pending/a{s:05d}.parquet")
    if not path.exists():
        return {"decide_s": 0.0}
    sig = with_shard(signatures(stage_name, n, shard_rows, s, seed), shard_name(s))
    stage = _load_stage(stage_name, work)
    t = time.process_time()
    half = stage.attach_pending(pq.read_table(path), sig, "a")
    index = {shard_name(x): x for x in range(-(-n // shard_rows))}
    for name, part in split_by_column(half, f"b_{SHARD_COL}"):
        pq.write_table(part, f"{work}/pending/a{s:05d}.b{index[name]:05d}.parquet")
    return {"decide_s": time.process_time() - t}


def t_confirm_b(stage_name: str, n: int, shard_rows: int, s: int, seed: int, work: str) -> dict[str, Any]:
    """Step 2b-c on shard s: b's payload attached, candidates confirmed."""
    from vila2_curate.pipelines.engine.aggregate import with_shard

    files = sorted(Path(f"{work}/pending").glob(f"a*.b{s:05d}.parquet"))
    if not files:
        return {"decide_s": 0.0}
    sig = with_shard(signatures(stage_name, n, shard_rows, s, seed), shard_name(s))
    stage = _load_stage(stage_name, work)
    t = time.process_time()
    half = pa.concat_tables([pq.read_table(f) for f in files])
    pq.write_table(stage.confirm_pending(stage.attach_pending(half, sig, "b")), f"{work}/ready/confirmed{s:05d}.parquet")
    return {"decide_s": time.process_time() - t}


def t_combine(stage_name: str, work: str) -> dict[str, Any]:
    stage = _load_stage(stage_name, work)
    t = time.process_time()
    folder = "ready" if Path(f"{work}/ready").exists() else "partials"
    partials = [pq.read_table(f) for f in sorted(Path(f"{work}/{folder}").glob("*.parquet"))]
    combined = stage.combine(partials)
    pq.write_table(combined, f"{work}/combined.parquet")
    return {"decide_s": time.process_time() - t, "edges_or_partials": sum(p.num_rows for p in partials),
            "combined_rows": combined.num_rows}


def t_shard_decisions(stage_name: str, n: int, shard_rows: int, s: int, seed: int, work: str) -> dict:
    from vila2_curate.pipelines.engine.aggregate import normalize_decisions, with_shard
    from vila2_curate.schemas.stage import SHARD_COL

    sig = with_shard(signatures(stage_name, n, shard_rows, s, seed), shard_name(s))
    stage = _load_stage(stage_name, work)
    t = time.process_time()
    schema = pq.read_schema(f"{work}/combined.parquet")
    if SHARD_COL in schema.names:
        mine = pq.read_table(f"{work}/combined.parquet", filters=[(SHARD_COL, "=", shard_name(s))])
    else:
        mine = pq.read_table(f"{work}/combined.parquet")
    pq.write_table(normalize_decisions(stage.shard_decisions(mine, sig)), f"{work}/decisions/{s:05d}.parquet")
    return {"decide_s": time.process_time() - t}


def t_single(stage_name: str, n: int, shard_rows: int, shards: int, seed: int, work: str) -> dict[str, Any]:
    from vila2_curate.pipelines.engine.aggregate import decide_local

    sig = pa.concat_tables([signatures(stage_name, n, shard_rows, s, seed) for s in range(shards)])
    _release_free_heap()  # generation's freed temporaries are not the reference's memory
    stage = make_stage(stage_name)
    t, wall = time.process_time(), time.perf_counter()
    decisions = decide_local(stage, sig)
    decide_s = time.process_time() - t
    wall = time.perf_counter() - wall
    pq.write_table(decisions, f"{work}/single.parquet")
    return {"decide_s": decide_s, "wall_s": wall}


def t_baseline(stage_name: str) -> dict[str, Any]:
    """A task process that only imports and builds the stage: the floor under every task's peak."""
    from vila2_curate.pipelines.engine.aggregate import with_shard  # noqa: F401 - the imports every task makes

    make_stage(stage_name)
    return {}


def _pool_run(pool_size: int, jobs: list[tuple]) -> list[dict[str, Any]]:
    ctx = mp.get_context("spawn")
    with ctx.Pool(pool_size, maxtasksperchild=1) as pool:
        return pool.map(_task, jobs, chunksize=1)


def _mib(kib: int) -> float:
    return round(kib / 1024, 1)


def run_partitioned(stage_name: str, n: int, shard_rows: int, shards: int, partitions: int, seed: int,
                    workers: int, work: str, from_partials: bool = False) -> dict[str, Any]:
    """Every step in its own process, ``combine`` in one; ``from_partials``: steps 2b-4 only, on the
    partials the engine path left in ``work/partials`` (the same edges through the single-process
    combine: the reference for the combine on the engine, without redoing steps 0-2)."""
    for d in ("sample", "partials", "decisions", *(f"parts/{p:03d}" for p in range(partitions))):
        os.makedirs(f"{work}/{d}", exist_ok=True)
    t0 = time.perf_counter()
    steps: dict[str, list[dict[str, Any]]] = {}
    from vila2_curate.schemas.stage import CombinesOnEngine

    stage = make_stage(stage_name)
    if stage.fits_on_sample and not from_partials:
        steps["sample"] = _pool_run(workers, [(t_sample, (stage_name, n, shard_rows, s, seed, work))
                                              for s in range(shards)])
        steps["fit"] = _pool_run(1, [(t_fit, (stage_name, shards, work))])
    if not from_partials:
        steps["partition"] = _pool_run(workers, [(t_partition, (stage_name, n, shard_rows, s, seed, work,
                                                                partitions)) for s in range(shards)])
        steps["decide_partition"] = _pool_run(workers, [(t_decide_partition, (stage_name, p, work))
                                                        for p in range(partitions)])
    if isinstance(stage, CombinesOnEngine):
        for d in ("ready", "pending"):
            os.makedirs(f"{work}/{d}", exist_ok=True)
        steps["split_pending"] = _pool_run(1, [(t_split_pending, (stage_name, shards, work))])
        steps["attach_a"] = _pool_run(workers, [(t_attach_a, (stage_name, n, shard_rows, s, seed, work))
                                                for s in range(shards)])
        steps["confirm_b"] = _pool_run(workers, [(t_confirm_b, (stage_name, n, shard_rows, s, seed, work))
                                                 for s in range(shards)])
    steps["combine"] = _pool_run(1, [(t_combine, (stage_name, work))])
    steps["shard_decisions"] = _pool_run(workers, [(t_shard_decisions, (stage_name, n, shard_rows, s, seed, work))
                                                   for s in range(shards)])
    wall = time.perf_counter() - t0
    baseline = _pool_run(1, [(t_baseline, (stage_name,))])[0]
    decide_s = sum(r["decide_s"] for rs in steps.values() for r in rs)
    peaks = {k: _mib(max(r["peak_kib"] for r in rs)) for k, rs in steps.items()}
    cpu = {k: round(sum(r["decide_s"] for r in rs), 2) for k, rs in steps.items()}
    parts = steps.get("decide_partition", [])
    return {"largest_process_peak_mib": max(max(peaks.values()), _mib(_peak_kib())),
            "peak_mib_by_step": peaks, "cpu_s_by_step": cpu, "driver_peak_mib": _mib(_peak_kib()),
            "process_baseline_mib": _mib(baseline["peak_kib"]),
            "decide_s": round(decide_s, 2), "us_per_row": round(1e6 * decide_s / n, 2), "wall_s": round(wall, 1),
            **({"largest_partition_rows": max(r.get("rows", 0) for r in parts),
                "shuffle_mib": round(sum(r["shuffle_bytes"] for r in steps["partition"]) / 2**20, 1)}
               if parts else {}),
            "combine_input_rows": steps["combine"][0]["edges_or_partials"],
            **({"pending_edges": steps["split_pending"][0]["pending_edges"]} if "split_pending" in steps else {})}


# ---- the partitioned path with step 3 on the engine (schemas.stage.CombinesOnEngine) ---------------------
def t_call(fn: Any, arg: Any) -> dict[str, Any]:
    """One engine task in a fresh process: ``fn(arg)``, its CPU seconds and result."""
    t = time.process_time()
    result = fn(arg)
    return {"decide_s": time.process_time() - t, "result": result}


def t_load_split(load: Any, item: Any, key: str, folder: str) -> dict[str, Any]:
    """The map side of a group-by: one shard's rows, one file per group value."""
    from vila2_curate.pipelines.engine.aggregate import split_by_key

    t = time.process_time()
    rows = load(item)
    if rows is not None and rows.num_rows:
        for value, part in split_by_key(rows, key):
            os.makedirs(f"{folder}/{value}", exist_ok=True)
            pq.write_table(part, f"{folder}/{value}/{item.index:06d}.parquet")
    return {"decide_s": time.process_time() - t}


def t_reduce(fn: Any, folder: str) -> dict[str, Any]:
    """The reduce side: one group's files, ``fn`` once."""
    t = time.process_time()
    rows = pa.concat_tables([pq.read_table(f) for f in sorted(Path(folder).glob("*.parquet"))])
    result = fn(rows)
    return {"decide_s": time.process_time() - t, "result": result, "rows": rows.num_rows}


class PoolEngine:
    """The runner's Engine primitives on a pool of fresh processes (one task per process, as a cluster
    worker runs it), so every task's peak memory is its own; a group-by goes through files, one per
    (group, shard). Records the largest process and the CPU seconds of each step."""

    def __init__(self, workers: int, partitions: int, work: str, keep_edges: str | None = None) -> None:
        self.workers, self.groups, self.work, self.keep_edges = workers, partitions, work, keep_edges
        self.steps: dict[str, list[dict[str, Any]]] = {}
        self.calls = 0

    @staticmethod
    def _name(obj: Any) -> str:
        return type(obj).__name__ + (f":{obj.phase}" if hasattr(obj, "phase") else "")

    def per_shard(self, ctx, items, fn) -> list[Any]:
        results = _pool_run(self.workers, [(t_call, (fn, it)) for it in items])
        self.steps.setdefault(self._name(fn), []).extend(results)
        return [r["result"] for r in results]

    def group_apply(self, ctx, items, load, key, fn) -> list[Any]:
        self.calls += 1
        folder = f"{self.work}/groups/{self.calls:04d}"
        maps = _pool_run(self.workers, [(t_load_split, (load, it, key, folder)) for it in items])
        self.steps.setdefault(self._name(load), []).extend(maps)
        groups = sorted(Path(folder).iterdir()) if Path(folder).exists() else []
        reduces = _pool_run(self.workers, [(t_reduce, (fn, str(g))) for g in groups]) if groups else []
        self.steps.setdefault(self._name(fn), []).extend(reduces)
        shutil.rmtree(folder, ignore_errors=True)
        if self.keep_edges and type(fn).__name__ == "EdgesToBuckets":  # step 2's edges, for the reference
            from vila2_curate.pipelines.engine.components import components_dir

            os.makedirs(f"{self.work}/partials", exist_ok=True)
            edges = sorted(Path(components_dir(ctx.root, 0), "edges").rglob("*.parquet"))
            for i, path in enumerate(edges):
                shutil.copy(path, f"{self.work}/partials/{i:06d}.parquet")
        return [r["result"] for r in reduces]

    def decide_groups(self, ctx) -> int:
        return self.groups


def t_write_signatures(stage_name: str, n: int, shard_rows: int, s: int, seed: int, root: str) -> dict[str, Any]:
    import fsspec

    from vila2_curate.pipelines.engine.workdir import write_signatures

    write_signatures(fsspec.filesystem("file"), root, 0, _bench_items(n, shard_rows)[s].shard,
                     [signatures(stage_name, n, shard_rows, s, seed)])
    return {"decide_s": 0.0}


def _bench_items(n: int, shard_rows: int) -> list[Any]:
    from vila2_curate.pipelines.engine.runner import WorkItem
    from vila2_curate.pipelines.io.readers.base import InputShard

    out = []
    for s in range(-(-n // shard_rows)):
        source, shard_id = shard_name(s).split("/")
        out.append(WorkItem(s, None, InputShard(source, shard_id, f"bench/{s}", "coyo_parquet", "pair")))
    return out


def run_on_engine(stage_name: str, n: int, shard_rows: int, shards: int, partitions: int, seed: int,
                  workers: int, work: str) -> dict[str, Any]:
    """The runner's own steps (``runner.decide_segment``'s partitioned path with
    ``components.combine_on_engine``) on ``PoolEngine``; decisions under ``work/run``."""
    import fsspec

    from vila2_curate.pipelines.engine.components import combine_on_engine
    from vila2_curate.pipelines.engine.group_size import decide_group_count, partition_bytes
    from vila2_curate.pipelines.engine.runner import (
        LoadSignatures,
        RunContext,
        ShardSignatures,
        fit_on_samples,
    )
    from vila2_curate.pipelines.engine.workdir import read_all_decisions

    root = f"{work}/run"
    _pool_run(workers, [(t_write_signatures, (stage_name, n, shard_rows, s, seed, root)) for s in range(shards)])
    fs, items = fsspec.filesystem("file"), _bench_items(n, shard_rows)
    ctx = RunContext(fs, root, None, None, items)
    engine = PoolEngine(workers, partitions, work, keep_edges=work)
    stage = make_stage(stage_name)
    _release_free_heap()
    t0, cpu0 = time.perf_counter(), time.process_time()
    peaks_driver: dict[str, float] = {}
    if stage.fits_on_sample:
        fit_on_samples(engine, ctx, 0, stage)
        peaks_driver["driver_fit"] = _mib(_peak_kib())
        _release_free_heap()
        _reset_peak()
    groups = decide_group_count(partitions, partition_bytes(fs, root, 0, stage, items))  # as the runner sizes them
    _, summary = combine_on_engine(engine, ctx, 0, "bench", stage, groups, ShardSignatures(fs, root, 0),
                                   LoadSignatures(fs, root, 0, stage, groups))
    wall, driver_cpu = time.perf_counter() - t0, time.process_time() - cpu0
    pq.write_table(read_all_decisions(fs, root, 0, [it.shard for it in items]), f"{work}/engine.parquet")
    baseline = _pool_run(1, [(t_baseline, (stage_name,))])[0]
    steps = engine.steps
    decide_s = sum(r["decide_s"] for rs in steps.values() for r in rs) + driver_cpu
    peaks = {k: _mib(max(r["peak_kib"] for r in rs)) for k, rs in steps.items() if rs}
    peaks.update(peaks_driver)
    peaks["driver_combine"] = _mib(_peak_kib())
    components = summary["components"]
    return {"decide_groups": groups, "largest_process_peak_mib": max(peaks.values()), "peak_mib_by_step": peaks,
            "cpu_s_by_step": {k: round(sum(r["decide_s"] for r in rs), 2) for k, rs in steps.items()},
            "process_baseline_mib": _mib(baseline["peak_kib"]), "decide_s": round(decide_s, 2),
            "us_per_row": round(1e6 * decide_s / n, 2), "wall_s": round(wall, 1),
            "edges": components["edges"], "rounds": components["rounds"],
            "largest_component": {p: v["largest"] for p, v in components["phases"].items()}}


def _sorted_decisions(table: pa.Table) -> pa.Table:
    return table.take(pc.sort_indices(table, sort_keys=[("source", "ascending"), ("key", "ascending"),
                                                        ("image_index", "ascending")]))


def _engine_or_partitioned(work: str) -> pa.Table:
    if Path(f"{work}/engine.parquet").exists():
        return pq.read_table(f"{work}/engine.parquet")
    return pa.concat_tables([pq.read_table(f) for f in sorted(Path(f"{work}/decisions").glob("*.parquet"))])


def compare_to_combine(work: str) -> bool:
    """Whether the engine's decisions equal those of the single-process ``combine`` on the same edges."""
    from vila2_curate.pipelines.engine.aggregate import normalize_decisions

    reference = _sorted_decisions(normalize_decisions(pa.concat_tables(
        [pq.read_table(f) for f in sorted(Path(f"{work}/decisions").glob("*.parquet"))])))
    return _sorted_decisions(normalize_decisions(pq.read_table(f"{work}/engine.parquet"))).equals(reference)


def compare(stage_name: str, work: str) -> dict[str, Any]:
    from vila2_curate.pipelines.engine.aggregate import normalize_decisions

    single = _sorted_decisions(pq.read_table(f"{work}/single.parquet"))
    part = _sorted_decisions(normalize_decisions(_engine_or_partitioned(work)))
    out: dict[str, Any] = {"decisions_single": single.num_rows, "decisions_partitioned": part.num_rows}
    if stage_name.endswith("_sketch"):
        from vila2_curate.curation.cutoffs import rank_error

        out["identical_decisions"] = single.equals(part)
        out["dropped_diff_rows"] = part.num_rows - single.num_rows
        out["stated_rank_error"] = round(rank_error(), 5)
        return out
    out["identical_decisions"] = single.equals(part)
    dropped = pc.sum(pc.is_valid(single.column("drop_reason"))).as_py()
    out["dropped"] = dropped
    return out


def child(args: argparse.Namespace) -> int:
    """One stage, one mode: prints one JSON object."""
    shards = -(-args.n // args.shard_rows)
    if args.child == "single":
        r = _pool_run(1, [(t_single, (args.stage, args.n, args.shard_rows, shards, args.seed, args.work))])[0]
        print(json.dumps({"largest_process_peak_mib": _mib(r["peak_kib"]), "decide_s": round(r["decide_s"], 2),
                          "us_per_row": round(1e6 * r["decide_s"] / args.n, 2), "wall_s": round(r["wall_s"], 1)}))
    elif args.child == "combine":  # the engine path's edges through the single-process combine (the reference)
        print(json.dumps(run_partitioned(args.stage, args.n, args.shard_rows, shards, args.partitions, args.seed,
                                         args.workers, args.work, from_partials=True)))
    else:
        from vila2_curate.schemas.stage import CombinesOnEngine

        run = run_on_engine if isinstance(make_stage(args.stage), CombinesOnEngine) else run_partitioned
        print(json.dumps(run(args.stage, args.n, args.shard_rows, shards, args.partitions, args.seed,
                             args.workers, args.work)))
    return 0


def _child_result(mode: str, proc: subprocess.Popen, work: str, line: dict[str, Any]) -> None:
    """Wait for a mode's child (its output goes to files: two children never block on a full pipe)."""
    proc.wait()
    out = (Path(f"{work}/{mode}.out").read_text().strip().splitlines() or [""])[-1]
    if proc.returncode != 0 or not out.startswith("{"):
        raise RuntimeError(f"{mode}: {Path(f'{work}/{mode}.err').read_text()[-2000:]}")
    line[mode] = json.loads(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200_000, help="rows (signatures) per stage")
    ap.add_argument("--partitions", type=int, default=16,
                    help="the fewest step-2 groups; dedup forms more when a group would pass the runner's "
                         "decide_group_mb (256 MiB of partition rows), as a run does")
    ap.add_argument("--shard-rows", type=int, default=62_500, help="rows per input shard")
    ap.add_argument("--workers", type=int, default=2, help="processes running tasks at once")
    ap.add_argument("--single-max-n", type=int, default=1_000_000,
                    help="skip the single-process reference above this N (dedup: ~5 KB/row)")
    ap.add_argument("--concurrent-modes", action="store_true",
                    help="run the single-process reference alongside the partitioned mode (less wall time; "
                         "us_per_row is CPU time of each task, so it stays comparable, wall_s does not)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", action="store_true",
                    help="keep each stage's work folder (signatures, edges, both sides' decisions) and print its path")
    ap.add_argument("--stages", nargs="*", default=STAGES, choices=STAGES)
    ap.add_argument("--child", choices=["single", "partitioned", "combine"], help=argparse.SUPPRESS)
    ap.add_argument("--stage", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args)
    rc = 0
    for name in args.stages:
        work = tempfile.mkdtemp(prefix=f"bench_scale_{name}_")
        line: dict[str, Any] = {"bench": "scale", "stage": name, "rows": args.n, "partitions": args.partitions,
                                "shard_rows": args.shard_rows, "workers": args.workers}
        try:
            from vila2_curate.schemas.stage import CombinesOnEngine

            on_engine = isinstance(make_stage(name), CombinesOnEngine)
            modes = (["partitioned"] + (["combine"] if on_engine else [])
                     + (["single"] if args.n <= args.single_max_n else []))
            line["modes_concurrent"] = args.concurrent_modes and len(modes) > 1
            procs = []
            for mode in modes:  # each mode in its own child: its own peak memory, nothing shared
                with open(f"{work}/{mode}.out", "w") as out, open(f"{work}/{mode}.err", "w") as err:
                    procs.append((mode, subprocess.Popen(
                        [sys.executable, __file__, "--child", mode, "--stage", name, "--work", work,
                         "--n", str(args.n), "--partitions", str(args.partitions),
                         "--shard-rows", str(args.shard_rows), "--workers", str(args.workers),
                         "--seed", str(args.seed)], stdout=out, stderr=err)))
                if not args.concurrent_modes or mode == "partitioned" and on_engine:  # combine reads its edges
                    _child_result(*procs[-1], work, line)
            if args.concurrent_modes:
                for mode, proc in procs:
                    if mode not in line:
                        _child_result(mode, proc, work, line)
            if on_engine:  # the same edges through the single-process combine
                line["identical_to_combine"] = compare_to_combine(work)
            if "single" in line:
                line.update(compare(name, work))
            elif on_engine:
                line["identical_decisions"] = line["identical_to_combine"]
                line["single_skipped"] = f"N > --single-max-n {args.single_max_n}; compared with the combine"
            else:
                line["identical_decisions"] = None
                line["single_skipped"] = f"N > --single-max-n {args.single_max_n}"
        except Exception as e:  # noqa: BLE001 - report the failing stage and go on with the others
            line["error"] = str(e)[-2000:]
            rc = 1
        finally:
            if args.keep:
                line["work"] = work
            else:
                shutil.rmtree(work, ignore_errors=True)
        print(json.dumps(line), flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
