"""Whole models pickled from a training script: their classes live in ``__main__``.

``torch.save(model)`` inside ``train.py`` records the model's class as ``__main__.Net``. In any other
process ``__main__`` is that process's own script, so the class cannot be found, and no PYTHONPATH helps.
With ``--trust --model train.py`` the pickle's ``__main__`` is read as the definitions of ``train.py``
(taken without running its top-level work); the error without it names that command, with the script found
by reading (never running) the ``.py`` files beside the checkpoint and in the working directory.
"""

from __future__ import annotations

import ast
import pickle
import shlex
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

MAIN = "__main__"
_SCAN_LIMIT = 200  # .py files read per directory when looking for the script that defined a class


def main_classes(globals_: list[str]) -> list[str]:
    """The class names a pickle needs from ``__main__`` (``__main__.Net`` → ``Net``)."""
    return sorted({name.split(".", 1)[1] for name in globals_ if name.startswith(MAIN + ".")})


def defining_scripts(classes: list[str], checkpoint: Path) -> list[Path]:
    """The ``.py`` files beside ``checkpoint`` or in the working directory that define every class named."""
    wanted = set(classes)
    return [_shown(script) for script in _nearby_scripts(checkpoint) if wanted <= _top_level_classes(script)]


def _nearby_scripts(checkpoint: Path) -> Iterator[Path]:
    """The ``.py`` files beside ``checkpoint`` and in the working directory (each folder once, a bounded few)."""
    for folder in dict.fromkeys((checkpoint.resolve().parent, Path.cwd().resolve())):
        yield from sorted(folder.glob("*.py"))[:_SCAN_LIMIT]


def _top_level_classes(script: Path, *, modules_only: bool = False) -> set[str]:
    try:
        tree = ast.parse(script.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
        return set()
    return {
        node.name
        for node in tree.body
        if isinstance(node, ast.ClassDef) and (not modules_only or any("Module" in ast.unparse(b) for b in node.bases))
    }


def suggested_factory(checkpoint: Path) -> str:
    """``script.py:Class`` when exactly one ``nn.Module`` class is defined beside the checkpoint or in the
    working directory (read, never run); the general form otherwise."""
    found = [
        (_shown(script), name)
        for script in _nearby_scripts(checkpoint)
        for name in sorted(_top_level_classes(script, modules_only=True))
    ]
    if len(found) == 1:
        return shlex.quote(f"{found[0][0]}:{found[0][1]}")
    return "path/to/file.py:Net"


def _shown(path: Path) -> Path:
    """``path`` relative to the working directory when it is inside it (what the user would type)."""
    try:
        return path.relative_to(Path.cwd().resolve())
    except ValueError:
        return path


def trust_command(checkpoint: Path, globals_: list[str]) -> str:
    """The command that loads this pickled model: ``--trust``, plus ``--model SCRIPT.py`` for ``__main__``."""
    command = f"gradcheck inspect {shlex.quote(str(checkpoint))} --trust"
    classes = main_classes(globals_)
    if not classes:
        return command
    scripts = defining_scripts(classes, checkpoint)
    script = str(scripts[0]) if len(scripts) == 1 else "train.py"
    return f"{command} --model {shlex.quote(script)}" + (
        "" if len(scripts) == 1 else f" (the script that defined {', '.join(classes)} and saved the model)"
    )


def main_from(module: types.ModuleType) -> Any:
    """A ``pickle_module`` for ``torch.load`` that reads the pickle's ``__main__`` as ``module``."""

    class _Unpickler(pickle.Unpickler):
        def find_class(self, module_name: str, name: str) -> Any:
            return super().find_class(module.__name__ if module_name == MAIN else module_name, name)

    class _Pickle:
        Unpickler = _Unpickler
        UnpicklingError = pickle.UnpicklingError
        __name__ = "gradcheck_main_from_script"

        @staticmethod
        def load(file: Any, **kwargs: Any) -> Any:
            return _Unpickler(file, **kwargs).load()

    return _Pickle
