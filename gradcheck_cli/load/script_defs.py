"""The definitions of a user's script, taken without running its top-level work.

A training script (``train.py``) defines its model classes and then trains and saves at top level, often
without an ``if __name__ == "__main__":`` guard. Importing it would re-run the training and overwrite the
user's checkpoint. gradcheck instead executes only the statements that define names: imports, classes,
functions and assignments computed without a call (``HIDDEN = 128``, ``Act = nn.ReLU``), with their
decorators; every other top-level statement (calls, loops, ``with`` blocks, the ``__main__`` block) is
skipped and listed, so that an error can name the line a definition needed.
"""

from __future__ import annotations

import ast
import sys
import types
from dataclasses import dataclass
from pathlib import Path

from gradcheck_cli.errors import ModelFactoryError, first_line

_DEFINITIONS = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


@dataclass(frozen=True)
class ScriptDefinitions:
    """A script's definitions as a module, and the top-level statements left out (their first lines)."""

    module: types.ModuleType
    skipped_lines: tuple[int, ...]

    def skipped_note(self, path: Path) -> str | None:
        """One line for the report, or None when the whole script was definitions."""
        if not self.skipped_lines:
            return None
        lines = ", ".join(str(n) for n in self.skipped_lines[:6]) + (", ..." if len(self.skipped_lines) > 6 else "")
        return (
            f"took the definitions from {path.name} without running its top-level work "
            f"({len(self.skipped_lines)} statement(s) skipped, line {lines})"
        )


def _is_definition(node: ast.stmt) -> bool:
    if isinstance(node, _DEFINITIONS):
        return True
    if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):  # constants and aliases, never a call's result
        return node.value is None or not _calls(node.value)
    if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
        return True  # the module docstring
    if isinstance(node, ast.If):  # `if TYPE_CHECKING:` / version switches that only define
        definitions = all(_is_definition(n) for n in (*node.body, *node.orelse))
        return definitions and not _calls(node.test) and not _is_main_guard(node)
    if isinstance(node, ast.Try):  # `try: import x / except ImportError: ...`
        return all(_is_definition(n) or isinstance(n, ast.Pass) for n in _try_statements(node))
    return False


def _complete_definitions(body: list[ast.stmt]) -> list[ast.stmt]:
    """The definitions, less any assignment to a name that skipped top-level code also changes
    (``LAYERS = [...]`` then ``LAYERS += make()`` or ``LAYERS.append(...)``): a half-built value would
    build the wrong model silently; left out, the name fails loudly with a hint."""
    skipped = [node for node in body if not _is_definition(node)]
    changed = {name for node in skipped for name in _changed_names(node)}
    return [
        node
        for node in body
        if _is_definition(node)
        and not (isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)) and _changed_names(node) & changed)
    ]


def _changed_names(node: ast.AST) -> set[str]:
    """Names a statement rebinds, or mutates in place (``x[...] = ``, ``x.attr = ``, ``x.method(...)``)."""
    names = {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, (ast.Store, ast.Del))}
    for n in ast.walk(node):
        target = n.value if isinstance(n, (ast.Subscript, ast.Attribute)) and isinstance(n.ctx, ast.Store) else None
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute):
            target = n.func.value  # LAYERS.append(...), CONFIG.update(...)
        if isinstance(target, ast.Name):
            names.add(target.id)
    return names


def _calls(node: ast.AST) -> bool:
    return any(isinstance(n, (ast.Call, ast.Await, ast.NamedExpr)) for n in ast.walk(node))


def _try_statements(node: ast.Try) -> list[ast.stmt]:
    return [*node.body, *(s for h in node.handlers for s in h.body), *node.orelse, *node.finalbody]


def _is_main_guard(node: ast.If) -> bool:
    return "__main__" in ast.unparse(node.test)


_LOADED: dict[tuple[Path, int, int], ScriptDefinitions] = {}


def load_definitions(path: Path, spec: str) -> ScriptDefinitions:
    """Execute ``path``'s definitions in a fresh module (registered in ``sys.modules``, its directory made
    importable for sibling modules); raise :class:`ModelFactoryError` with one line when that fails.

    Once per file and process: the loader and the factory then see the same classes (a pickle's
    ``__main__.Net`` must be the class the factory builds)."""
    try:
        stat = path.stat()
    except OSError as exc:
        raise ModelFactoryError(f"--model {spec}: cannot read {path}: {first_line(exc)}") from None
    key = (path.resolve(), stat.st_mtime_ns, stat.st_size)  # an edited script is read again
    if key in _LOADED:
        sys.modules.setdefault(_LOADED[key].module.__name__, _LOADED[key].module)  # pickle looks classes up there
        return _LOADED[key]
    try:
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source, filename=str(path))
    except (OSError, UnicodeDecodeError, SyntaxError, ValueError) as exc:
        raise ModelFactoryError(f"--model {spec}: cannot read {path} as Python: {first_line(exc)}") from None
    kept = _complete_definitions(tree.body)
    skipped = tuple(
        node.lineno
        for node in tree.body
        if not _is_definition(node) and not (isinstance(node, ast.If) and _is_main_guard(node))
    )
    name = f"gradcheck_user_model_{abs(hash(str(path.resolve())))}"
    module = types.ModuleType(name)
    module.__file__ = str(path.resolve())
    folder = str(path.resolve().parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    sys.modules[name] = module  # classes defined here must be findable by pickle and dataclasses
    try:
        exec(compile(ast.Module(body=kept, type_ignores=[]), str(path), "exec"), module.__dict__)
    except (Exception, SystemExit) as exc:  # a definition that calls sys.exit() must not pass the gate
        del sys.modules[name]
        raise ModelFactoryError(
            f"--model {spec}: defining {path.name}'s classes and functions raised {type(exc).__name__}: "
            f"{first_line(exc)}"
        ) from None
    _LOADED[key] = ScriptDefinitions(module, skipped)
    return _LOADED[key]


def missing_global_hint(exc: BaseException, definitions: ScriptDefinitions, path: Path) -> str:
    """For a NameError raised by a factory: which skipped top-level statement probably defined the name."""
    if not isinstance(exc, NameError) or not definitions.skipped_lines:
        return ""
    return (
        f"; {path.name} computes it in top-level code gradcheck does not run (it never runs a script's "
        "training): move it into the factory, or under a function"
    )
