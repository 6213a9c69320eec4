"""Ray job entry point for recaption rounds (and any other config) on a Ray cluster.

    ray job submit --working-dir . -- python pipelines/recaption.py --config configs/recaption.yaml --round 1

Inside ``ray job submit`` the job connects to its cluster (RAY_ADDRESS is set by Ray); run directly, it
connects to RAY_ADDRESS or ``--address``, or starts a local cluster when there is none. GPU stages run as
actor pools sized and placed by each stage's ``runtime`` (``gpus`` may be fractional, so the OCR,
grounding and spatial specialists can share one GPU). Finished input shards are skipped on a rerun.

The job's Python needs the project installed (README, Engines); where it is not, the job ends with one
``error:`` line giving the two ways to fix that, not a traceback. So this file imports nothing of the
project at module level, and ``pipelines.cli`` reuses ``missing_install_message`` for Ray workers.
"""

from __future__ import annotations

import argparse
import json
import sys

INSTALL_FIX = ("install it in the cluster's image (pip install \"vila2-curate[ray]\", or pip install \".[ray]\" from "
               "this checkout, on every node) or ship the wheel with the job: pip wheel --no-deps -w dist . && "
               "ray job submit --working-dir . --runtime-env-json "
               "'{\"py_modules\": [\"dist/vila2_curate-<version>-py3-none-any.whl\"]}' -- python pipelines/recaption.py ...")


def is_missing_project(e: BaseException) -> bool:
    """A ModuleNotFoundError for the project itself (``vila2_curate`` or one of its subpackages)."""
    return isinstance(e, ModuleNotFoundError) and (e.name or "").split(".")[0] == "vila2_curate"


def missing_install_message(python: str, missing: str = "vila2_curate") -> str:
    """One line for a Python that cannot import the project; ``missing`` is the module it did not find."""
    detail = "" if missing == "vila2_curate" else f" (no module named {missing!r})"
    return f"vila2_curate is not installed in {python}{detail}: {INSTALL_FIX}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="YAML run config")
    ap.add_argument("--round", type=int, help="recaption round K (fills {round}/{prev_round} in paths)")
    ap.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local cluster)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("-v", "--verbose", action="store_true", help="print the traceback of an error")
    args = ap.parse_args(argv)
    try:
        from vila2_curate.pipelines.executors.ray_data import ensure_ray, run_ray
        from vila2_curate.schemas.config import load_config
    except ModuleNotFoundError as e:
        if not is_missing_project(e):
            raise
        where = f"this Python ({sys.executable})"
        print(f"error: {missing_install_message(where, str(e.name))}", file=sys.stderr)
        return 2
    try:
        config = load_config(args.config, {"engine": "ray"}, round=args.round)
        ensure_ray(args.address or config.ray.address)
        stats = run_ray(config, progress=not args.no_progress)
    except Exception as e:  # noqa: BLE001 - the CLI's rule: one `error:` line, exit 2 for config/source errors
        import traceback

        from vila2_curate.pipelines.cli import describe_error

        code, message = describe_error(e)
        if args.verbose:
            traceback.print_exc()
        print(f"error: {message}", file=sys.stderr)
        return code
    from vila2_curate.pipelines.engine.health import warning_lines

    for line in warning_lines(stats, config.sources):
        print(line, file=sys.stderr)
    total = stats["total"]
    print(json.dumps({"output": config.output.path, "round": args.round, "balanced": stats["balanced"],
                      **{k: total[k] for k in ("rows_in", "kept", "dropped", "quarantined")}}))
    return 0 if stats["balanced"] else 3


if __name__ == "__main__":
    sys.exit(main())
