"""``--plot FILE.png|FILE.svg|FILE.pdf``: the inspect (or history) picture, or the simulation's, to a file.

The pictures are drawn by :mod:`gradcheck_cli.render.charts` (matplotlib); the format follows the file's
suffix. The picture is rendered in memory first, so a failed drawing never leaves half a file behind.
"""

from __future__ import annotations

from pathlib import Path

from gradcheck_cli.errors import GradcheckError
from gradcheck_cli.render.charts.engine import FORMATS, render
from gradcheck_cli.report.report import Report
from gradcheck_cli.simulate.report import SimulationReport


def plot_format(path: Path) -> str:
    """``png``, ``svg`` or ``pdf`` from the file name's suffix; anything else is a one-line error."""
    fmt = FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise GradcheckError(f"--plot {path}: the picture's name must end in .png, .svg or .pdf")
    return fmt


def plot_report(report: Report, path: Path) -> None:
    """Draw the inspect report (or a training history's) to ``path``."""
    from gradcheck_cli.render.charts.inspect_figure import draw_report

    fmt = plot_format(path)
    Path(path).write_bytes(render(lambda: draw_report(report), fmt))


def plot_simulation(report: SimulationReport, path: Path) -> None:
    """Draw a ``simulate`` report (chain, network, compare, rnn or map mode) to ``path``."""
    from gradcheck_cli.render.charts.simulation import draw_simulation

    fmt = plot_format(path)
    Path(path).write_bytes(render(lambda: draw_simulation(report), fmt))
