"""The GPU check: each model stage at real size, through the project's own stage code, against its bare
model on the same batches. One JSON line per stage on stdout and all of them in OUT/gpu_check.json.

    python benchmarks/gpu/run_gpu_check.py OUT                    # a GPU node: full-size random models, bf16
    python benchmarks/gpu/run_gpu_check.py OUT --device cpu --tiny  # CI: the tests' tiny demo models

On a node without the project installed it first installs the brought wheels (benchmarks/gpu/wheels/,
see fetch_wheels.sh) and the project into a venv over the node's packages, offline, and re-runs itself
there (gpucheck/bootstrap.py). README.md, "GPU check", says what each figure means.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

for _key, _value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"),
                     ("TOKENIZERS_PARALLELISM", "false"), ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
                     ("TRANSFORMERS_VERBOSITY", "error")):
    os.environ.setdefault(_key, _value)

from gpucheck import bootstrap  # noqa: E402 - the environment above first; stdlib only
from gpucheck.run import STAGES  # noqa: E402 - stdlib only at import time


def _size(text: str) -> tuple[int, int]:
    w, h = text.lower().split("x")
    return int(w), int(h)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="folder for gpu_check.json")
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    ap.add_argument("--tiny", action="store_true", help="the tests' tiny demo models, not full-size ones")
    ap.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    ap.add_argument("--budget-s", type=float, default=420.0,
                    help="seconds for all stages (sweep points that would not fit are skipped)")
    ap.add_argument("--image-size", type=_size, default=None, help="WxH of the synthetic JPEGs "
                    "(default 1280x720; 320x240 with --tiny)")
    ap.add_argument("--new-tokens", type=int, default=None, help="tokens per caption (default 128; 8 tiny)")
    ap.add_argument("--cpus", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                    help="decode/prepare threads per model stage (runtime.cpus)")
    ap.add_argument("--rows-per-batch", type=int, default=None,
                    help="the engine's batch (RunConfig.batch_size; default 2048 on GPU, 256 tiny)")
    ap.add_argument("--wheels", type=Path, default=Path(__file__).resolve().parent / "wheels")
    ap.add_argument("--venv", type=Path, default=None, help="where to make the venv (default: a temp dir)")
    ap.add_argument("--no-install", action="store_true", help="never install; fail if imports are missing")
    args = ap.parse_args(argv)
    args.image_size = args.image_size or ((320, 240) if args.tiny else (1280, 720))
    args.new_tokens = args.new_tokens or (8 if args.tiny else 128)
    args.rows_per_batch = args.rows_per_batch or (256 if args.tiny else 2048)
    return args


def main() -> int:
    args = parse()
    if not args.no_install:
        bootstrap.ensure(args.wheels, args.venv)
    from gpucheck import run

    return run.main(args)


if __name__ == "__main__":
    sys.exit(main())
