"""The whole CPU curation per engine on generated img2dataset shards: ms per image per stage, the map
side against a bare loop over the same tars, ``_work/`` at its peak, bytes written and read per input
byte, wall time and the largest process.

The input is ``--n`` photo-like JPEGs (``_common.distinct_photo_jpeg``, default 1280x720) with planted exact
copies (3%) and near copies (3%: re-encoded, resized, cropped), 1% failed downloads (parquet rows only) and
1% empty captions, written as img2dataset WebDataset shards (tar + parquet + ``_stats.json``) and cached
under ``--dir``. The recipe is the quickstart's without model stages: normalize -> caption_hygiene ->
dedup (the quickstart's dedup settings); ``--models`` adds its clipscore, clip_filter and deltaloss stages
on the demo models.

Each engine runs in a child process on paths of a ``counting://`` filesystem (``_common.CountingFileSystem``:
a LocalFileSystem whose files count the bytes through them, by input / ``_work`` / output; every process,
Ray workers included, writes its counts to ``$BENCH_FS_COUNTS`` at each file close; parquet is read
through fsspec as on S3, so Arrow's own local reads do not escape the count), while this process samples
the size of ``_work/`` and the RSS and CPU time of the child and its descendants every 0.2 s.

Per stage, ``stage_ms_per_image`` is the run's ``timings.json`` (wall seconds inside each stage, summed over
tasks) per input image; ``map_ms_per_image`` = read + normalize + dedup_signatures. The bare loop (tar
read + sha256 + draft JPEG decode + ``imagehash.phash``) runs on the same tars just before and just after
each engine, timed the same way (wall; the faster run counts, so other load on a shared machine can only
make ``map_vs_bare`` look worse, never meet its target by accident), in as many processes at once as the
engine runs map tasks (Ray: one per CPU; ``map_vs_bare_one_process`` is against the one-process loop).
``map_cpu_vs_bare_cpu`` compares CPU time instead (timings.json's ``cpu_seconds``, the process CPU of
each step, against the loop's): what the map side computes, whatever else shares the cores (on Ray its
own raylet, GCS and driver, which stretch the workers' wall time). One JSON line per engine, then
``ray_vs_local_wall`` when both ran. Targets (printed beside each figure): map_vs_bare <= 1.5, ``_work``
peak <= 0.05 of the input, bytes written per input byte <= 1.1 x published bytes per input byte, Ray wall
<= 1.2 x local.

    python benchmarks/bench_pipeline.py [--n 20000] [--shards 8] [--size 1280x720] [--engines local ray]
                                        [--models] [--batch-size 256] [--dir /tmp/vila2-bench-pipeline]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from multiprocessing import Pool
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from _common import (
    COUNTS_ENV,
    PROTOCOL,
    ROOT,
    ROOTS_ENV,
    distinct_photo_jpeg,
    install_counting_fs,
    process_counts,
    report,
)
from PIL import Image

BENCH_DIR = str(Path(__file__).resolve().parent)
MAP_STAGES = ("read", "normalize", "dedup_signatures")
EXACT_SHARE, NEAR_SHARE, FAILED_SHARE, EMPTY_CAPTION_SHARE = 0.03, 0.03, 0.01, 0.01
_WORDS = ("sunset", "hills", "forest", "path", "lake", "dawn", "city", "skyline", "night", "beach", "waves",
          "field", "flowers", "mountain", "peak", "fog", "valley", "bridge", "desert", "dunes", "street",
          "rain", "reflections", "lavender", "summer", "winter", "market", "harbour", "boats", "garden",
          "old", "stone", "bright", "quiet", "morning", "evening", "golden", "misty", "green", "blue")


def _ray_worker_setup() -> None:
    """Ray's worker_process_setup_hook, pickled by value: makes ``_common`` importable (the driver's
    counting filesystem is pickled by reference to it) and registers ``counting://`` in the worker."""
    if BENCH_DIR not in sys.path:
        sys.path.insert(0, BENCH_DIR)
    from _common import install_counting_fs as install

    install()


# ---- the input ------------------------------------------------------------------------------------------
def _picture(seed: int, index: int, size: tuple[int, int]) -> bytes:
    return distinct_photo_jpeg(seed * 1_000_003 + index, size)


