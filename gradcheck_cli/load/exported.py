"""``torch.export`` programs (``torch.export.save``, a ``.pt2`` zip archive), loaded after a safety scan.

What the scan checks, and why, is in :mod:`gradcheck_cli.load.exported_scan`.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from torch import nn
from torch.export.unflatten import UnflattenedModule

from gradcheck_cli.errors import CheckpointError, UntrustedCheckpointError, first_line
from gradcheck_cli.load.batch import Batch
from gradcheck_cli.load.exported_scan import describe, scan_archive
from gradcheck_cli.load.factory import importable_from_cwd
from gradcheck_cli.load.loaded import LoadedModel

NOTES = ("torch.export program: it runs as exported and cannot switch train/eval mode",)
FLAT_NOTE = (
    "torch.export program: its module hierarchy could not be restored (torch.export.unflatten: {why}), so it runs "
    "as one flat graph where module hooks do not fire"
)
"""When unflattening fails the probe adds the other caveat itself (GC006)."""


def load_exported(path: Path, *, trust: bool) -> LoadedModel:
    """Load a ``torch.export`` archive as a module, after checking that loading and running it runs no code.

    Raises :class:`UntrustedCheckpointError` (without ``trust``) when the archive holds anything that
    would import or run code, or a graph operator beyond tensor math (``aten.from_file``, a library's
    operator), and :class:`CheckpointError` with one line when it cannot be read.
    """
    findings = scan_archive(path)
    described = describe(findings)
    if findings and not trust:
        imports = list(dict.fromkeys(name for f in findings for name in f.imports))
        raise UntrustedCheckpointError(
            f"{path} is a torch.export archive that would import and run code when loaded or run ({described}); "
            "pass --trust only if you trust where it came from, or re-export it with plain tensor weights and inputs",
            imports or [f.what for f in findings],
        )
    program = _load_program(path, trusted=bool(findings))
    module, why = _unflattened(program)
    notes: tuple[str, ...] = NOTES
    if module is None:
        module = _module_of(program, path)
        notes = (*notes, FLAT_NOTE.format(why=why))
    if findings:
        notes = (*notes, f"--trust: loading the archive ran the code it brings ({described})")
    return LoadedModel(
        module=module,
        kind="exported_program",
        notes=notes,
        example_batch=_example_batch(program),
    )


# --------------------------------------------------------------------------- loading


class _CapturedErrors(logging.Handler):
    """Keeps the exceptions torch logs while loading (instead of printing their tracebacks)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.errors: list[BaseException] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record.exc_info[1] is not None:
            self.errors.append(record.exc_info[1])


@contextlib.contextmanager
def _quiet_torch() -> Iterator[_CapturedErrors]:
    """Silence torch's warnings and log messages for the duration; hand back the errors it logged.

    ``torch._logging`` gives several loggers below ``torch`` their own handlers (which do not
    propagate), so each logger of the ``torch`` tree that has handlers is redirected.
    """
    captured = _CapturedErrors()
    loggers = [logging.getLogger("torch")]
    loggers += [
        logger
        for name, logger in list(logging.root.manager.loggerDict.items())
        if name.startswith("torch.") and isinstance(logger, logging.Logger) and logger.handlers
    ]
    saved = [(logger, logger.handlers[:], logger.propagate) for logger in loggers]
    for logger in loggers:
        logger.handlers = [captured]
        logger.propagate = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield captured
    finally:
        for logger, handlers, propagate in saved:
            logger.handlers = handlers
            logger.propagate = propagate


def _load_program(path: Path, *, trusted: bool) -> torch.export.ExportedProgram:
    if trusted:  # custom classes the pickles name live in the user's project, like `torch.load` of a module
        importable_from_cwd()
    with _quiet_torch() as captured:
        try:
            return torch.export.load(str(path))
        except Exception as exc:
            cause: BaseException = exc
            if captured.errors and str(exc).startswith("We ran into an error when deserializing"):
                cause = captured.errors[0]  # the real reason, which torch logged before its generic error
            raise CheckpointError(
                f"{path} is a torch.export archive that torch {torch.__version__} could not load: {first_line(cause)}"
            ) from None


def _module_of(program: torch.export.ExportedProgram, path: Path) -> nn.Module:
    """The program as a callable module, without the guard submodule newer torch adds.

    ``check_guards=True`` (the default since torch 2.9) inserts a ``_guards_fn`` submodule call; the
    input-shape checks of the program's own signature still run without it.
    """
    with _quiet_torch():
        try:
            try:
                module = program.module(check_guards=False)  # type: ignore[call-arg]
            except TypeError:  # torch before 2.9 has no guard submodule and no argument for it
                module = program.module()
        except Exception as exc:
            raise CheckpointError(f"{path}: the torch.export program cannot be run: {first_line(exc)}") from None
    if not isinstance(module, nn.Module):
        raise CheckpointError(f"{path}: the torch.export program did not give a module")
    return module


class ExportedProgramModule(UnflattenedModule):
    """A ``torch.export`` program with its module hierarchy restored (``torch.export.unflatten``): each submodule
    runs its own part of the graph, so module hooks fire on it and the probe measures ‖∂L/∂output‖ per module call,
    as for the eager model. The graph stays as exported: train/eval cannot be switched (as for ``program.module()``).
    """

    def train(self, mode: bool = True) -> ExportedProgramModule:
        raise NotImplementedError("a torch.export program runs as exported; train/eval cannot be switched")


def _unflattened(program: torch.export.ExportedProgram) -> tuple[nn.Module | None, str]:
    """The program with its module hierarchy, or None and why not (an archive without module call records).

    Unflattening runs nothing new: the submodules run the program's own graph, whose operators the scan checked.
    """
    with _quiet_torch():
        try:
            module = torch.export.unflatten(program)
        except Exception as exc:  # torch's own limits (e.g. a program exported without module call records)
            return None, first_line(exc)
    if not isinstance(module, UnflattenedModule):
        return None, f"it gave a {type(module).__name__}"
    module.__class__ = ExportedProgramModule
    _drop_fake_values(module)
    return module, ""


def _drop_fake_values(module: nn.Module) -> None:
    """Forget the fake tensors export stored on every graph node (``meta['val']``): running the graph never
    reads them, and a copy of the model (``--verify``, ``--steps``) would copy each one, with a warning."""
    for submodule in module.modules():
        graph = getattr(submodule, "graph", None)
        if isinstance(graph, torch.fx.Graph):
            for node in graph.nodes:
                node.meta.pop("val", None)
                node.meta.pop("example_value", None)


def _example_batch(program: torch.export.ExportedProgram) -> Batch | None:
    """The example inputs stored with the program, as a batch (no target)."""
    example = getattr(program, "example_inputs", None)
    if not isinstance(example, tuple) or len(example) != 2:
        return None
    args, kwargs = example
    if not isinstance(args, (tuple, list)) or not isinstance(kwargs, Mapping):
        return None
    if not args and not kwargs:
        return None
    return Batch(args=tuple(args), kwargs=dict(kwargs))
