"""Where the reports and charts of a run go, checked before any work, and writing them there.

Every destination of a run is planned once, by :meth:`Delivery.plan`, for ``inspect`` and ``history``
alike: no two outputs on one file, none on an input or inside an input directory, the GitHub step summary
not on an input either, and a chart file that ends in ``.png``, ``.svg`` or ``.pdf``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from gradcheck_cli.cli.console import report_console
from gradcheck_cli.cli.options import Invocation, format_output_order
from gradcheck_cli.errors import GradcheckError
from gradcheck_cli.outputs import OutputGuard, check_distinct, write_text, write_with
from gradcheck_cli.render.registry import ReportFormat, renderer
from gradcheck_cli.render.view import status_line


@dataclass(frozen=True)
class Delivery:
    """Each report format and its file (None: standard output), and the chart's file."""

    formats: tuple[ReportFormat, ...]
    destinations: tuple[Path | None, ...]
    plot: Path | None
    invocation: Invocation | None = field(default=None, compare=False)
    """Where the plan is recorded for an error document, and each delivered destination ticked off."""

    @classmethod
    def plan(
        cls,
        ctx: typer.Context,
        formats: Sequence[ReportFormat],
        outputs: Sequence[Path],
        inputs: Iterable[Path | None],
        plot: Path | None,
        write_baseline: Path | None = None,
    ) -> Delivery:
        """The run's outputs, refused (exit 2) when two name one file or one would land on an input."""
        destinations = _destinations(formats, outputs, format_output_order(ctx))
        named = [("--output", d) for d in destinations] + [("--write-baseline", write_baseline), ("--plot", plot)]
        written = [(flag, path) for flag, path in named if path is not None]
        check_distinct(path for _, path in written)
        guard = OutputGuard.of(inputs)
        for flag, path in written:
            guard.check(path, flag)
        summary = os.environ.get("GITHUB_STEP_SUMMARY")
        if summary and ReportFormat.github in formats:  # --format github appends to it
            guard.check(Path(summary), "$GITHUB_STEP_SUMMARY")
        check_plot_suffix(plot)
        invocation = ctx.obj if isinstance(ctx.obj, Invocation) else None
        if invocation is not None:  # checked: an error from here on writes its document to each of them
            invocation.destinations = tuple(zip(formats, destinations, strict=True))
        return cls(tuple(formats), tuple(destinations), plot, invocation)

    def deliver(self, report: Any) -> None:
        """Every format rendered to its destination, then the chart."""
        for kind, destination in zip(self.formats, self.destinations, strict=True):
            _emit(report, kind, destination)
            if self.invocation is not None:
                self.invocation.delivered.append(destination)
        if self.plot is not None:
            draw(report, self.plot)


def _destinations(formats: Sequence[ReportFormat], outputs: Sequence[Path], order: Sequence[str]) -> list[Path | None]:
    """Each format's --output, None for stdout; at most one format may go to stdout.

    An ``--output`` belongs to the ``--format`` written before it on the command line (``order``: the
    parameter names as click parsed them), so ``-f github -f sarif -o g.sarif`` sends SARIF to the file and
    the workflow commands to stdout. Formats from the configuration take the outputs in turn.
    """
    if len(outputs) > len(formats):
        raise GradcheckError(f"{len(outputs)} --output for {len(formats)} --format; give one --format per --output")
    if order.count("output_format") == len(formats) and order.count("output") == len(outputs):
        destinations: list[Path | None] = []
        remaining = list(outputs)
        for index, name in enumerate(order):
            if name == "output_format":
                follows = index + 1 < len(order) and order[index + 1] == "output"
                destinations.append(remaining.pop(0) if follows else None)
            elif index == 0 or order[index - 1] != "output_format":
                raise GradcheckError("each --output must follow the --format it is for")
    else:
        destinations = [*outputs, *[None] * (len(formats) - len(outputs))]
    if destinations.count(None) > 1:
        raise GradcheckError("only one --format can go to stdout; give the others an --output FILE")
    return destinations


def check_plot_suffix(path: Path | None) -> None:
    """Before any work: ``--plot`` draws PNG, SVG or PDF, chosen by the file's suffix."""
    from gradcheck_cli.render.plot import plot_format  # imports no matplotlib

    if path is not None:
        plot_format(path)


def draw(report: Any, path: Path) -> None:
    """``--plot``: the picture of ``report`` (inspect or simulate) drawn to ``path``; one stderr line says where."""
    from gradcheck_cli.render.plot import plot_report, plot_simulation
    from gradcheck_cli.render.printable import printable
    from gradcheck_cli.report.report import Report

    chart = plot_report if isinstance(report, Report) else plot_simulation
    report = printable(report)
    write_with(path, lambda temporary: chart(report, temporary), "--plot")
    Console(stderr=True, highlight=False).print(f"gradcheck: chart written to {path}", markup=False)


def write(rendered: str, output: Path | None) -> None:
    """``rendered`` to ``output``, or to standard output."""
    if output is None:
        sys.stdout.write(rendered)
        return
    write_text(output, rendered)


def _emit(report: Any, kind: ReportFormat, output: Path | None) -> None:
    """Render one format to its destination; GitHub output also appends the step summary when CI sets one.

    Every format but JSON (whose encoder escapes them) shows the file's names with control characters escaped.
    """
    from gradcheck_cli.render.printable import printable

    report = report if kind is ReportFormat.json else printable(report)
    if kind is ReportFormat.text and output is None:
        from gradcheck_cli.render.text import text_report

        report_console().print(text_report(report), crop=False)  # code lines are never cut
        return
    write(renderer(kind)(report), output)
    if kind is ReportFormat.github and os.environ.get("GITHUB_STEP_SUMMARY"):
        _append_step_summary(report, Path(os.environ["GITHUB_STEP_SUMMARY"]))
    if output is not None:
        verdict = status_line(report)
        Console(stderr=True, highlight=False).print(f"gradcheck: {verdict}; {kind.value} report written to {output}")


def _append_step_summary(report: Any, summary: Path) -> None:
    from gradcheck_cli.render.github import render_step_summary

    try:
        with summary.open("a", encoding="utf-8") as handle:
            handle.write(render_step_summary(report))
    except OSError as exc:
        raise GradcheckError(f"cannot append to $GITHUB_STEP_SUMMARY {summary}: {exc.strerror or exc}") from None
