"""The page's "Gradient along the path" section: the attenuation in words, the per-layer chart, and a
through-time chart for each layer that ran several times (or fused RNN)."""

from __future__ import annotations

import math

from gradcheck_cli.render.charts.layers import drawn_indices, layer_values, point_kind
from gradcheck_cli.render.html.figures import layer_chart_svg, time_chart_svg
from gradcheck_cli.render.html.markup import code, e, num, plural
from gradcheck_cli.render.numbers import number
from gradcheck_cli.render.view import measure_label, through_time, unfollowed_path
from gradcheck_cli.report.report import Report

MAX_TIME_CHARTS = 4
"""Layers that run several times (or fused RNNs) get a through-time chart each, at most this many."""


def path_sentence(report: Report) -> str:
    """The attenuation from the output end to the input end, and the gain per layer, as HTML."""
    path = report.path
    if path.attenuation is None:
        return unfollowed_path(report)
    what = measure_label(path.measured_with)
    return (
        f"{what} at the input end ({code(path.first_layer or '?')}) ÷ output end ({code(path.last_layer or '?')}) "
        f"= <strong>{num(path.attenuation)}</strong> over {path.length} calls, "
        f"gain <strong>{num(path.gain)}</strong> per layer"
    )


def path_section(report: Report) -> str:
    """The section's HTML: sentence, per-layer chart with its caption, the through-time charts."""
    indices = drawn_indices(report)
    kinds = [point_kind(report.layers[i], v) for i, v in zip(indices, layer_values(report), strict=True)]
    plotted = sum(kind is not None for kind in kinds)
    flagged = sum(kind in ("flagged", "zero", "nonfinite", "nograd") for kind in kinds)
    skipped = len(report.layers) - plotted
    what = (
        "‖∂L/∂h‖, the gradient at each layer's output, divided by the output end's"
        if report.path.measured_with == "activation_gradients"
        else "‖∂L/∂W‖/‖W‖ of each layer divided by the last layer's (module hooks could not fire)"
    )
    series = through_time(report)
    caption = [
        f"{e(what)}; input end left, output end right, log scale. {plural(plotted, 'layer')} plotted",
        f", {flagged} flagged" if flagged else "",
        f"; {plural(skipped, 'layer')} without a measurement left out" if skipped else "",
        ". The shaded bands lie beyond the thresholds",
        "; a vertical bar spans a layer's calls (each call is charted below)"
        if any(t.unit == "call" for t in series)
        else "; the dash-dotted line is the fitted gain per layer"
        if report.path.gain is not None and report.path.attenuation is not None
        else "",
        ". Hover a point for its layer and value; click it to jump to its row in the table.",
    ]
    parts = [
        f"<p>{path_sentence(report)}</p>",
        f"<figure>{layer_chart_svg(report)}<figcaption>{''.join(caption)}</figcaption></figure>",
    ]
    for k, one in enumerate(series[:MAX_TIME_CHARTS]):
        finite = [v for v in one.values if math.isfinite(v)]
        zeros = sum(1 for v in one.values if v == 0)
        detail = f"{plural(len(one.values), one.unit)}"
        if finite:
            detail += f", from {number(finite[0], '.2g')} (first) to {number(finite[-1], '.2g')} (last)"
        if zeros:
            detail += f"; {zeros} underflowed to exactly 0"
        parts.append(
            f"<h3>Through time: {code(report.layers[one.index].name or '(root)')}</h3>"
            f"<figure>{time_chart_svg(report, one, k)}<figcaption>{e(detail)}</figcaption></figure>"
        )
    if len(series) > MAX_TIME_CHARTS:
        parts.append(
            f"<p class='muted'>{len(series) - MAX_TIME_CHARTS} more layers run several times (see the JSON report)</p>"
        )
    return "\n".join(parts)
