"""Resolve ``--model MODULE:FACTORY``, ``path/to/file.py:FACTORY`` or ``path/to/file.py`` to an ``nn.Module``.

A ``.py`` file is a user's script: only its definitions are taken (:mod:`gradcheck_cli.load.script_defs`),
never its top-level training. Without ``:FACTORY`` the script's one ``nn.Module`` class is built.
"""

from __future__ import annotations

import inspect
import os
import pkgutil
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from gradcheck_cli.errors import ModelFactoryError, first_line
from gradcheck_cli.load.script_defs import ScriptDefinitions, load_definitions, missing_global_hint


def is_script(spec: str) -> bool:
    """``spec`` names a Python file (with or without ``:FACTORY``) rather than an importable module."""
    module_part = spec.rpartition(":")[0] if ":" in spec else spec
    return module_part.endswith(".py") or os.sep in module_part or "/" in module_part


def _split_script(spec: str) -> tuple[Path, str]:
    """``file.py:FACTORY`` → (file.py, FACTORY); ``file.py`` → (file.py, '')."""
    head, sep, attr = spec.rpartition(":")
    return (Path(head), attr) if sep else (Path(spec), "")


def script_definitions(spec: str) -> tuple[Path, ScriptDefinitions]:
    """The definitions of the script ``spec`` names (``file.py`` or ``file.py:FACTORY``)."""
    path = _split_script(spec)[0]
    if not path.is_file():
        raise ModelFactoryError(f"--model {spec}: file {path} not found")
    return path, load_definitions(path, spec)


def spec_notes(spec: str) -> tuple[str, ...]:
    """What the report should say about how ``spec`` was read (a script's skipped top-level work)."""
    if not is_script(spec):
        return ()
    path, definitions = script_definitions(spec)
    note = definitions.skipped_note(path)
    return (note,) if note else ()


def build_model(spec: str, hyper_parameters: Mapping[str, Any] | None = None) -> nn.Module:
    """Import the object ``spec`` names and turn it into a module: call it unless it is one.

    ``hyper_parameters`` (a Lightning checkpoint's) are passed to it as the keyword arguments its signature
    accepts, as ``LightningModule.load_from_checkpoint`` does."""
    target, definitions = _target(spec)
    if isinstance(target, nn.Module):
        return target
    if not callable(target):
        raise ModelFactoryError(f"--model {spec}: {type(target).__name__} is neither an nn.Module nor callable")
    try:
        model = target(**accepted_arguments(target, hyper_parameters or {}))
    except (Exception, SystemExit) as exc:  # a factory that calls sys.exit() must not pass the gate
        hint = missing_global_hint(exc, definitions, _split_script(spec)[0]) if definitions is not None else ""
        raise ModelFactoryError(
            f"--model {spec}: calling it raised {type(exc).__name__}: {first_line(exc)}{hint}"
        ) from None
    if not isinstance(model, nn.Module):
        raise ModelFactoryError(f"--model {spec} returned a {type(model).__name__}, not an nn.Module")
    return model


def _target(spec: str) -> tuple[Any, ScriptDefinitions | None]:
    """What ``spec`` names, and the script definitions it came from (None for an importable module)."""
    if is_script(spec):
        path, definitions = script_definitions(spec)
        return _script_target(spec, path, definitions), definitions
    return _resolve(spec), None


def used_hyper_parameters(spec: str, hyper_parameters: Mapping[str, Any]) -> list[str]:
    """The names of the hyper-parameters :func:`build_model` passes to what ``spec`` names."""
    target = _target(spec)[0]
    return [] if isinstance(target, nn.Module) else sorted(accepted_arguments(target, hyper_parameters))


def accepted_arguments(target: Any, values: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``values`` that ``target``'s signature takes (all of them when it takes ``**kwargs``)."""
    if not values:
        return {}
    try:
        parameters = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):  # a builtin or C extension without a signature
        return {}
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return {k: v for k, v in values.items() if not k.startswith("_")}
    names = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return {k: v for k, v in values.items() if k in names}


def _script_target(spec: str, path: Path, definitions: ScriptDefinitions) -> Any:
    """``file.py:NAME`` resolves NAME; a bare ``file.py`` its only ``nn.Module`` class."""
    attr = _split_script(spec)[1]
    if attr:
        try:
            return pkgutil.resolve_name(f"{definitions.module.__name__}:{attr}")
        except (AttributeError, ValueError):
            raise ModelFactoryError(
                f"--model {spec}: {path.name} defines no {attr!r}{missing_note(definitions, path)}"
            ) from None
    classes = module_classes(definitions.module)
    if len(classes) != 1:
        found = f"it defines {', '.join(classes)}" if classes else "it defines no nn.Module class"
        raise ModelFactoryError(
            f"--model {spec}: name the class or function that builds the model, e.g. --model {path}:"
            f"{classes[0] if classes else 'build_model'} ({found})"
        )
    return getattr(definitions.module, classes[0])


def module_classes(module: Any) -> list[str]:
    """The ``nn.Module`` subclasses a module defines itself (not the ones it imports)."""
    return [
        name
        for name, value in vars(module).items()
        if isinstance(value, type) and issubclass(value, nn.Module) and value.__module__ == module.__name__
    ]


def missing_note(definitions: ScriptDefinitions, path: Path) -> str:
    note = definitions.skipped_note(path)
    return f" ({note})" if note else ""


def _resolve(spec: str) -> Any:
    module_part, sep, attr = spec.rpartition(":")
    if not sep or not module_part or not attr:
        raise ModelFactoryError(
            f"--model must look like 'package.module:factory', 'path/file.py:factory' or 'path/file.py', got {spec!r}"
        )
    importable_from_cwd()
    try:
        return pkgutil.resolve_name(spec)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ModelFactoryError(
            f"--model {spec}: {first_line(exc)}; run from the directory that holds the package or set PYTHONPATH"
        ) from None
    except (Exception, SystemExit) as exc:  # a factory that calls sys.exit() must not pass the gate
        raise ModelFactoryError(
            f"--model {spec}: importing it raised {type(exc).__name__}: {first_line(exc)}"
        ) from None


def importable_from_cwd() -> None:
    """Let ``package.module`` names resolve from the working directory, as ``python -m`` would."""
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
