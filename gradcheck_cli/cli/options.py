"""What the commands share: the options ``inspect`` and ``history`` both take, and what click saw of them.

click parses the command line once; :class:`RecordingCommand` keeps the two things its parse knows and the
parameter values do not: the order in which ``--format`` and ``--output`` were written (an ``--output``
belongs to the ``--format`` before it), and whether ``--debug`` or ``--distributed`` was given, which
``main()`` needs after the command has ended (in click's ``ctx.obj``, an :class:`Invocation`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from typer.core import TyperCommand

from gradcheck_cli.errors import GradcheckError
from gradcheck_cli.render.registry import ReportFormat

if TYPE_CHECKING:
    from gradcheck_cli.diagnose.rules import Thresholds

FormatsOption = Annotated[
    list[ReportFormat] | None,
    typer.Option(
        "--format", "-f", help="Report format (repeatable: each --format takes the --output at its position)."
    ),
]
OutputsOption = Annotated[
    list[Path] | None, typer.Option("--output", "-o", help="Write the report to this file (repeatable).")
]
FailOnOption = Annotated[
    list[str] | None,
    typer.Option(
        "--fail-on",
        help="What fails the gate: error (default), warning, info, never, or problems: vanishing, exploding, "
        "non_finite (repeatable, comma-separated).",
    ),
]
ExitZeroOption = Annotated[bool, typer.Option("--exit-zero", help="Advisory run: exit 0 even when problems are found.")]
SelectOption = Annotated[list[str] | None, typer.Option("--select", help="Only these rule codes (GC001,...).")]
IgnoreOption = Annotated[list[str] | None, typer.Option("--ignore", help="Leave out these rule codes.")]
IgnoreLayerOption = Annotated[
    list[str] | None, typer.Option("--ignore-layer", help="Leave out findings about layers matching PATTERN.")
]
DebugOption = Annotated[bool, typer.Option("--debug", help="Show the traceback behind an input error (exit 2).")]

FORMAT_OUTPUT_ORDER = "gradcheck.format_output_order"
"""``ctx.meta`` key: the parameter names of the ``--format``/``--output`` flags, in the order written."""


@dataclass
class Invocation:
    """What ``main()`` needs to know of the command line after the command ended (click's ``ctx.obj``)."""

    debug: bool = False
    """``--debug``: an input error shows the traceback of its cause."""
    distributed: bool = False
    """``--distributed``: the process ends without the interpreter's teardown (see ``outcome.exit_process``)."""
    destinations: tuple[tuple[ReportFormat, Path | None], ...] = ()
    """Each report format and its file (None: standard output) where an error document may go: before the
    outputs are checked, only the format written on the command line for standard output; once
    ``Delivery.plan`` has checked them, every one."""
    delivered: list[Path | None] = field(default_factory=list)
    """The destinations that already hold this run's report (an error after them leaves them be)."""


class RecordingCommand(TyperCommand):
    """A command that records, from click's own parse of its arguments, the order of its ``--format`` and
    ``--output`` flags and whether ``--debug`` or ``--distributed`` was given, before any value is resolved
    (a configuration or flag error raised while resolving still knows about ``--debug``)."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        opts, _, order = self.make_parser(ctx).parse_args(args=list(args))
        ctx.meta[FORMAT_OUTPUT_ORDER] = tuple(p.name for p in order if p.name in ("output_format", "output"))
        if isinstance(ctx.obj, Invocation):
            ctx.obj.debug = bool(opts.get("debug"))
            ctx.obj.distributed = opts.get("distributed") is not None
            ctx.obj.destinations = _stdout_format(opts.get("output_format"), ctx.meta[FORMAT_OUTPUT_ORDER])
        return super().parse_args(ctx, args)


def _stdout_format(given: Any, order: tuple[str, ...]) -> tuple[tuple[ReportFormat, Path | None], ...]:
    """The one format written on the command line without an ``--output`` after it (it goes to standard
    output), for an error before the outputs are checked; none when that is not clear."""
    values = [given] if isinstance(given, str) else list(given or ())
    choices = {f.value for f in ReportFormat}
    unpaired = [
        value
        for value, index in zip(values, (i for i, name in enumerate(order) if name == "output_format"), strict=False)
        if not (index + 1 < len(order) and order[index + 1] == "output")
    ]
    if len(unpaired) != 1 or unpaired[0] not in choices:
        return ()
    return ((ReportFormat(unpaired[0]), None),)


def format_output_order(ctx: typer.Context) -> tuple[str, ...]:
    """``output_format``/``output`` as written on the command line (empty when nothing recorded them)."""
    order: tuple[str, ...] = ctx.meta.get(FORMAT_OUTPUT_ORDER, ())
    return order


def thresholds(vanishing_below: float | None, exploding_above: float | None) -> Thresholds:
    """``--vanishing-below``/``--exploding-above`` (the calibrated default for one left out), checked."""
    from gradcheck_cli.diagnose.rules import Thresholds

    given = {"vanishing": vanishing_below, "exploding": exploding_above}
    limits = Thresholds(**{name: value for name, value in given.items() if value is not None})
    if not (0 < limits.vanishing < 1 < limits.exploding):
        raise GradcheckError("thresholds must satisfy 0 < --vanishing-below < 1 < --exploding-above")
    return limits


def rank() -> int:
    """This process's rank under torchrun (0 alone)."""
    return int(os.environ.get("RANK", "0"))
