"""TorchScript archives (``torch.jit.save``), loaded without ``--trust`` only when their code is plain tensor math.

TorchScript is code: ``torch.jit.load`` runs a class's ``__setstate__`` while loading, and the probe runs
``forward``. What is checked before and after loading is in :mod:`gradcheck_cli.load.script_scan`.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from gradcheck_cli.errors import CheckpointError, UntrustedCheckpointError, first_line
from gradcheck_cli.load.exported_scan import Finding, describe
from gradcheck_cli.load.loaded import LoadedModel
from gradcheck_cli.load.script_scan import loaded_problems, scan_archive

ADVICE = (
    "TorchScript is code that runs when loaded and probed, and gradcheck runs it without --trust only when it "
    "uses plain tensor operations; pass --trust only if you trust where it came from"
)


def load_torchscript(path: Path, *, trust: bool = False) -> LoadedModel:
    """Load a TorchScript archive; module hooks do not fire on it (the probe falls back, and says so).

    Without ``trust``, raises :class:`UntrustedCheckpointError` when the archive's code or pickles reach
    beyond the allow-list, before any of it runs (and, for the compiled graphs, before anything but a
    checked ``__setstate__`` ran). With ``trust``, loads it as it is and notes what the check would refuse.
    """
    if not trust:
        _refuse(path, scan_archive(path))
    module = _load(path)
    if not trust:
        _refuse(path, loaded_problems(module))
        return LoadedModel(module, "torchscript")
    found = _findings_for_note(path, module)
    notes = (f"--trust: the TorchScript code ran as it is ({describe(found)})",) if found else ()
    return LoadedModel(module, "torchscript", notes=notes)


def _refuse(path: Path, found: list[Finding]) -> None:
    if found:
        names = list(dict.fromkeys(name for f in found for name in f.imports)) or [f.what for f in found]
        raise UntrustedCheckpointError(f"{path} is TorchScript that {describe(found)}; {ADVICE}", names)


def _load(path: Path) -> torch.jit.ScriptModule:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch 2.13 warns that TorchScript is deprecated
            module: nn.Module = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        raise CheckpointError(f"{path} looks like TorchScript but could not be loaded: {first_line(exc)}") from None
    if not isinstance(module, torch.jit.ScriptModule):
        raise CheckpointError(f"{path} looks like TorchScript but did not load as a module")
    return module


def _findings_for_note(path: Path, module: torch.jit.ScriptModule) -> list[Finding]:
    """What the checks would have refused, for the report of a ``--trust`` run (best effort)."""
    try:
        return scan_archive(path) or loaded_problems(module)
    except Exception:  # a note must never fail a run the user trusted
        return []
