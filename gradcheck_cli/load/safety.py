"""Which code a pickle would import, found without executing it."""

from __future__ import annotations

import io
import pickle
import re
from pathlib import Path
from typing import Any

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


class RefusedGlobal(pickle.UnpicklingError):
    """The restricted unpickler met a global outside the tensors-only allow-list."""

    def __init__(self, name: str) -> None:
        super().__init__(f"global {name} is not allowed")
        self.name = name


class _TensorsOnlyUnpickler(pickle.Unpickler):
    """Python's own unpickler (every opcode of every protocol) that resolves only the globals torch's
    weights-only loader allows: whatever the opcodes, nothing else can be imported or called."""

    def find_class(self, module: str, name: str) -> Any:
        key = f"{module}.{name}"
        allowed = _allowed_globals()
        if key not in allowed:
            raise RefusedGlobal(key)
        return allowed[key]


def _allowed_globals() -> dict[str, Any]:
    from torch._weights_only_unpickler import _get_allowed_globals

    allowed: dict[str, Any] = dict(_get_allowed_globals())
    for item in torch.serialization.get_safe_globals():
        target = item[0] if isinstance(item, tuple) else item
        allowed[f"{getattr(target, '__module__', '')}.{getattr(target, '__qualname__', '')}"] = target
    return allowed


class tensors_only_pickle:
    """A ``pickle_module`` for ``torch.load(weights_only=False)`` that imports only allow-listed globals.

    torch's weights-only unpickler implements the opcodes of the protocol torch.save uses by default (2); a
    file saved with ``pickle_protocol=4`` or 5 uses FRAME and STACK_GLOBAL, which it refuses as
    "Unsupported operand". This reads such files with the same allow-list instead.
    """

    Unpickler = _TensorsOnlyUnpickler
    UnpicklingError = pickle.UnpicklingError
    __name__ = "gradcheck_tensors_only_pickle"

    @staticmethod
    def load(file: Any, **kwargs: Any) -> Any:
        return _TensorsOnlyUnpickler(file, **kwargs).load()


def load_tensors_only(source: Path) -> Any:
    """``torch.load`` that imports only torch's tensors-only globals, whatever the pickle protocol.

    torch's own weights-only reader first; a file it cannot parse (``pickle_protocol=4``/5: "Unsupported
    operand") is read by :class:`tensors_only_pickle`, which raises :class:`RefusedGlobal` for anything else.
    Other refusals are torch's ``UnpicklingError``.
    """
    import warnings

    with warnings.catch_warnings():  # newer protocols are read below, without the warning's advice
        warnings.filterwarnings("ignore", message="Detected pickle protocol")
        try:
            return torch.load(source, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            if "Unsupported operand" not in str(exc):
                raise
        return torch.load(source, map_location="cpu", weights_only=False, pickle_module=tensors_only_pickle)
