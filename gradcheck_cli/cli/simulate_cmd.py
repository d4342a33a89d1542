"""``gradcheck simulate``: how gradients shrink or grow with depth, from the chain product to random networks."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from gradcheck_cli.cli.console import report_console, status
from gradcheck_cli.cli.delivery import check_plot_suffix, draw, write
from gradcheck_cli.errors import GradcheckError
from gradcheck_cli.outputs import check_distinct


class OutputFormat(str, Enum):
    """Report formats of ``simulate``."""

    text = "text"
    json = "json"


def simulate(
    depth: Annotated[int, typer.Option(help="Number of layers (or chain factors).")] = 50,
    factor: Annotated[float | None, typer.Option(help="Chain mode: the gradient after k layers is factor**k.")] = None,
    activation: Annotated[
        str, typer.Option(help="Network mode: linear, relu, leaky_relu, tanh, sigmoid, gelu, silu, elu.")
    ] = "relu",
    init: Annotated[
        str,
        typer.Option(
            help="Network mode: normal, default, xavier_uniform, xavier_normal, kaiming_uniform, kaiming_normal, "
            "orthogonal."
        ),
    ] = "default",
    width: Annotated[int, typer.Option(help="Network mode: units per layer.")] = 256,
    weight_scale: Annotated[float, typer.Option(help="Multiply every weight by this after init.")] = 1.0,
    bias_std: Annotated[
        float | None, typer.Option(help="Biases ~ N(0, B²) (default: zero, or PyTorch's for default init).")
    ] = None,
    residual: Annotated[bool, typer.Option("--residual", help="Shortcut x + f(x) around every layer.")] = False,
    norm: Annotated[str | None, typer.Option(help="Normalise before every layer: batch or layer.")] = None,
    seeds: Annotated[int, typer.Option(help="Monte Carlo: random networks per configuration.")] = 3,
    seed: Annotated[int, typer.Option(min=0, max=2**32 - 1, help="First random seed.")] = 0,
    compare: Annotated[
        bool, typer.Option("--compare", help="Each remedy side by side, ranked by gain closeness to 1.")
    ] = False,
    map_name: Annotated[str | None, typer.Option("--map", help="The iterated map to illustrate: logistic.")] = None,
    r: Annotated[float, typer.Option("--r", help="Logistic map parameter r in f(x) = r·x(1−x).")] = 3.5,
    iterations: Annotated[int, typer.Option(help="Logistic map: number of iterations.")] = 6,
    rnn: Annotated[
        bool, typer.Option("--rnn", help="Backpropagation through time in a random recurrent cell.")
    ] = False,
    steps: Annotated[int, typer.Option(help="RNN mode: time steps.")] = 100,
    radius: Annotated[float, typer.Option(help="RNN mode: spectral radius of the recurrent matrix.")] = 1.0,
    cell: Annotated[str, typer.Option(help="RNN mode: rnn (tanh), lstm, gru, or linear (exactly ρ per step).")] = "rnn",
    hidden: Annotated[int, typer.Option(help="RNN mode: hidden units.")] = 128,
    output_format: Annotated[OutputFormat, typer.Option("--format", "-f", help="Report format.")] = OutputFormat.text,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write the report to this file.")] = None,
    plot: Annotated[
        Path | None, typer.Option("--plot", help="Draw the simulation to FILE.png, FILE.svg or FILE.pdf.")
    ] = None,
) -> None:
    """Show how gradients shrink or grow with depth: the chain product, mean-field theory and real random nets."""
    modes = [flag for flag, on in (("--factor", factor is not None), ("--map", map_name is not None), ("--rnn", rnn),
                                   ("--compare", compare)) if on]  # fmt: skip
    if len(modes) > 1:
        raise GradcheckError(f"choose one mode: {' and '.join(modes)} cannot be combined")
    if factor is not None:
        from gradcheck_cli.simulate.chain import simulate_chain

        report: Any = simulate_chain(depth, factor)
    elif map_name is not None:
        if map_name != "logistic":
            raise GradcheckError(f"--map {map_name!r}: the only map is 'logistic'")
        from gradcheck_cli.simulate.logistic import simulate_logistic_map

        report = simulate_logistic_map(r, iterations)
    else:
        with status("simulating random networks…"):
            if rnn:
                from gradcheck_cli.simulate.rnn import simulate_rnn

                report = simulate_rnn(steps, radius, cell=cell, hidden=hidden, seeds=seeds, seed=seed)
            else:
                from gradcheck_cli.simulate.network import NetworkSpec, simulate_compare, simulate_network

                spec = NetworkSpec(
                    depth=depth, activation=activation, init=init, width=width, weight_scale=weight_scale,
                    bias_std=bias_std, residual=residual, norm=norm, seeds=seeds, seed=seed,
                )  # fmt: skip
                report = simulate_compare(spec) if compare else simulate_network(spec)
    check_plot_suffix(plot)
    if plot is not None and output is not None:
        check_distinct((plot, output), "--plot and --output name the same file; give each its own")
    _emit(report, output_format, output)
    if plot is not None:
        draw(report, plot)


def _emit(report: Any, output_format: OutputFormat, output: Path | None) -> None:
    from gradcheck_cli.render.json import render_json
    from gradcheck_cli.render.simulate_text import render_simulation_text, simulation_view

    if output_format is OutputFormat.json:
        write(render_json(report), output)
    elif output is None:
        report_console().print(simulation_view(report), crop=False)
    else:
        write(render_simulation_text(report), output)
