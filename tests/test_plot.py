"""``--plot``: the pictures of inspect and simulate reports (render/plot.py, drawn by render/charts)."""

from __future__ import annotations

import itertools
import math
import struct
import subprocess
import sys
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from gradcheck_cli.api import check
from gradcheck_cli.errors import GradcheckError
from gradcheck_cli.load.batch import Batch
from gradcheck_cli.load.examples import get_example, mlp
from gradcheck_cli.render import plot
from gradcheck_cli.render.charts import engine, layer_axis, logaxis, simulation
from gradcheck_cli.render.charts.inspect_figure import draw_report, report_figure_size
from gradcheck_cli.render.charts.layers import measured_points
from gradcheck_cli.report.report import Report
from gradcheck_cli.simulate.chain import simulate_chain
from gradcheck_cli.simulate.logistic import simulate_logistic_map
from gradcheck_cli.simulate.network import NetworkSpec, simulate_compare, simulate_network
from gradcheck_cli.simulate.report import SimulationReport
from gradcheck_cli.simulate.rnn import simulate_rnn

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _example(name: str, **kwargs: Any) -> Report:
    model, batch = get_example(name).build(0)
    return check(model, batch, verify=False, **kwargs)


@pytest.fixture(scope="module")
def relu_xavier() -> Report:
    return _example("relu-xavier")


@pytest.fixture(scope="module")
def gpt2() -> Report:
    from zoo import hf_gpt2

    model, batch = hf_gpt2(True)
    return check(model, batch, verify=False)


@pytest.fixture(scope="module")
def exploding_steps() -> Report:
    """SGD at lr 2 on a small tanh regressor: the optimisation probe explodes from step 3."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 16, generator=g), torch.randn(64, 1, generator=g)
    torch.manual_seed(0)
    model = mlp(4, 32, nn.Tanh, None, in_features=16, out_features=1)
    return check(model, Batch(args=(x,), target=y), verify=False, steps=8, lr=2.0)


def _draw(function: Callable[[Any, Path], None], report: Any, path: Path) -> bytes:
    """Draw with every warning an error: a missing glyph or a collapsed layout fails the test."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        function(report, path)
    return path.read_bytes()


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def _ids(svg: Path, prefix: str) -> list[str]:
    root = ET.parse(svg).getroot()
    return [e.get("id", "") for e in root.iter() if e.get("id", "").startswith(prefix)]


def _expected_px(size: tuple[float, float]) -> tuple[int, int]:
    return round(size[0] * engine.DPI), round(size[1] * engine.DPI)


def _assert_size(data: bytes, size: tuple[float, float]) -> None:
    width, height = _png_size(data)
    want_w, want_h = _expected_px(size)
    assert abs(width - want_w) <= 1 and abs(height - want_h) <= 1, ((width, height), (want_w, want_h))


# ---------------------------------------------------------------- inspect


def test_png_has_the_signature_and_the_size_the_layer_count_asks_for(relu_xavier: Report, tmp_path: Path) -> None:
    data = _draw(plot.plot_report, relu_xavier, tmp_path / "flow.png")
    assert len(data) > 20_000
    _assert_size(data, report_figure_size(relu_xavier))
    small = _example("dead-relu")
    assert report_figure_size(small)[0] < report_figure_size(relu_xavier)[0]  # width follows depth


def test_svg_draws_one_point_per_measured_layer(relu_xavier: Report, gpt2: Report, tmp_path: Path) -> None:
    for report, n in ((relu_xavier, 50), (gpt2, 28)):
        assert len(report.layers) == n
        svg = tmp_path / "flow.svg"
        _draw(plot.plot_report, report, svg)
        points = _ids(svg, "layer-point-")
        assert sorted(points) == sorted(f"layer-point-{i}" for i in range(n))
        assert measured_points(report) == n


def test_a_layer_without_a_measurement_is_not_drawn(relu_xavier: Report, tmp_path: Path) -> None:
    layers = list(relu_xavier.layers)
    layers[10] = replace(layers[10], act_grad_rel=None, act_grad_norm=None)
    svg = tmp_path / "gap.svg"
    _draw(plot.plot_report, replace(relu_xavier, layers=tuple(layers)), svg)
    points = _ids(svg, "layer-point-")
    assert len(points) == 49 and "layer-point-10" not in points


