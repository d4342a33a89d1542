"""Which code a pickle would import, found without executing it."""

from __future__ import annotations

import io
import pickle
import re
from pathlib import Path

import torch

_BLOCKED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def unsafe_globals(source: Path | bytes, error: pickle.UnpicklingError | None = None) -> list[str]:
    """The globals outside torch's tensors-only allow-list that ``source`` would import.

    Zip archives (``torch.save``'s default) are scanned without executing anything. For legacy
    files, which torch cannot scan, the weights-only unpickler's ``error`` names the first global
    it refused. An empty list means the file needs no code (or a load failed for another reason:
    a corrupt file). Never use it alone as a safety check: torch's scanner can miss globals named
    through protocol 4's ``STACK_GLOBAL``; callers consult it only after the weights-only load
    itself refused the file, or (``.pt2``) together with such a load.
    """
    scanned: list[str] = []
    try:
        handle = io.BytesIO(source) if isinstance(source, bytes) else source
        scanned = list(torch.serialization.get_unsafe_globals_in_checkpoint(handle))
    except Exception:  # legacy (non-zip) or damaged files cannot be scanned
        scanned = []
    if scanned:
        return scanned
    return _BLOCKED_GLOBAL.findall(str(error)) if error is not None else []
