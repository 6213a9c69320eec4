"""Make the project importable on a bare GPU node, offline, with the standard library only.

The node has torch, transformers and friends but neither this project nor the few pure-Python packages
its stage modules import (pydantic, ftfy, open_clip, ...). Rather than touching the node's Python (it
may be externally managed) or putting the checkout on PYTHONPATH, this makes a venv that sees the node's
packages (``--system-site-packages``), installs into it the brought wheels whose import name is missing
or older than the pin (``wheels.txt``) and the project itself (built offline from the checkout, its
build requirements taken from the same folder), then re-runs the check with the venv's Python.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import venv
from pathlib import Path
from typing import NamedTuple

HERE = Path(__file__).resolve().parents[1]  # benchmarks/gpu
ROOT = HERE.parents[1]  # the checkout
WHEELS_TXT = HERE / "wheels.txt"
MARK = "VILA2_GPU_CHECK_VENV"  # set in the re-run, so a failed install cannot loop
_NOT_SOURCE = (".git", ".venv", "benchmarks", "tests", "build", "dist", "out", "sample", "*.egg-info",
               "__pycache__", ".pytest_cache", ".ruff_cache")


class Pin(NamedTuple):
    dist: str
    version: str
    module: str | None  # None: a build requirement only
    optional: bool = False  # missing alone does not start an install (e.g. pynvml: utilisation only)


def read_pins(path: Path = WHEELS_TXT) -> list[Pin]:
    """``name==version import_name [optional]`` lines of wheels.txt (``-``: build requirement)."""
    pins = []
    for line in path.read_text().splitlines():
        parts = line.split("#", 1)[0].split()
        if not parts:
            continue
        dist, version = parts[0].split("==")
        pins.append(Pin(dist, version, None if parts[1] == "-" else parts[1], "optional" in parts[2:]))
    return pins


def must_install(pins: list[Pin]) -> list[str]:
    """What forces an install: required modules (or the project) that cannot be imported here."""
    missing = [p.module for p in pins
               if p.module is not None and not p.optional and importlib.util.find_spec(p.module) is None]
    return missing + (["vila2_curate"] if project_missing() else [])


def _version_key(version: str) -> tuple[int, ...]:
    out = []
    for part in version.split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


def needed(pins: list[Pin]) -> list[Pin]:
    """Pins whose module cannot be imported here, or whose installed distribution is older."""
    out = []
    for pin in pins:
        if pin.module is None:
            continue
        if importlib.util.find_spec(pin.module) is None:
            out.append(pin)
            continue
        try:
            have = importlib.metadata.version(pin.dist)
        except importlib.metadata.PackageNotFoundError:
            continue  # importable but installed some other way: leave it
        if _version_key(have) < _version_key(pin.version):
            out.append(pin)
    return out


def project_missing() -> bool:
    return importlib.util.find_spec("vila2_curate") is None


def _wheel_for(pin: Pin, wheels: Path) -> Path:
    stem = pin.dist.replace("-", "_").lower()
    for p in sorted(wheels.glob("*.whl")):
        name, version = p.name.split("-")[:2]
        if name.lower() == stem and version == pin.version:
            return p
    raise SystemExit(f"error: {wheels}: no wheel for {pin.dist}=={pin.version}; run "
                     f"benchmarks/gpu/fetch_wheels.sh on a machine with internet and bring the folder")


def _make_venv(where: Path) -> list[str]:
    """A venv over the node's packages; the pip command that installs into it."""
    py = where / "bin" / "python"
    if not py.exists():
        try:
            venv.EnvBuilder(system_site_packages=True, with_pip=True).create(where)
        except (subprocess.CalledProcessError, OSError):  # no ensurepip on this Python: the node's pip
            venv.EnvBuilder(system_site_packages=True, with_pip=False, clear=True).create(where)
    probe = subprocess.run([str(py), "-m", "pip", "--version"], capture_output=True)
    if probe.returncode == 0:
        return [str(py), "-m", "pip"]
    return [sys.executable, "-m", "pip", "--python", str(py)]


def ensure(wheels: Path, venv_dir: Path | None = None) -> None:
    """Return when everything imports; otherwise install into a venv and re-run this command there."""
    pins = read_pins()
    missing = must_install(pins)
    if not missing:
        return
    if os.environ.get(MARK):
        raise SystemExit(f"error: still not importable after installing: {', '.join(missing)}")
    todo = needed(pins)
    where = venv_dir or Path(tempfile.gettempdir()) / "vila2-gpu-check-venv"
    pip = _make_venv(where)
    quiet = ["--quiet", "--disable-pip-version-check", "--no-index", "--find-links", str(wheels)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}  # the brought wheels only
    env |= {"PIP_CONFIG_FILE": os.devnull, "PIP_NO_INPUT": "1"}
    if todo:
        files = [str(_wheel_for(p, wheels)) for p in todo]
        print(f"gpu-check: installing {', '.join(p.dist for p in todo)} into {where}", file=sys.stderr)
        subprocess.run([*pip, "install", *quiet, "--no-deps", *files], check=True, env=env)
    print(f"gpu-check: installing the project from {ROOT} into {where}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="vila2-src-") as tmp:  # pip builds in the tree: a copy's
        src = Path(tmp) / "src"
        shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(*_NOT_SOURCE))
        subprocess.run([*pip, "install", *quiet, "--no-deps", str(src)], check=True, env=env)
    py = str(where / "bin" / "python")
    os.execve(py, [py, *sys.argv], {**os.environ, MARK: "1"})
