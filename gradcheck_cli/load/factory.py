"""Resolve ``--model MODULE:FACTORY`` (or ``path/to/file.py:FACTORY``) to an ``nn.Module``."""

from __future__ import annotations

import importlib.util
import os
import pkgutil
import sys
from pathlib import Path
from typing import Any

from torch import nn

from gradcheck_cli.errors import ModelFactoryError, first_line


def build_model(spec: str) -> nn.Module:
    """Import the object ``spec`` names and turn it into a module: call it unless it is one."""
    target = _resolve(spec)
    if isinstance(target, nn.Module):
        return target
    if not callable(target):
        raise ModelFactoryError(f"--model {spec}: {type(target).__name__} is neither an nn.Module nor callable")
    try:
        model = target()
    except (Exception, SystemExit) as exc:  # a factory that calls sys.exit() must not pass the gate
        raise ModelFactoryError(f"--model {spec}: calling it raised {type(exc).__name__}: {first_line(exc)}") from None
    if not isinstance(model, nn.Module):
        raise ModelFactoryError(f"--model {spec} returned a {type(model).__name__}, not an nn.Module")
    return model


def _resolve(spec: str) -> Any:
    module_part, sep, attr = spec.rpartition(":")
    if not sep or not module_part or not attr:
        raise ModelFactoryError(
            f"--model must look like 'package.module:factory' or 'path/file.py:factory', got {spec!r}"
        )
    if module_part.endswith(".py") or os.sep in module_part or "/" in module_part:
        module = _import_file(Path(module_part), spec)
        try:
            return pkgutil.resolve_name(f"{module.__name__}:{attr}")
        except (AttributeError, ValueError):
            raise ModelFactoryError(f"--model {spec}: {module_part} has no attribute {attr!r}") from None
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


def _import_file(path: Path, spec: str) -> Any:
    if not path.is_file():
        raise ModelFactoryError(f"--model {spec}: file {path} not found")
    name = f"gradcheck_user_model_{abs(hash(str(path.resolve())))}"
    loader_spec = importlib.util.spec_from_file_location(name, path)
    if loader_spec is None or loader_spec.loader is None:
        raise ModelFactoryError(f"--model {spec}: cannot import {path} as Python")
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[name] = module
    try:
        loader_spec.loader.exec_module(module)
    except (Exception, SystemExit) as exc:  # a factory that calls sys.exit() must not pass the gate
        del sys.modules[name]
        raise ModelFactoryError(
            f"--model {spec}: importing {path} raised {type(exc).__name__}: {first_line(exc)}"
        ) from None
    return module
