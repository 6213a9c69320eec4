"""The wheel installs one top-level name, ``vila2_curate``, with every module and data file of the source folders."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import ROOT

FOLDERS = ("vila2_curate", "schemas", "curation", "recaption", "specialists", "pipelines")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built from a copy of the sources (building in the checkout would leave build/ behind)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in FOLDERS:
        shutil.copytree(ROOT / folder, src / folder, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "-w", str(tmp / "dist"), str(src)], check=True)
    (whl,) = (tmp / "dist").glob("vila2_curate-*.whl")
    return whl


def source_files() -> dict[str, Path]:
    """Installed path -> source file, for every file the folders hold."""
    out = {}
    for folder in FOLDERS:
        prefix = "vila2_curate" if folder == "vila2_curate" else f"vila2_curate/{folder}"
        for path in (ROOT / folder).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                out[f"{prefix}/{path.relative_to(ROOT / folder).as_posix()}"] = path
    return out


def test_wheel_holds_every_source_file_under_one_name(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    tops = {n.split("/")[0] for n in names}
    assert tops == {"vila2_curate", wheel.name.split("-py3")[0] + ".dist-info"}, tops
    expected = source_files()
    missing = sorted(set(expected) - names)
    assert not missing, f"not in the wheel (pyproject packages / package-data): {missing}"
    assert any(n.endswith(".yaml") for n in expected)  # data files are part of the check
    entry = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "vila2-curate = vila2_curate.pipelines.cli:main" in entry


def test_installed_wheel_imports_without_the_checkout(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target",
                    str(target), str(wheel)], check=True)
    probe = ("import importlib.util, vila2_curate.pipelines.cli as c, vila2_curate.recaption.prompts as p\n"
             "print(c.__file__); print(p.builtin_prompt_sets())\n"
             "print(importlib.util.find_spec('schemas'), importlib.util.find_spec('pipelines'))\n")
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert out[0].startswith(str(target))
    assert "self_augment" in out[1]  # package data found through the installed package
    assert out[2] == "None None"  # no generic top-level names in the user's environment