def _near_copy(data: bytes, how: str) -> bytes:
    img = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = img.size
    if how == "resize":
        img, quality = img.resize((w * 3 // 4, h * 3 // 4), Image.Resampling.BICUBIC), 85
    elif how == "crop":
        img, quality = img.crop((w // 50, h // 50, w - w // 50, h - h // 50)), 85
    else:
        quality = 65
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _plan(n: int, seed: int) -> list[tuple[str, int]]:
    """Per image: ("unique", -1), ("exact", j) or ("near:<how>", j) with j an earlier unique image."""
    rng = np.random.default_rng(seed)
    plan: list[tuple[str, int]] = []
    uniques: list[int] = []
    for i in range(n):
        r = rng.random()
        if uniques and r < EXACT_SHARE:
            plan.append(("exact", uniques[int(rng.integers(len(uniques)))]))
        elif uniques and r < EXACT_SHARE + NEAR_SHARE:
            how = ("reencode", "resize", "crop")[int(rng.integers(3))]
            plan.append((f"near:{how}", uniques[int(rng.integers(len(uniques)))]))
        else:
            plan.append(("unique", -1))
            uniques.append(i)
    return plan


def _write_shard(job: tuple[Path, int, list[int], list[tuple[str, int]], tuple[int, int], int, int]) -> None:
    """One img2dataset shard: ``{id}.tar`` (jpg/json/txt per sample), ``{id}.parquet`` (every row, failed
    downloads too) and ``{id}_stats.json``, as ``img2dataset --output_format webdataset`` writes them."""
    import pyarrow as pa

    from vila2_curate.pipelines.demo.img2dataset import write_parquet

    folder, shard_id, indices, plan, size, seed, oom = job
    rng = np.random.default_rng(seed * 7919 + shard_id)
    metas, status = [], {"success": 0, "failed_to_download": 0}
    tar_path = folder / f"{shard_id:05d}.tar"
    with tar_path.open("wb") as fh, tarfile.open(fileobj=fh, mode="w|") as tar:
        for n, i in enumerate(indices):
            kind, j = plan[i]
            key = f"{10**oom * shard_id + n:0{oom + 5}d}"
            words = [_WORDS[int(w)] for w in rng.integers(len(_WORDS), size=int(rng.integers(5, 12)))]
            caption = "" if rng.random() < EMPTY_CAPTION_SHARE else " ".join(words).capitalize() + f" {i}"
            meta = {"caption": caption, "url": f"https://img.example-{i % 7}.com/{i}.jpg", "key": key,
                    "status": "success", "error_message": None, "width": size[0], "height": size[1]}
            if rng.random() < FAILED_SHARE:
                meta.update(status="failed_to_download", error_message="HTTP Error 404: Not Found",
                            width=None, height=None)
                status["failed_to_download"] += 1
                metas.append(meta)
                continue
            data = _picture(seed, i if kind == "unique" else j, size)
            if kind.startswith("near:"):
                data = _near_copy(data, kind.split(":", 1)[1])
            for ext, payload in (("jpg", data), ("json", json.dumps(meta, indent=4).encode()),
                                 ("txt", caption.encode())):
                ti = tarfile.TarInfo(f"{key}.{ext}")
                ti.size, ti.mtime, ti.mode, ti.uname, ti.gname = len(payload), 1_700_000_000.0 + n, 0o444, "bigdata", "bigdata"
                tar.addfile(ti, io.BytesIO(payload))
            status["success"] += 1
            metas.append(meta)
    schema = pa.schema([("caption", pa.string()), ("url", pa.string()), ("key", pa.string()),
                        ("status", pa.string()), ("error_message", pa.string()), ("width", pa.int32()),
                        ("height", pa.int32())])
    write_parquet(folder / f"{shard_id:05d}.parquet", metas, schema, row_group_size=1000)
    stats = {"count": len(metas), "successes": status["success"], "failed_to_download": status["failed_to_download"],
             "failed_to_resize": 0, "status_dict": {k: v for k, v in status.items() if v}}
    (folder / f"{shard_id:05d}_stats.json").write_text(json.dumps(stats, indent=4))


def make_input(folder: Path, n: int, shards: int, size: tuple[int, int], seed: int = 0) -> dict[str, Any]:
    """Write the input once per (n, shards, size, seed); returns its planted-duplicate counts."""
    done = folder / "_done.json"
    if done.exists():
        return json.loads(done.read_text())
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    plan = _plan(n, seed)
    per = -(-n // shards)
    oom = max(4, len(str(per)))
    jobs = [(folder, s, list(range(s * per, min(n, (s + 1) * per))), plan, size, seed, oom) for s in range(shards)]
    with Pool(min(shards, os.cpu_count() or 1)) as pool:
        pool.map(_write_shard, jobs, chunksize=1)
    info = {"images_planned": n, "exact_copies": sum(k == "exact" for k, _ in plan),
            "near_copies": sum(k.startswith("near") for k, _ in plan)}
    done.write_text(json.dumps(info))
    return info


# ---- the bare loop ----------------------------------------------------------------------------------------
def bare_loop(tars: list[Path]) -> dict[str, float]:
    """read + sha256 + draft JPEG decode + imagehash.phash per image of the tars: wall and CPU ms/image."""
    import imagehash

    images, wall, cpu = 0, time.perf_counter(), time.process_time()
    for path in tars:
        with tarfile.open(path, mode="r|") as tar:
            for member in tar:
                if not member.name.endswith(".jpg"):
                    continue
                data = tar.extractfile(member).read()
                hashlib.sha256(data).hexdigest()
                img = Image.open(io.BytesIO(data))
                img.draft("RGB", (128, 128))
                img.load()
                imagehash.phash(img)
                images += 1
    return {"images": images, "ms": (time.perf_counter() - wall) * 1e3 / images,
            "cpu_ms": (time.process_time() - cpu) * 1e3 / images}


def bare_loop_at(tars: list[Path], processes: int) -> dict[str, float]:
    """The bare loop in ``processes`` processes at once (the engine's own concurrency: Ray runs a map task
    per CPU), ms/image summed over the processes as timings.json sums a stage's seconds over its tasks, so
    the ratio compares like with like: both sides share the cores the same way."""
    if processes <= 1:
        return bare_loop(tars)
    with Pool(processes) as pool:
        parts = pool.map(bare_loop, [tars[i::processes] for i in range(processes)])
    images = sum(p["images"] for p in parts)
    return {"images": images, "ms": sum(p["ms"] * p["images"] for p in parts) / images,
            "cpu_ms": sum(p["cpu_ms"] * p["images"] for p in parts) / images}


# ---- one engine ---------------------------------------------------------------------------------------
def _stages(models: dict[str, str] | None) -> list[dict[str, Any]]:
    """The quickstart's stages: normalize, caption_hygiene, dedup (+ its model stages on demo models)."""
    quick = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())["stages"]
    keep = {"normalize", "caption_hygiene", "dedup"} | ({"clipscore", "clip_filter", "deltaloss"} if models else set())
    out = []
    for st in quick:
        if st["type"] not in keep:
            continue
        st = dict(st)
        if models and st["type"] == "clipscore":
            st["model"] = models["clip"]
        if models and st["type"] == "deltaloss":
            st["small_model"], st["large_model"] = models["lm_small"], models["lm_large"]
        out.append(st)
    return out


def _dir_bytes(root: Path, skip: str | None = None) -> int:
    total = 0
    for dirpath, dirnames, names in os.walk(root):
        if skip is not None and skip in dirnames:
            dirnames.remove(skip)
        for name in names:
            with contextlib.suppress(OSError):  # renamed or removed while we looked
                total += os.path.getsize(os.path.join(dirpath, name))
    return total


class _Sampler(threading.Thread):
    """Every 0.2 s: the size of ``_work/``, and the RSS and CPU time of the child and each of its
    descendants (CPU of a process that ends between two samples is short by at most 0.2 s)."""

    def __init__(self, work: Path, pid: int) -> None:
        super().__init__(daemon=True)
        import psutil

        self.work, self.proc, self.stop = work, psutil.Process(pid), threading.Event()
        self.work_peak = 0
        self.largest: tuple[int, str] = (0, "")
        self.total_peak = 0
        self.cpu: dict[int, float] = {}  # pid -> user + system seconds when last seen

    def run(self) -> None:
        import psutil

        while not self.stop.wait(0.2):
            self.work_peak = max(self.work_peak, _dir_bytes(self.work))
            try:
                procs = [self.proc, *self.proc.children(recursive=True)]
            except psutil.Error:
                continue
            total = 0
            for p in procs:
                with contextlib.suppress(psutil.Error):
                    times = p.cpu_times()
                    self.cpu[p.pid] = times.user + times.system
                    rss = p.memory_info().rss
                    total += rss
                    if rss > self.largest[0]:
                        self.largest = (rss, " ".join(p.cmdline()[:2])[:80] if p.pid != self.proc.pid else "engine driver")
            self.total_peak = max(self.total_peak, total)


def run_child(spec_path: str) -> None:
    """In the child: count I/O, run the engine on the config, write wall time and ru_maxrss."""
    spec = json.loads(Path(spec_path).read_text())
    os.environ[COUNTS_ENV], os.environ[ROOTS_ENV] = spec["counts"], json.dumps(spec["roots"])
    os.environ.pop("RAY_ADDRESS", None)
    install_counting_fs()
    from vila2_curate.pipelines.cli import run
    from vila2_curate.schemas.config import RunConfig

    config = RunConfig.model_validate(spec["config"])
    if config.engine == "ray":
        import ray

        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, runtime_env={
            "env_vars": {COUNTS_ENV: spec["counts"], ROOTS_ENV: json.dumps(spec["roots"])},
            "worker_process_setup_hook": _ray_worker_setup})
    t = time.perf_counter()
    run(config, progress=False)
    wall = time.perf_counter() - t
    process_counts().flush()
    Path(spec["result"]).write_text(json.dumps({
        "wall_s": wall, "driver_max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
    if config.engine == "ray":
        import ray

        ray.shutdown()


def run_engine_bench(engine: str, args: argparse.Namespace, input_dir: Path, planted: dict[str, Any],
                     models: dict[str, str] | None) -> dict[str, Any]:
    base = Path(args.dir)
    out, counts = base / f"out-{engine}", base / f"counts-{engine}"
    for d in (out, counts):
        shutil.rmtree(d, ignore_errors=True)
    counts.mkdir(parents=True)
    tars = sorted(input_dir.glob("*.tar"))
    processes = (os.cpu_count() or 1) if engine == "ray" else 1  # the map tasks the engine runs at once
    bares = [bare_loop_at(tars, processes)]  # and once more after the engine: the faster one counts
    config = {"name": "bench_pipeline", "engine": engine, "batch_size": args.batch_size,
              "sources": [{"name": "crawl", "kind": "img2dataset", "paths": [f"{PROTOCOL}://{input_dir}/*.tar"]}],
              "stages": _stages(models), "output": {"path": f"{PROTOCOL}://{out}"}}
    spec = {"config": config, "counts": str(counts), "result": str(base / f"result-{engine}.json"),
            "roots": {"input": str(input_dir), "work": str(out / "_work"), "output": str(out)}}
    spec_path = base / f"spec-{engine}.json"
    spec_path.write_text(json.dumps(spec))
    Path(spec["result"]).unlink(missing_ok=True)
    log = base / f"log-{engine}.txt"
    t = time.perf_counter()
    with log.open("w") as lf:
        child = subprocess.Popen([sys.executable, __file__, "--child", str(spec_path)], stdout=lf, stderr=lf,
                                 cwd=str(base))
        sampler = _Sampler(out / "_work", child.pid)
        sampler.start()
        rc = child.wait()
        sampler.stop.set()
        sampler.join()
    wall_outer = time.perf_counter() - t
    if not Path(spec["result"]).exists():
        raise RuntimeError(f"{engine} run failed (exit {rc}); see {log}:\n" + log.read_text()[-3000:])
    bares.append(bare_loop_at(tars, processes))
    bare = min(bares, key=lambda b: b["ms"])
    serial = bare if processes == 1 else bare_loop(tars)
    result = json.loads(Path(spec["result"]).read_text())
    read: dict[str, int] = {}
    written: dict[str, int] = {}
    for f in counts.glob("*.json"):
        c = json.loads(f.read_text())
        for table, acc in ((c["read"], read), (c["written"], written)):
            for k, v in table.items():
                acc[k] = acc.get(k, 0) + v
    input_bytes = _dir_bytes(input_dir)
    published = _dir_bytes(out, skip="_work")
    timings = json.loads((out / "timings.json").read_text())["stages"]
    images = bares[0]["images"]
    stage_ms = {name: round(t["seconds"] * 1e3 / images, 3) for name, t in sorted(timings.items())}
    stage_cpu_ms = {name: round(t.get("cpu_seconds", 0.0) * 1e3 / images, 3) for name, t in sorted(timings.items())}
    map_ms = sum(stage_ms.get(s, 0.0) for s in MAP_STAGES)
    map_cpu_ms = sum(stage_cpu_ms.get(s, 0.0) for s in MAP_STAGES)
    stats = json.loads((out / "stats.json").read_text())["total"]
    written_total, read_total = sum(written.values()), sum(read.values())
    fields = {
        "engine": engine, "images": images, "rows_in": stats["kept"] + stats["dropped"] + stats["quarantined"],
        "shards": len(tars), "size": args.size, "models": bool(models), "input_bytes": input_bytes,
        "wall_s": round(result["wall_s"], 2), "wall_s_with_start": round(wall_outer, 2), "exit_code": rc,
        "stage_ms_per_image": stage_ms, "stage_cpu_ms_per_image": stage_cpu_ms,
        "map_cpu_ms_per_image": round(map_cpu_ms, 3), "map_cpu_vs_bare_cpu": round(map_cpu_ms / bare["cpu_ms"], 2),
        "map_ms_per_image": round(map_ms, 3), "bare_ms_per_image": round(bare["ms"], 3),
        "bare_cpu_ms_per_image": round(bare["cpu_ms"], 3), "bare_ms_before_after": [round(b["ms"], 3) for b in bares],
        "bare_processes": processes, "map_vs_bare": round(map_ms / bare["ms"], 2), "map_vs_bare_target": 1.5,
        "map_vs_bare_one_process": round(map_ms / serial["ms"], 2),
        "work_peak_bytes": sampler.work_peak, "work_peak_vs_input": round(sampler.work_peak / input_bytes, 4),
        "work_peak_target": 0.05,
        "written_bytes": written, "written_per_input_byte": round(written_total / input_bytes, 3),
        "published_bytes": published, "published_per_input_byte": round(published / input_bytes, 3),
        "written_per_input_target": round(1.1 * published / input_bytes, 3),
        "read_bytes": read, "read_per_input_byte": round(read_total / input_bytes, 3),
        "driver_max_rss_mib": round(result["driver_max_rss_mib"], 1),
        "largest_process_rss_mib": round(sampler.largest[0] / 2**20, 1), "largest_process": sampler.largest[1],
        "all_processes_rss_peak_mib": round(sampler.total_peak / 2**20, 1),
        "cpu_ms_per_image_all_processes": round(sum(sampler.cpu.values()) * 1e3 / images, 3),
        "kept": stats["kept"], "dropped": stats["dropped"], "quarantined": stats["quarantined"],
        "reasons": stats.get("reasons", {}), "planted": planted,
    }
    fields["targets_met"] = {
        "map_vs_bare": fields["map_vs_bare"] <= 1.5, "map_cpu_vs_bare_cpu": fields["map_cpu_vs_bare_cpu"] <= 1.5,
        "work_peak": fields["work_peak_vs_input"] <= 0.05,
        "written": fields["written_per_input_byte"] <= fields["written_per_input_target"]}
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    return fields


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=20_000, help="images in the tars")
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--size", default="1280x720")
    ap.add_argument("--engines", nargs="+", default=["local", "ray"], choices=["local", "ray", "beam"])
    ap.add_argument("--models", action="store_true", help="add clipscore, clip_filter and deltaloss (demo models)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--dir", default="/tmp/vila2-bench-pipeline", help="input cache, outputs, logs")
    ap.add_argument("--keep", action="store_true", help="keep each engine's output folder")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        run_child(args.child)
        return
    size = tuple(int(v) for v in args.size.lower().split("x"))
    base = Path(args.dir)
    base.mkdir(parents=True, exist_ok=True)
    input_dir = base / f"input-n{args.n}-s{args.shards}-{args.size}"
    t = time.perf_counter()
    planted = make_input(input_dir, args.n, args.shards, size)
    print(f"input ready in {time.perf_counter() - t:.0f} s: {input_dir}", file=sys.stderr)
    models = None
    if args.models:
        from vila2_curate.pipelines.demo.models import build_demo_models

        models_dir = base / "models"
        marker = models_dir / "_paths.json"
        if not marker.exists():
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(json.dumps(build_demo_models(models_dir)))
        models = json.loads(marker.read_text())
    walls: dict[str, float] = {}
    for engine in args.engines:
        fields = run_engine_bench(engine, args, input_dir, planted, models)
        walls[engine] = fields["wall_s"]
        report("pipeline", **fields)
    if "ray" in walls and "local" in walls:
        report("pipeline_ray_vs_local", ray_vs_local_wall=round(walls["ray"] / walls["local"], 2), target=1.2,
               target_met=walls["ray"] / walls["local"] <= 1.2, images=args.n, local_wall_s=walls["local"],
               ray_wall_s=walls["ray"])


if __name__ == "__main__":
    main()
