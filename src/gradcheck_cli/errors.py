"""Domain errors of the core; the command line maps each one to exit code 2."""

from __future__ import annotations


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


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type name when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
