"""Domain errors of the core; the command line maps each one to exit code 2."""

from __future__ import annotations

import traceback
from pathlib import Path

_PACKAGE = str(Path(__file__).resolve().parent)


class GradcheckError(Exception):
    """The input could not be used. ``str(error)`` is one line that says what to do."""


class CheckpointError(GradcheckError):
    """The checkpoint is unreadable, of an unknown kind, or does not match the architecture."""


class UntrustedCheckpointError(CheckpointError):
    """Loading the checkpoint would unpickle code, and the user did not pass ``--trust``."""

    def __init__(self, message: str, unsafe_globals: list[str]) -> None:
        super().__init__(message)
        self.unsafe_globals = unsafe_globals


class ModelFactoryError(GradcheckError):
    """``--model MODULE:FACTORY`` could not be resolved or did not return an ``nn.Module``."""


class BatchError(GradcheckError):
    """The batch is unreadable or does not fit the model."""


class ModelCodeError(GradcheckError):
    """The model's own code (its forward, a custom autograd Function, a hook) raised or exited."""


class OutOfMemory(GradcheckError):
    """The run needed more memory than the machine (or the device) has."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type name when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def is_out_of_memory(exc: BaseException) -> bool:
    """A ``MemoryError``, a device ``OutOfMemoryError``, or the CPU allocator's failure (a ``RuntimeError``)."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "DefaultCPUAllocator" in text)


def raised_in_gradcheck(exc: BaseException) -> bool:
    """Whether the innermost frame of ``exc`` is gradcheck's own code (a bug) rather than the model's."""
    frames = traceback.extract_tb(exc.__traceback__)
    return bool(frames) and str(Path(frames[-1].filename).resolve()).startswith(_PACKAGE)
