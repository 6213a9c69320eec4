"""vila2-curate command line: run, sample, validate, report.

Flags map one to one onto the functions they call (img2dataset's convention), so everything the CLI
does is reachable from Python too.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import traceback
from pathlib import Path

from vila2_curate.schemas.config import ConfigError, load_config


def _cmd_run(args: argparse.Namespace) -> int:
    overrides = {"engine": args.engine} if args.engine else {}
    config = read_config(args.config, overrides, round=args.round)
    try:
        stats = run(config, progress=not args.no_progress, address=args.address)
    except OSError as e:
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"error: {type(e).__name__}: {e.strerror or e}{where}; output: {config.output.path}. "
              "Finished shards are kept: rerun the same command to resume.", file=sys.stderr)
        return 4
    from vila2_curate.pipelines.engine.health import warning_lines

    for line in warning_lines(stats, config.sources):  # a source that "succeeded" with most images missing
        print(line, file=sys.stderr)
    total = stats["total"]
    print(json.dumps({"output": config.output.path, **{k: total[k] for k in
                                                         ("rows_in", "kept", "dropped", "quarantined")},
                      "balanced": stats["balanced"]}))
    return 0 if stats["balanced"] else 3


def read_config(path: str, overrides: dict | None = None, round: int | None = None):
    """load_config, with an unreadable config file reported as a configuration error (exit 2)."""
    try:
        return load_config(path, overrides, round=round)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file: {e.strerror or e}") from e


def run(config, *, progress: bool = True, address: str | None = None) -> dict:
    """Run a config on its engine; returns the merged stats."""
    if config.engine == "ray":
        from vila2_curate.pipelines.executors.ray_data import run_ray

        return run_ray(config, progress=progress, address=address)
    if config.engine == "beam":
        from vila2_curate.pipelines.executors.beam import run_beam

        return run_beam(config, progress=progress)
    from vila2_curate.pipelines.executors.local import run_local

    return run_local(config, progress=progress)


def _cmd_sample(args: argparse.Namespace) -> int:
    from vila2_curate.pipelines.demo.sample import write_sample

    truth = write_sample(args.out_dir, seed=args.seed, scale=args.scale)
    if not args.no_models:
        from vila2_curate.pipelines.demo.detector import build_demo_detector
        from vila2_curate.pipelines.demo.models import build_demo_models
        from vila2_curate.pipelines.demo.vlm import build_demo_vlm

        models = Path(args.out_dir) / "models"
        build_demo_models(str(models), seed=args.seed)
        build_demo_vlm(str(models / "vlm"), seed=args.seed)
        build_demo_detector(str(models / "owlv2"), seed=args.seed)
    print(json.dumps({"sample": args.out_dir, "summary": truth.get("summary", {})}, default=str))
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from vila2_curate.pipelines.validate import check_output

    report = check_output(args.out_dir, world_sizes=args.world_size or (),
                          min_caption_coverage=args.min_caption_coverage)
    for line in report.info:
        print(f"INFO: {line}")
    for w in report.warnings:
        print(f"WARNING: {w}")
    for p in report.problems:
        print(f"INVALID: {p}")
    if not report.problems:
        print(f"OK: {args.out_dir} matches the VILA output contract")
    return 1 if report.problems else 0


def _cmd_inputs(args: argparse.Namespace) -> int:
    """List the input shards a config would read and probe a few image references per source.

    Exit 1 when there are no inputs or when most probed references of a source fail (Airflow's ingest
    check: better to stop before a long run that would publish nothing for that source).
    """
    from vila2_curate.pipelines.engine.health import probe_source, warning_lines
    from vila2_curate.pipelines.executors.local import list_work
    from vila2_curate.pipelines.io.readers.base import SourceFormatError

    config = read_config(args.config, round=args.round)
    try:
        work = list_work(config)
    except SourceFormatError as e:
        print(f"error: {one_line(str(e))}", file=sys.stderr)
        print(json.dumps({"input_shards": 0, "error": str(e)}))
        return 1
    by_source: dict[str, list] = {}
    for reader, shard in work:
        by_source.setdefault(shard.source, [reader, []])[1].append(shard)
    probes = {}
    if args.probe > 0:
        for name, (reader, shards) in sorted(by_source.items()):
            probes[name] = probe_source(reader, shards, args.probe)
            p = probes[name]
            print(f"source {name!r}: {p['found']} of {p['checked']} image references found", file=sys.stderr)
    unhealthy = {"sources": {n: {"health": {**p, "failed_share": 1 - p["found"] / p["checked"]}}
                             for n, p in probes.items() if p["status"] == "warning"}}
    for line in warning_lines(unhealthy, config.sources):
        print(line, file=sys.stderr)
    print(json.dumps({"input_shards": len(work),
                      "by_source": {s: len(shards) for s, (_, shards) in sorted(by_source.items())},
                      "references": probes}))
    return 0 if work and not unhealthy["sources"] else 1


def _cmd_report(args: argparse.Namespace) -> int:
    from vila2_curate.pipelines.report import write_report

    path = write_report(args.out_dirs, dest=args.dest, gallery=args.gallery)
    print(f"report: {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vila2-curate", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run the configured sources through the configured stages")
    r.add_argument("config", help="YAML run config")
    r.add_argument("--engine", choices=["local", "ray", "beam"], help="override the config's engine")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local cluster)")
    r.add_argument("--round", type=int, help="recaption round K (fills {round}/{prev_round} in paths)")
    r.set_defaults(func=_cmd_run)

    s = sub.add_parser("sample", help="write a realistic offline sample (COYO, img2dataset, MMC4)")
    s.add_argument("out_dir")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--scale", type=int, default=1, help="multiply the number of rows")
    s.add_argument("--no-models", action="store_true",
                   help="skip the tiny random demo models (sample/models) the quickstart's model stages use")
    s.set_defaults(func=_cmd_sample)

    ip = sub.add_parser("inputs", help="count the input shards a config would read and probe a few image references per source "
                                      "(exit 1 when none, or when most references of a source fail)")
    ip.add_argument("config")
    ip.add_argument("--round", type=int)
    ip.add_argument("--probe", type=int, default=20,
                    help="image references to resolve per source through its reader (0: only list shards)")
    ip.set_defaults(func=_cmd_inputs)

    rp = sub.add_parser("report", help="write report.html (funnel, CLIP histograms, caption lengths per round, "
                                       "dedup groups, specialist coverage, cost per stage, gallery)")
    rp.add_argument("out_dirs", nargs="+", help="round 0 (curated) output first, then later rounds")
    rp.add_argument("--dest", help="default: <first out_dir>/report.html")
    rp.add_argument("--gallery", type=int, default=12, help="samples in the gallery")
    rp.set_defaults(func=_cmd_report)

    v = sub.add_parser("validate", help="check an output directory against VILA's output contract")
    v.add_argument("out_dir")
    v.add_argument("--world-size", type=int, nargs="+", metavar="N",
                   help="GPUs of the training job(s): print the MMC4 documents each rank gets, fail if one gets none")
    v.add_argument("--min-caption-coverage", type=float, metavar="FRACTION",
                   help="share of samples each recaptioned round's sidecars must cover (default: all the round's "
                        "records say it captioned)")
    v.set_defaults(func=_cmd_validate)
    for command in sub.choices.values():  # `vila2-curate run -v ...` works as well as `vila2-curate -v run`
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                             help="log at INFO and print the traceback of an error")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except Exception as e:  # noqa: BLE001 - every failure ends as one line; the traceback only with -v
        code, message = describe_error(e)
        if args.verbose:
            traceback.print_exc()
        print(f"error: {message}" + ("" if args.verbose or code != 1 else " (rerun with -v for the traceback)"),
              file=sys.stderr)
        return code


def describe_error(exc: BaseException) -> tuple[int, str]:
    """(exit status, one-line message) for an exception that ended a command.

    2: the configuration or a source's format (ConfigError, SourceFormatError, a plan the Ray cluster cannot
    place), or workers whose Python lacks the project; 4: I/O (unwritable output, full disk, an input gone
    while reading), 1: anything else (a bug). Engines wrap worker exceptions (Ray's RayTaskError, Beam's
    re-raise), so the cause chain is searched and its innermost known error reported.
    """
    chain = _cause_chain(exc)
    known = [e for e in chain  # by name: importing pipelines.io.readers here could itself fail and hide the error
             if isinstance(e, ConfigError) or any(c.__name__ == "SourceFormatError" for c in type(e).__mro__)]
    if known:
        e = known[-1]  # the innermost: Ray's wrapper is an instance of its cause too, with a remote traceback
        mark = getattr(e.__cause__, "problem_mark", None)  # yaml.MarkedYAMLError: say where, briefly
        if mark is not None and ": not valid YAML" in str(e):
            where = str(e).split(": not valid YAML", 1)[0]
            return 2, (f"{where}: not valid YAML at line {mark.line + 1}, column {mark.column + 1}: "
                       f"{getattr(e.__cause__, 'problem', None) or 'parse error'}")
        if isinstance(e, ConfigError):
            return 2, one_line(str(e))
        # a SourceFormatError is one line by construction; Ray Data appends its retry advice after a newline
        return 2, str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    missing = _missing_project(chain)
    if missing:
        from vila2_curate.pipelines.recaption import missing_install_message

        return 2, missing_install_message("the workers' Python", missing)
    for e in chain:
        if isinstance(e, OSError):
            where = f" ({e.filename})" if getattr(e, "filename", None) else ""
            return 4, one_line(f"{type(e).__name__}: {e.strerror or e}{where}")
    return 1, one_line(f"{type(exc).__name__}: {exc}")


_NO_PROJECT = re.compile(r"No module named '(vila2_curate(?:\.[\w.]+)?)'")


def _missing_project(chain: list[BaseException]) -> str | None:
    """The project module a worker could not import, if that ended the run. Ray hands a worker's failed
    import back as text (an actor that died in its creation task, a function that failed to import), so
    the messages are read too, not only ModuleNotFoundError objects."""
    from vila2_curate.pipelines.recaption import is_missing_project

    for e in chain:
        if is_missing_project(e):
            return str(getattr(e, "name", "")) or "vila2_curate"
        found = _NO_PROJECT.search(str(e))
        if found:
            return found.group(1)
    return None


def _cause_chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop(0)
        if e is None or any(e is s for s in seen):
            continue
        seen.append(e)
        todo += [getattr(e, "cause", None), e.__cause__, e.__context__]  # `cause`: Ray's RayTaskError
    return [e for e in seen if isinstance(e, BaseException)]


def one_line(message: str, limit: int = 2000) -> str:
    """A multi-line message (pydantic's list of fields, YAML's position lines) joined into one line."""
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    if not lines:
        return message.strip()
    head = lines[0].rstrip(":")
    text = head + (": " + "; ".join(lines[1:]) if len(lines) > 1 else "")
    return text if len(text) <= limit else text[: limit - 3] + "..."


if __name__ == "__main__":
    sys.exit(main())
