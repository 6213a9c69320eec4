"""The layer rules of ARCHITECTURE.md section 2, checked on every import statement (function-level ones too).

import-linter cannot run here: grimp discovers modules by walking the root package's folder, and
``vila2_curate``'s subpackages live in the repository's top-level folders (setuptools ``package-dir``), so
this test walks those folders with ``ast`` instead.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers.runs import ROOT

# Higher layers may import lower ones, never the reverse.
PACKAGE_LAYERS = ("pipelines", "specialists", "recaption", "curation", "schemas")
# Inside pipelines/: entry points -> report / demo / validate -> executors -> engine -> io.
PIPELINES_LAYERS = (
    {"cli", "airflow_dag", "recaption", "__init__"},
    {"report", "demo", "validate"},
    {"executors"},
    {"engine"},
    {"io"},
)
INDEPENDENT = {"report", "demo", "validate"}  # siblings that must not import each other
# No stage knows its engine or its scheduler.
ENGINE_MODULES = ("ray", "apache_beam", "airflow")
STAGE_PACKAGES = ("schemas", "curation", "recaption", "specialists")


def imported_modules(source: str) -> set[str]:
    """Absolute module names an import statement anywhere in ``source`` names (``from a import b``: a, a.b)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def _pipelines_layer(part: str) -> int:
    return next(i for i, layer in enumerate(PIPELINES_LAYERS) if part in layer)


def violations(package: str, rel: Path, imports: set[str]) -> list[str]:
    """Broken rules for the module at ``<package>/<rel>`` importing ``imports``."""
    where = f"{package}/{rel.as_posix()}"
    bad = []
    mine = PACKAGE_LAYERS.index(package)
    for name in sorted(imports):
        parts = name.split(".")
        if parts[0] in ENGINE_MODULES and package in STAGE_PACKAGES:
            bad.append(f"{where} imports {name}: stages know no engine")
        if parts[0] != "vila2_curate" or len(parts) < 2 or parts[1] not in PACKAGE_LAYERS:
            continue
        if PACKAGE_LAYERS.index(parts[1]) < mine:
            bad.append(f"{where} imports {name}: {package}/ is below {parts[1]}/")
        if package == "pipelines" == parts[1] and len(parts) > 2:
            src = rel.parts[0].removesuffix(".py")
            dst = parts[2]
            if dst not in {m for layer in PIPELINES_LAYERS for m in layer}:
                continue  # a name imported from vila2_curate.pipelines itself
            if _pipelines_layer(dst) < _pipelines_layer(src):
                bad.append(f"{where} imports {name}: pipelines/{src} is below pipelines/{dst}")
            elif src != dst and src in INDEPENDENT and dst in INDEPENDENT:
                bad.append(f"{where} imports {name}: pipelines/{src} and pipelines/{dst} are independent")
    return bad


def test_every_pipelines_module_has_a_layer() -> None:
    known = {m for layer in PIPELINES_LAYERS for m in layer}
    found = {p.name.removesuffix(".py") for p in (ROOT / "pipelines").iterdir()
             if p.suffix == ".py" or (p / "__init__.py").exists()}
    assert found <= known, f"give these a layer in PIPELINES_LAYERS and ARCHITECTURE.md: {sorted(found - known)}"


def test_imports_follow_the_layer_rules() -> None:
    bad = []
    checked = 0
    for package in PACKAGE_LAYERS:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT / package)
            bad += violations(package, rel, imported_modules(path.read_text()))
            checked += 1
    assert checked > 80  # every folder was walked
    assert not bad, "\n".join(bad)


def test_the_checker_sees_violations() -> None:
    """Each rule fires on a module that breaks it, including an import inside a function."""
    src = "def f():\n    from vila2_curate.pipelines.engine import runner\n"
    assert violations("curation", Path("x.py"), imported_modules(src))
    assert violations("recaption", Path("x.py"), imported_modules("import ray.data\n"))
    assert violations("pipelines", Path("io/sink.py"),
                      imported_modules("from vila2_curate.pipelines.engine.plan import Plan\n"))
    assert violations("pipelines", Path("report/page.py"),
                      imported_modules("from vila2_curate.pipelines.demo import sample\n"))
    assert violations("schemas", Path("x.py"), imported_modules("import vila2_curate.curation.dedup\n"))
    ok = "from vila2_curate.schemas.rows import PAIR_SCHEMA\nimport numpy\n"
    assert not violations("curation", Path("x.py"), imported_modules(ok))
    assert not violations("pipelines", Path("engine/plan.py"),
                          imported_modules("from vila2_curate.pipelines.io.sink import ShardSink\n"))


def _import_time_nodes(body: list[ast.stmt]) -> list[ast.stmt]:
    """The statements that run when the module is imported: not function bodies, not ``TYPE_CHECKING``."""
    out = []
    for node in body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        if isinstance(node, ast.ClassDef):
            out += _import_time_nodes(node.body)
        else:
            out.append(node)
    return out


def module_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports when it is imported (a function's own imports run later);
    a package is its ``__init__``."""
    files = {}
    for package in PACKAGE_LAYERS:
        for path in (ROOT / package).rglob("*.py"):
            parts = (package, *path.relative_to(ROOT / package).with_suffix("").parts)
            files[".".join(("vila2_curate", *(p for p in parts if p != "__init__")))] = path
    graph = {}
    for name, path in files.items():
        body = _import_time_nodes(ast.parse(path.read_text()).body)
        names = imported_modules(ast.unparse(ast.Module(body=body, type_ignores=[])))
        graph[name] = {m for m in names if m in files and m != name}
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles() -> None:
    graph = module_graph()
    assert len(graph) > 80
    assert import_cycles(graph) == []
    # the check finds a cycle through a package's __init__
    assert import_cycles({"p": {"p.a"}, "p.a": {"p.b"}, "p.b": {"p"}, "q": set()}) == [["p", "p.a", "p.b"]]
