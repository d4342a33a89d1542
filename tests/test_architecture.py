"""The house rules of the package, enforced (docs/architecture.md): the stages' import boundaries, no import
cycles (counting imports inside functions), and the size limits that keep modules readable.

Imports are read from the source with ``ast``; an import under ``if TYPE_CHECKING:`` never runs and only
names a type, so it is not an edge. An import of ``gradcheck_cli.a.b`` is an edge to that module (and
``from gradcheck_cli.a import b`` to ``a.b`` when ``b`` is a module).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "gradcheck_cli"
STAGES = (
    "load",
    "probe",
    "diagnose",
    "advise",
    "report",
    "render",
    "gate",
    "training",
    "distributed",
    "simulate",
    "cli",
)


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: Path) -> Iterator[str]:
    """Every module ``path`` imports at run time (top level or inside functions), as dotted names."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped |= {id(n) for n in ast.walk(node)} - {id(node.test)}
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            for alias in node.names:
                if f"{node.module}.{alias.name}" in MODULES:
                    yield f"{node.module}.{alias.name}"


GRAPH = {name: sorted({i for i in _imports(path) if i in MODULES and i != name}) for name, path in MODULES.items()}


def _cycles() -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in GRAPH[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for name in GRAPH:
        if name not in index:
            visit(name)
    return found


def _stage(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in STAGES) else None


STAGE_IMPORTS = {  # docs/architecture.md's table: the stages each stage may import (top-level modules: all)
    "load": {"probe"},
    "probe": {"load", "distributed", "report"},
    "diagnose": {"probe", "report"},
    "advise": {"diagnose", "probe", "load", "report"},
    "report": set(),
    "render": {"report"},
    "gate": {"report", "diagnose"},
    "training": {"probe", "diagnose", "distributed", "report"},
    "distributed": {"probe", "load"},
    "simulate": {"probe", "diagnose", "load", "report"},
    "integrations": {"training", "diagnose"},
    "cli": set(STAGES) | {"integrations"},
}
FACT_TABLES = {
    "gradcheck_cli.diagnose.module_kinds",  # which modules are activations, norms, weights
    "gradcheck_cli.diagnose.rule_codes",  # every rule's code, name and SARIF text
    "gradcheck_cli.diagnose.rules",  # the thresholds' defaults
    "gradcheck_cli.simulate.report",  # the simulation's frozen report (render draws it)
}
"""Plain facts and value types any stage may read (they import no stage above them)."""


def test_each_stage_imports_only_the_stages_its_row_names() -> None:
    wrong = [
        f"{name} -> {target}"
        for name, targets in GRAPH.items()
        for target in targets
        if (stage := _stage(name)) is not None
        and (other := _stage(target)) not in (None, stage)
        and other not in STAGE_IMPORTS[stage]
        and target not in FACT_TABLES
    ]
    assert wrong == []


def test_no_import_cycles() -> None:
    assert _cycles() == []


def test_the_tree_shows_the_pipeline() -> None:
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= 12, top
    assert all((PACKAGE / stage / "__init__.py").is_file() for stage in STAGES)


@pytest.mark.parametrize("name", [n for n in MODULES if _stage(n) == "render"])
def test_renderers_never_import_torch(name: str) -> None:
    assert not [i for i in _imports(MODULES[name]) if i.split(".")[0] == "torch"]


@pytest.mark.parametrize("name", [n for n in MODULES if _stage(n) != "cli"])
def test_nothing_below_the_command_line_imports_typer(name: str) -> None:
    assert not [i for i in _imports(MODULES[name]) if i.split(".")[0] == "typer"]


@pytest.mark.parametrize("name", [n for n in MODULES if _stage(n) == "report"])
def test_the_report_imports_nothing_of_ours_but_itself(name: str) -> None:
    ours = [i for i in GRAPH[name] if _stage(i) != "report"]
    assert ours == []


MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80
MAX_PARAMETERS = 10  # for the core; a Typer command's parameters are its flags


def _functions() -> Iterator[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield name, node


def _parameters(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    args = node.args
    named = [*args.posonlyargs, *args.args, *args.kwonlyargs]
    count = len(named) + (args.vararg is not None) + (args.kwarg is not None)
    return count - (bool(named) and named[0].arg in ("self", "cls"))


def _body_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines from the first statement (the docstring counts) to the last, nested functions included."""
    return (node.end_lineno or node.lineno) - node.body[0].lineno + 1


def test_no_module_is_longer_than_a_sitting() -> None:
    long = {name: n for name, path in MODULES.items() if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES}
    assert long == {}


def test_no_function_body_is_longer_than_a_screen() -> None:
    long = [f"{m}:{f.lineno} {f.name}" for m, f in _functions() if _body_lines(f) > MAX_FUNCTION_LINES]
    assert long == []


def test_core_functions_take_few_parameters() -> None:
    wide = [
        f"{m}:{f.lineno} {f.name}" for m, f in _functions() if _stage(m) != "cli" and _parameters(f) > MAX_PARAMETERS
    ]
    assert wide == []


def test_the_limits_see_what_they_measure() -> None:
    """The checks above read real functions: the parameter count of a known wide signature is right."""
    tree = ast.parse("def f(self, a, /, b, *c, d, **e): pass\ndef g(x): pass")
    wide, narrow = (n for n in tree.body if isinstance(n, ast.FunctionDef))
    assert (_parameters(wide), _parameters(narrow)) == (5, 1)
    assert (_body_lines(wide), _body_lines(narrow)) == (1, 1)
    assert sum(1 for _ in _functions()) > 500


def test_the_history_command_imports_no_torch(tmp_path: Path) -> None:
    import subprocess
    import sys

    code = "import sys; from gradcheck_cli.training import history, log; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
    (tmp_path / "log.jsonl").write_text("")  # the whole command, up to its one-line error
    command = (
        "import sys; from gradcheck_cli.cli import app; sys.argv = ['gradcheck', 'history', 'log.jsonl']\n"
        "try:\n    app.main()\nexcept SystemExit:\n    pass\nsys.exit(1 if 'torch' in sys.modules else 0)"
    )
    assert subprocess.run([sys.executable, "-c", command], cwd=tmp_path, timeout=60).returncode == 0


@pytest.mark.slow
def test_the_built_wheel_ships_every_module_and_runs_without_the_source_tree(tmp_path: Path) -> None:
    """The tests import the checkout; this proves the installed package: a wheel built from it holds every
    module and ``py.typed``, and installed on its own it runs the command line from another directory."""
    import shutil
    import subprocess
    import sys
    import zipfile

    root = tmp_path / "tree"  # a copy: building in the checkout would leave build/ behind
    shutil.copytree(PACKAGE, root / "gradcheck_cli", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(PACKAGE.parent / name, root / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"), str(root)],
        check=True,
        timeout=300,
    )
    (wheel,) = (tmp_path / "dist").glob("gradcheck-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    expected = {
        str(p.relative_to(PACKAGE.parent)) for p in PACKAGE.rglob("*") if p.suffix in (".py", ".typed", ".css", ".js")
    }
    assert expected - shipped == set()
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
        check=True,
        timeout=300,
    )
    code = "import gradcheck_cli, sys; print(gradcheck_cli.__file__)"
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}
    where = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, text=True, capture_output=True)
    assert where.stdout.strip().startswith(str(site)), where.stdout + where.stderr
    run = subprocess.run(
        [sys.executable, "-m", "gradcheck_cli", "simulate", "--depth", "50", "--factor", "0.8", "--format", "json"],
        cwd=tmp_path,
        env=env,
        text=True,
        capture_output=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert '"verdict": "vanishing"' in run.stdout
