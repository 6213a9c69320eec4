"""What the intermediate files between global segments cost: ``_work/`` against the input it came from.

Writes the offline sample, runs the quickstart curation (three global segments: dedup, clip_filter,
deltaloss) on the local engine while a thread samples ``_work/`` every 20 ms, and prints one JSON line:
input bytes (the sample without its demo models), ``_work`` bytes at the end and at its peak (file bytes,
and ``du -sb``-style with directory entries), the ratios to the input (target <= 0.05 at the end), and
per segment the bytes per row of the saved rows and signatures (the I/O a segment adds besides re-reading
its input shard).

    python benchmarks/bench_workdir.py [--dir /tmp/bench-workdir]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

from _common import ROOT, report

from vila2_curate.pipelines.demo.models import build_demo_models
from vila2_curate.pipelines.demo.sample import write_sample
from vila2_curate.pipelines.executors.local import run_local
from vila2_curate.schemas.config import load_config


def _file_sizes(root: Path) -> dict[str, int]:
    out = {}
    for dirpath, _, names in os.walk(root):
        for n in names:
            with contextlib.suppress(OSError):  # renamed or removed while we looked
                out[os.path.join(dirpath, n)] = os.path.getsize(os.path.join(dirpath, n))
    return out


def _du(path: Path) -> int:
    return int(subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True, check=True).stdout.split()[0])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default=None, help="work folder (default: a temporary one, removed after)")
    args = ap.parse_args()
    base = Path(args.dir or tempfile.mkdtemp(prefix="bench-workdir-"))
    sample = base / "sample"
    if not sample.exists():
        write_sample(str(sample), seed=0)
        build_demo_models(str(sample / "models"), seed=0)
    cfg_text = (ROOT / "configs" / "quickstart.yaml").read_text().replace("../sample", str(sample))
    cfg_text = cfg_text.replace("../out/quickstart/r0", str(base / "out"))
    (base / "quickstart.yaml").write_text(cfg_text)
    shutil.rmtree(base / "out", ignore_errors=True)
    work = base / "out" / "_work"

    peak = {"bytes": 0}
    largest: dict[str, int] = {}  # every file's largest size seen (rows files are removed when spent)
    stop = threading.Event()

    def sample_work() -> None:
        while not stop.wait(0.02):
            sizes = _file_sizes(work) if work.exists() else {}
            peak["bytes"] = max(peak["bytes"], sum(sizes.values()))
            for k, v in sizes.items():
                largest[k] = max(largest.get(k, 0), v)

    t = threading.Thread(target=sample_work, daemon=True)
    t.start()
    stats = run_local(load_config(base / "quickstart.yaml"), progress=False)
    stop.set()
    t.join()
    input_bytes = sum(_file_sizes(sample).values()) - sum(_file_sizes(sample / "models").values())
    final = sum(_file_sizes(work).values())
    per_segment: dict[str, dict[str, float]] = {}
    for path, size in largest.items():
        m = re.search(r"seg(\d+)/.*\.(rows|sig)\.parquet$", path)
        if m:
            acc = per_segment.setdefault(f"seg{m.group(1)}", {"rows": 0, "sig": 0})
            acc[m.group(2)] += size
    rows_in = stats["total"]["rows_in"]
    report("workdir_vs_input", rows=rows_in, input_bytes=input_bytes, input_du_sb=_du(sample) - _du(sample / "models"),
           work_final_bytes=final, work_final_du_sb=_du(work), work_peak_bytes=peak["bytes"],
           final_ratio=round(final / input_bytes, 4), peak_ratio=round(peak["bytes"] / input_bytes, 4),
           target_final_ratio=0.05,
           saved_bytes_per_row={seg: {k: round(v / rows_in, 1) for k, v in acc.items()}
                                for seg, acc in sorted(per_segment.items())})
    if args.dir is None:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
