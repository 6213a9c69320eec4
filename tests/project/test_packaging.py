"""The wheel installs one top-level name, ``vila2_curate``, with every module and data file of the source folders;
a checkout on sys.path (as ``ray job submit --working-dir .`` puts it) shadows nothing, and the Ray job
entry names a missing install in one line."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.helpers.runs import ROOT

# source folder -> where its files install; the package's own __init__ is under src/ so that the checkout
# root has no `vila2_curate` folder to shadow the installed package
FOLDERS = {"src/vila2_curate": "vila2_curate", **{f: f"vila2_curate/{f}" for f in
                                                   ("schemas", "curation", "recaption", "specialists", "pipelines")}}


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
    for folder, prefix in FOLDERS.items():
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
    # a Ray job's working dir (the checkout) comes first on the path: nothing in it shadows the install
    assert not (ROOT / "vila2_curate").exists()
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(target)])
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert out[0].startswith(str(target))


@pytest.mark.parametrize("old_layout", [False, True])
def test_ray_job_entry_names_a_missing_install_in_one_line(old_layout: bool, tmp_path: Path) -> None:
    """``python pipelines/recaption.py`` in a Python without the project, the checkout on PYTHONPATH as
    ``ray job submit --working-dir .`` sets it: exit 2, one ``error:`` line with both fixes. With a
    ``vila2_curate/`` folder at the checkout root (the old layout) the folder is found instead of an
    install, and the line names the subpackage that is missing."""
    checkout = ROOT
    if old_layout:
        checkout = tmp_path / "checkout"
        (checkout / "pipelines").mkdir(parents=True)
        shutil.copy(ROOT / "pipelines" / "recaption.py", checkout / "pipelines" / "recaption.py")
        (checkout / "vila2_curate").mkdir()
        (checkout / "vila2_curate" / "__init__.py").write_text("")
    # -S: no site-packages, so neither the project nor its dependencies, like a bare cluster image
    python = [sys.executable, "-S"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONHOME"} | {"PYTHONPATH": str(checkout)}
    proc = subprocess.run([*python, "pipelines/recaption.py", "--config", "configs/recaption.yaml", "--round", "1"],
                          cwd=checkout, env=env, capture_output=True, text=True, timeout=60)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"error: vila2_curate is not installed in this Python ({sys.executable})")
    assert "install it in the cluster's image" in lines[0]
    assert "pip wheel --no-deps -w dist ." in lines[0] and '"py_modules": ["dist/vila2_curate-' in lines[0]
    assert ("(no module named 'vila2_curate.pipelines')" in lines[0]) == old_layout
    assert proc.stdout == ""


def test_cli_names_a_worker_python_without_the_project():
    """A Ray worker that cannot import the project: Ray hands it back as text inside its own errors."""
    from vila2_curate.pipelines.cli import describe_error

    died = RuntimeError("The actor died because of an error raised in its creation task\n"
                        "ray.exceptions.RaySystemError: System error: No module named 'vila2_curate'\ntraceback: ...")
    wrapped = RuntimeError("Ray Data failed")
    wrapped.__cause__ = died
    code, message = describe_error(wrapped)
    assert code == 2 and message.startswith("vila2_curate is not installed in the workers' Python: install it")
    assert "py_modules" in message and "\n" not in message
    code, message = describe_error(ModuleNotFoundError("No module named 'vila2_curate.pipelines'",
                                                       name="vila2_curate.pipelines"))
    assert code == 2 and "(no module named 'vila2_curate.pipelines')" in message
    assert describe_error(ModuleNotFoundError("No module named 'torch'", name="torch"))[0] == 1
