"""``gradcheck history``: judge a training run's recorded gradients. It imports no torch."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from gradcheck_cli.cli.console import status
from gradcheck_cli.cli.delivery import Delivery
from gradcheck_cli.cli.gating import Gate
from gradcheck_cli.cli.options import (
    DebugOption,
    ExitZeroOption,
    FailOnOption,
    FormatsOption,
    IgnoreLayerOption,
    IgnoreOption,
    OutputsOption,
    SelectOption,
    thresholds,
)
from gradcheck_cli.render.registry import ReportFormat


def history(
    ctx: typer.Context,
    log: Annotated[Path, typer.Argument(help="The JSON-lines file written by watch(model, log=...) or a callback.")],
    output_format: FormatsOption = None,
    output: OutputsOption = None,
    fail_on: FailOnOption = None,
    exit_zero: ExitZeroOption = False,
    select: SelectOption = None,
    ignore: IgnoreOption = None,
    ignore_layer: IgnoreLayerOption = None,
    vanishing_below: Annotated[
        float,
        typer.Option(help="Flag vanishing when the input-end gradient is below this fraction of the output's."),
    ] = 1e-3,
    exploding_above: Annotated[
        float,
        typer.Option(help="Flag exploding when the input-end gradient is above this multiple of the output's."),
    ] = 1e3,
    plot: Annotated[
        Path | None, typer.Option("--plot", help="Draw the per-step charts to FILE.png, FILE.svg or FILE.pdf.")
    ] = None,
    debug: DebugOption = False,
) -> None:
    """Judge a training run's gradient history: the onset step of each problem, the layers, the trend, the fixes."""
    gate = Gate.of(fail_on, select, ignore, ignore_layer, exit_zero)
    limits = thresholds(vanishing_below, exploding_above)
    delivery = Delivery.plan(ctx, output_format or [ReportFormat.text], output or [], (log,), plot)
    with status("reading the history…"):
        from gradcheck_cli.training.history import history_report

        report = history_report(log, limits)
    report = gate.policy.apply(report)
    delivery.deliver(report)
    raise typer.Exit(gate.exit_code(report))