def test_a_layer_that_received_no_gradient_is_drawn_at_the_bottom(relu_xavier: Report, tmp_path: Path) -> None:
    layers = list(relu_xavier.layers)
    layers[3] = replace(layers[3], act_grad_rel=None, act_grad_norm=None, flags=("no_gradient",))
    blocked = replace(relu_xavier, layers=tuple(layers))
    svg = tmp_path / "blocked.svg"
    _draw(plot.plot_report, blocked, svg)
    assert "layer-point-3" in _ids(svg, "layer-point-") and measured_points(blocked) == 50
    assert "received no gradient" in svg.read_text(encoding="utf-8")  # the side column says what the circle is


def test_a_deep_model_names_at_most_25_layers_without_overlap(relu_xavier: Report, tmp_path: Path) -> None:
    svg = tmp_path / "deep.svg"
    _draw(plot.plot_report, relu_xavier, svg)
    ticks = _ids(svg, "layer-tick-")
    assert 10 <= len(ticks) <= layer_axis.MAX_TICKS
    ticks_of = layer_axis.layer_ticks([layer.name for layer in relu_xavier.layers])
    assert ticks_of[0].start == 0 and ticks_of[-1].end == 49  # the input and output ends keep their names
    _assert_tick_labels_do_not_overlap(relu_xavier)


