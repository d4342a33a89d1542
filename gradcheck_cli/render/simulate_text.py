"""The terminal view of a simulation: summary, a log-scale chart, a per-layer (or per-remedy) table."""

from __future__ import annotations

import io
import math
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from gradcheck_cli.render.chart import log_chart
from gradcheck_cli.render.numbers import number
from gradcheck_cli.simulate.report import SimulationReport

MAX_ROWS = 24
"""Deeper simulations show every k-th layer in the table (the chart and JSON show all)."""


def render_simulation_text(report: SimulationReport, *, width: int = 110) -> str:
    """Plain text, for ``--output FILE``."""
    buffer = io.StringIO()
    console = Console(file=buffer, width=width, color_system=None, force_terminal=False)
    console.print(simulation_view(report), crop=False)
    return buffer.getvalue()


def simulation_view(report: SimulationReport) -> RenderableType:
    """The whole simulation as one rich renderable."""
    parts: list[RenderableType] = [_summary(report)]
    if report.rows:
        parts.append(_compare_table(report))
    elif report.layers:
        axis = "iterations n of f" if report.mode == "map" else _unit(report) + " back from the output"
        parts.append(Text(log_chart(_series(report), x_label=axis)))
        parts.append(_layer_table(report))
    for note in report.notes:
        parts.append(Text(f"note: {note}", style="dim"))
    style = {"vanishing": "bold red", "exploding": "bold red", "stable": "bold green"}.get(report.verdict, "bold")
    parts.append(Text(f"verdict: {report.verdict}", style=style))
    return Group(*parts)


def _unit(report: SimulationReport) -> str:
    return {"map": "iterations", "rnn": "steps"}.get(report.mode, "layers")


def _summary(report: SimulationReport) -> Text:
    text = Text()
    text.append(f"gradcheck simulate · {report.mode}", style="bold")
    spec = ", ".join(f"{k}={_fmt(v)}" for k, v in report.spec.items() if v is not None and k != "depth_scale")
    text.append(f"  depth {report.depth}" + (f"; {spec}" if spec else "") + "\n")
    text.append(f"gain per {_unit(report)[:-1]} {_fmt(report.gain)}, first/last ratio ")
    text.append(_fmt(report.ratio), style="bold")
    scale = report.spec.get("depth_scale")
    if isinstance(scale, float) and report.theory is None:
        text.append(f"\n{depth_scale_words(scale, _unit(report))}")
    if report.theory is not None and report.monte_carlo is not None:
        t, m = report.theory, report.monte_carlo
        text.append(
            f"\ntheory: gain {_fmt(t.gain)}, ratio {_fmt(t.ratio)}"
            f"\nMonte Carlo ({m.seeds} seeds): gain {_fmt(m.gain)} [{_fmt(m.gain_low)} … {_fmt(m.gain_high)}], "
            f"ratio {_fmt(m.ratio)} [{_fmt(m.ratio_low)} … {_fmt(m.ratio_high)}]"
        )
        if t.depth_scale is not None:
            text.append(f"\ntheory's {depth_scale_words(t.depth_scale, _unit(report))}")
    elif report.monte_carlo is not None:
        m = report.monte_carlo
        text.append(f"\nMonte Carlo ({m.seeds} seeds): gain {_fmt(m.gain)} [{_fmt(m.gain_low)} … {_fmt(m.gain_high)}]")
    for line in crossing_lines(report):
        text.append(f"\n{line}")
    return text


def depth_scale_words(scale: float, unit: str = "layers") -> str:
    """ξ = −1/ln(gain) in words: the depth over which the gradient falls (or, negative, grows) by a factor e."""
    if scale > 0:
        return f"depth scale ξ = {_fmt(scale)} {unit}: the gradient falls by a factor e (≈ 2.72) every ξ {unit}"
    return f"depth scale ξ = {_fmt(scale)}: the gradient grows by a factor e (≈ 2.72) every {_fmt(-scale)} {unit}"


def crossing_lines(report: SimulationReport) -> list[str]:
    """Where the gradient first leaves 1e-3 … 1e3; a depth beyond the simulated one says it is extrapolated."""
    unit = _unit(report)
    lines = []
    for kind, at in report.crossings.items():
        if not at:
            continue
        where = f"crosses {'below 1e-3' if kind == 'vanishing' else 'above 1e3'} at {at} {unit}"
        if at > report.depth:
            where += f" (extrapolated: factor**k continued past --depth {report.depth})"
        lines.append(where)
    return lines


def _series(report: SimulationReport) -> dict[str, list[float]]:
    if report.theory is not None:
        return {
            "theory": [layer.theory if layer.theory is not None else math.nan for layer in report.layers],
            "Monte Carlo (median)": [layer.value for layer in report.layers],
        }
    return {"gradient": [layer.value for layer in report.layers]}


def _layer_table(report: SimulationReport) -> Table:
    table = Table(box=None, header_style="bold", pad_edge=False)
    table.add_column(_unit(report)[:-1], justify="right")
    has_theory = any(layer.theory is not None for layer in report.layers)
    has_spread = any(layer.low is not None for layer in report.layers)
    extra_keys = sorted({key for layer in report.layers for key in layer.extra})
    if has_theory:
        table.add_column("theory", justify="right")
    table.add_column("Monte Carlo" if has_spread else "value", justify="right")
    if has_spread:
        table.add_column("min … max", justify="right")
    for key in extra_keys:
        table.add_column(key.replace("_", " "), justify="right")
    step = max(1, math.ceil(len(report.layers) / MAX_ROWS))
    shown = list(report.layers[::step])
    if report.layers and shown[-1] is not report.layers[-1]:
        shown.append(report.layers[-1])
    for layer in shown:
        row: list[Any] = [str(layer.index)]
        if has_theory:
            row.append(_fmt(layer.theory))
        row.append(_fmt(layer.value))
        if has_spread:
            row.append(f"{_fmt(layer.low)} … {_fmt(layer.high)}")
        row += [_fmt(layer.extra.get(key)) for key in extra_keys]
        table.add_row(*row)
    return table


def _compare_table(report: SimulationReport) -> Table:
    table = Table(title="remedies, closest to gain 1 first", title_justify="left", box=None, header_style="bold")
    for column in ("rank", "remedy", "init", "norm", "residual", "theory gain", "gain", "first/last ratio", "verdict"):
        table.add_column(
            column, justify="right" if column in ("rank", "theory gain", "gain", "first/last ratio") else "left"
        )
    for row in report.rows:
        table.add_row(
            str(row["rank"]), str(row["remedy"]), str(row["init"]), str(row["norm"] or "–"),
            "yes" if row["residual"] else "no", _fmt(row["theory_gain"]), _fmt(row["gain"]), _fmt(row["ratio"]),
            str(row["verdict"]),
        )  # fmt: skip
    return table


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return number(value, ".4g")
    return str(value)