def _assert_tick_labels_do_not_overlap(report: Report) -> None:
    """Rotated labels are parallel strips: they stay apart when the gap between their anchors, measured
    across the strips (dx·sin θ), is at least one line of text."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    figure = draw_report(report)
    try:
        canvas = FigureCanvasAgg(figure)
        canvas.draw()
        main = figure.axes[0]
        labels = [label for label in main.get_xticklabels() if label.get_text()]
        assert labels
        anchors = [main.transData.transform((label.get_position()[0], 1.0))[0] for label in labels]
        angle = math.radians(labels[0].get_rotation())
        line = labels[0].get_fontsize() / 72 * figure.dpi * 1.15
        gaps = [(b - a) * math.sin(angle) for a, b in itertools.pairwise(anchors)]
        assert min(gaps) >= line, (min(gaps), line)
        assert 20 <= labels[0].get_rotation() <= 90
    finally:
        figure.clear()


def _transformer(blocks: int, base: Report) -> Report:
    """A synthetic GPT-2-shaped report with ``blocks`` blocks of six layers each (names only matter)."""
    names = ["transformer.wte", "transformer.wpe"]
    for b in range(blocks):
        names += [f"transformer.h.{b}.{part}" for part in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc",
                                                          "mlp.c_proj")]  # fmt: skip
    names += ["transformer.ln_f", "lm_head"]
    template = base.layers[0]
    layers = tuple(
        replace(template, name=name, position=i, act_grad_rel=0.9 ** (len(names) - 1 - i), flags=())
        for i, name in enumerate(names)
    )
    return replace(base, layers=layers)


def test_transformer_layers_are_named_by_block(gpt2: Report, tmp_path: Path) -> None:
    assert layer_axis.block_key("transformer.h.3.attn.c_attn") == "transformer.h.3"
    assert layer_axis.block_key("layer2.1.conv1") == "layer2.1"
    assert layer_axis.block_key("lm_head") == "lm_head"
    assert layer_axis.block_key("7") == "7"

    report = _transformer(12, gpt2)  # 76 layers
    names = [layer.name for layer in report.layers]
    ticks = layer_axis.layer_ticks(names)
    labels = [t.label for t in ticks]
    assert len(ticks) <= layer_axis.MAX_TICKS
    assert [f"transformer.h.{b}.*" for b in range(12)] == [label for label in labels if ".h." in label]
    h3 = next(t for t in ticks if t.label == "transformer.h.3.*")
    assert names[h3.start] == "transformer.h.3.ln_1" and names[h3.end] == "transformer.h.3.mlp.c_proj"
    assert labels[-1] == "lm_head" and labels[0] == "transformer.wte"
    centres = [t.centre for t in ticks]
    assert min(b - a for a, b in itertools.pairwise(centres)) >= len(names) / layer_axis.MAX_TICKS
    _assert_tick_labels_do_not_overlap(report)

    deep = _transformer(48, gpt2)  # 292 layers, more blocks than labels
    deep_ticks = layer_axis.layer_ticks([layer.name for layer in deep.layers])
    assert 10 <= len(deep_ticks) <= layer_axis.MAX_TICKS
    assert all(t.label.startswith("transformer.h.") for t in deep_ticks[1:-1])
    svg = tmp_path / "deep-transformer.svg"
    _draw(plot.plot_report, deep, svg)
    assert len(_ids(svg, "layer-point-")) == 292
    assert len(_ids(svg, "layer-tick-")) == len(deep_ticks)
    assert report_figure_size(deep)[0] <= 15.0 + engine.SIDE_WIDTH  # width grows with depth, within limits


def test_zeros_and_nan_are_drawn_as_marked_points(relu_xavier: Report, tmp_path: Path) -> None:
    layers = list(relu_xavier.layers)
    for i in range(5):
        layers[i] = replace(layers[i], act_grad_rel=0.0, act_grad_norm=0.0)
    underflow = replace(relu_xavier, layers=tuple(layers))
    svg = tmp_path / "zeros.svg"
    _draw(plot.plot_report, underflow, svg)
    assert len(_ids(svg, "layer-point-")) == 50  # zeros are drawn, at the bottom of the axis

    nan = _example("nan-weight")
    svg = tmp_path / "nan.svg"
    _draw(plot.plot_report, nan, svg)
    assert len(_ids(svg, "layer-point-")) == len(nan.layers) == 4
    scale = logaxis.log_scale([1e-3, 0.0, math.nan, 1.0])
    assert scale.zero_y is not None and scale.zero_y < 1e-3 and scale.place(0.0) == scale.zero_y
    assert scale.bad_y is not None and scale.bad_y > 1.0 and scale.place(math.inf) == scale.bad_y


def test_a_module_called_many_times_gets_a_gradient_through_time_panel(tmp_path: Path) -> None:
    """A cell run 40 times whose gradient underflowed to 0 for the first 15 calls (as in rnn-vanishing)."""
    report = _example("dead-relu")
    through_time = tuple([0.0] * 15 + [0.5**k for k in range(25, 0, -1)])
    cell = replace(report.layers[0], calls=40, act_grad_norms=through_time)
    recurrent = replace(report, layers=(cell, *report.layers[1:]))
    data = _draw(plot.plot_report, recurrent, tmp_path / "rnn.png")
    _assert_size(data, report_figure_size(recurrent))
    assert report_figure_size(recurrent)[1] > report_figure_size(report)[1]  # one more panel
    svg = tmp_path / "rnn.svg"
    _draw(plot.plot_report, recurrent, svg)
    assert _ids(svg, "call-series-0") == ["call-series-0"]


def test_optimisation_panel_marks_the_onset(exploding_steps: Report, tmp_path: Path) -> None:
    trace = exploding_steps.optimisation
    assert trace is not None and trace.verdict == "exploding" and trace.onset_step == 1
    svg = tmp_path / "steps.svg"
    _draw(plot.plot_report, exploding_steps, svg)
    assert _ids(svg, "onset-line") == ["onset-line"]
    data = _draw(plot.plot_report, exploding_steps, tmp_path / "steps.png")
    _assert_size(data, report_figure_size(exploding_steps))
    without = replace(exploding_steps, optimisation=None)
    assert report_figure_size(exploding_steps)[1] > report_figure_size(without)[1]


def test_pdf_and_svg_come_out_the_same_every_time(relu_xavier: Report, tmp_path: Path) -> None:
    """Deterministic files (no dates, fixed SVG ids) and text kept as text in the SVG."""
    first, second = tmp_path / "a.svg", tmp_path / "b.svg"
    _draw(plot.plot_report, relu_xavier, first)
    _draw(plot.plot_report, relu_xavier, second)
    assert first.read_bytes() == second.read_bytes()
    assert "<text" in first.read_text(encoding="utf-8") and "layers in forward order" in first.read_text("utf-8")
    pdf = _draw(plot.plot_report, relu_xavier, tmp_path / "flow.pdf")
    assert pdf.startswith(b"%PDF") and pdf == _draw(plot.plot_report, relu_xavier, tmp_path / "again.pdf")


# ---------------------------------------------------------------- errors


def test_wrong_suffix_is_a_one_line_error_naming_both_formats(relu_xavier: Report, tmp_path: Path) -> None:
    for name in ("flow.gif", "flow", "flow.png.txt"):
        with pytest.raises(GradcheckError) as caught:
            plot.plot_report(relu_xavier, tmp_path / name)
        message = str(caught.value)
        assert ".png" in message and ".svg" in message and ".pdf" in message and "\n" not in message
        assert not (tmp_path / name).exists()
    assert plot.plot_format(Path("FLOW.PNG")) == "png" and plot.plot_format(Path("a.b.svg")) == "svg"
    assert plot.plot_format(Path("flow.pdf")) == "pdf"


def test_matplotlib_is_imported_only_when_a_picture_is_drawn() -> None:
    """``gradcheck --version`` and ``history`` stay fast: importing the renderers does not import matplotlib."""
    code = (
        "import sys, gradcheck_cli.render.plot, gradcheck_cli.render.html, gradcheck_cli.render.registry; "
        "print('matplotlib' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_drawing_leaves_matplotlib_global_state_alone(relu_xavier: Report, tmp_path: Path) -> None:
    import matplotlib

    backend = matplotlib.get_backend()
    before = dict(matplotlib.rcParams)
    _draw(plot.plot_report, relu_xavier, tmp_path / "flow.png")
    assert matplotlib.get_backend() == backend
    assert dict(matplotlib.rcParams) == before
    if "matplotlib.pyplot" in sys.modules:  # another test may have imported it; then no figure may be left open
        import matplotlib.pyplot as plt

        assert plt.get_fignums() == []


# ---------------------------------------------------------------- simulate


@pytest.fixture(scope="module")
def simulations() -> dict[str, SimulationReport]:
    """One report per mode, called as ``gradcheck simulate`` calls them, kept small."""
    spec = NetworkSpec(depth=6, activation="relu", init="xavier_normal", width=8, seeds=1)
    return {
        "chain": simulate_chain(50, 0.8),
        "underflow": simulate_chain(400, 0.1),
        "network": simulate_network(spec),
        "compare": simulate_compare(spec),
        "rnn": simulate_rnn(20, 0.5, hidden=8, seeds=1),
        "map": simulate_logistic_map(3.5, 6),
    }


def test_every_simulation_mode_draws_a_png(simulations: dict[str, SimulationReport], tmp_path: Path) -> None:
    for name, report in simulations.items():
        data = _draw(plot.plot_simulation, report, tmp_path / f"{name}.png")
        assert len(data) > 10_000, name
        _assert_size(data, simulation.simulation_figure_size(report))


def test_simulation_svgs_hold_the_expected_lines(simulations: dict[str, SimulationReport], tmp_path: Path) -> None:
    compare = simulations["compare"]
    svg = tmp_path / "compare.svg"
    _draw(plot.plot_simulation, compare, svg)
    assert sorted(_ids(svg, "remedy-line-")) == sorted(f"remedy-line-{row['rank']}" for row in compare.rows)
    assert len(compare.rows) == 7

    svg = tmp_path / "network.svg"
    _draw(plot.plot_simulation, simulations["network"], svg)
    assert _ids(svg, "theory-line") == ["theory-line"] and _ids(svg, "monte-carlo-line") == ["monte-carlo-line"]

    for name, gid in (("chain", "chain-line"), ("rnn", "monte-carlo-line"), ("map", "map-max-line")):
        svg = tmp_path / f"{name}.svg"
        _draw(plot.plot_simulation, simulations[name], svg)
        assert _ids(svg, gid) == [gid], name


def test_simulation_wrong_suffix(simulations: dict[str, SimulationReport], tmp_path: Path) -> None:
    with pytest.raises(GradcheckError, match=r"\.png, \.svg or \.pdf"):
        plot.plot_simulation(simulations["chain"], tmp_path / "chain.jpg")
