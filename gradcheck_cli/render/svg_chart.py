"""Hand-written SVG charts for the HTML report: the gradient along the path, and the optimiser steps.

No plotting library: the output is a small, well-formed SVG fragment (it parses as XML) meant to be
inlined in an HTML page. It has no ``xmlns`` attribute, so that the page holds no URL at all; HTML
parsers put inline ``<svg>`` in the SVG namespace by themselves. Text uses ``currentColor``, so the
chart follows the page's light or dark colours; the data colours read on both.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from html import escape

from gradcheck_cli.render.numbers import number
from gradcheck_cli.render.steps_chart import PROBLEM_WORDS, onset_problems, shown_rows, steps_view
from gradcheck_cli.render.view import forward_order, relative_gradients
from gradcheck_cli.report.report import LayerStats, Report
from gradcheck_cli.report.sections import OptimisationTrace, TrainingHistory

BLUE = "#3b7dd8"
RED = "#e03131"
ORANGE = "#e8590c"
GREY = "#868e96"
GREEN = "#2f9e44"
BAND = "#e03131"

LABEL_SPACING = 22
"""Minimum pixels between two layer labels on the x axis; deeper models get every k-th label."""
LABEL_CHARS = 20
"""Layer labels longer than this keep their tail (``…h.3.attn.c_attn``); the tooltip has the whole name."""
DECADE_SPACING = 16
"""Minimum pixels between two decade labels on the y axis."""
CHAR_WIDTH = 6.6
"""Approximate width of one character at the chart's font size, for layout."""
MAX_HISTORY_POINTS = 300
"""A training history's chart and table show at most this many records (first, onsets and last kept)."""


@dataclass(frozen=True)
class ChartPoint:
    """One plotted layer: its value relative to the output end and how to draw it."""

    index: int
    """Index into ``report.layers`` (the HTML table's row is ``#L{index}``)."""
    layer: LayerStats
    value: float | None
    """Relative gradient (output end = 1); 0 underflow, NaN/inf non-finite, None no gradient."""
    kind: str
    """``ok``, ``flagged``, ``zero`` (underflowed to 0), ``nonfinite`` (NaN/Inf) or ``nograd``."""
    calls: tuple[float, ...] = ()
    """Multi-call layers: each call's relative value, in forward order."""


def chart_points(report: Report) -> list[ChartPoint]:
    """The layers the chart plots, input end first: every layer with a measurement, or flagged without one."""
    values = relative_gradients(report)
    out_end = _output_norm(report)
    points = []
    for i in forward_order(report):
        layer = report.layers[i]
        value = values.get(i)
        if value is None and not ({"no_gradient", "non_finite"} & set(layer.flags)):
            continue
        if "non_finite" in layer.flags or (value is not None and not math.isfinite(value)):
            kind = "nonfinite"
        elif value is None:
            kind = "nograd"
        elif value == 0:
            kind = "zero"
        elif layer.flags:
            kind = "flagged"
        else:
            kind = "ok"
        calls: tuple[float, ...] = ()
        if out_end and len(layer.act_grad_norms) > 1:
            calls = tuple(v / out_end for v in layer.act_grad_norms)
        points.append(ChartPoint(i, layer, value, kind, calls))
    return points


def _output_norm(report: Report) -> float | None:
    """‖∂L/∂h‖ at the output end, recovered from any layer's norm and relative value."""
    for layer in report.layers:
        act, rel = layer.act_grad_norm, layer.act_grad_rel
        if act is not None and rel is not None and math.isfinite(act) and act > 0 and rel > 0 and math.isfinite(rel):
            return act / rel
    return None


def _log(value: float) -> float:
    return math.log10(value)


def _fmt(value: float) -> str:
    """A coordinate with at most one decimal."""
    text = f"{value:.1f}"
    return text[:-2] if text.endswith(".0") else text


def _decade(exponent: int) -> str:
    return "1" if exponent == 0 else f"1e{exponent:+d}".replace("+", "")


def _short(name: str) -> str:
    """A label that fits: leading dotted components dropped first (``…h.3.attn.c_attn``), then characters."""
    name = name or "(root)"
    if len(name) <= LABEL_CHARS:
        return name
    parts = name.split(".")
    while len(parts) > 1 and len(".".join(parts)) + 1 > LABEL_CHARS:
        parts.pop(0)
    tail = ".".join(parts)
    return "…" + (tail if len(tail) + 1 <= LABEL_CHARS else tail[-(LABEL_CHARS - 1) :])


def label_indices(n: int, room: float, spacing: float = LABEL_SPACING) -> list[int]:
    """Which of ``n`` evenly spaced positions get a label: every k-th, always the first and the last."""
    if n <= 0:
        return []
    most = max(2, int(room // spacing))
    if n <= most:
        return list(range(n))
    step = math.ceil(n / most)
    picked = list(range(0, n, step))
    if picked[-1] != n - 1:
        if (n - 1) - picked[-1] < step / 2 and len(picked) > 1:
            picked.pop()
        picked.append(n - 1)
    return picked


def _clip_segment(xa: float, la: float, xb: float, lb: float, lo: float, hi: float) -> tuple[float, ...] | None:
    """The part of the segment (x, log value) inside lo ≤ log ≤ hi, or None."""
    t0, t1 = 0.0, 1.0
    d = lb - la
    for bound, inside_above in ((lo, True), (hi, False)):
        if d == 0:
            if (la < bound) if inside_above else (la > bound):
                return None
            continue
        t = (bound - la) / d
        if (d > 0) == inside_above:
            t0 = max(t0, t)
        else:
            t1 = min(t1, t)
    if t0 > t1:
        return None
    return (xa + (xb - xa) * t0, la + d * t0, xa + (xb - xa) * t1, la + d * t1)


class _Svg:
    """A tiny builder: elements as strings, attributes escaped."""

    def __init__(self) -> None:
        self.parts: list[str] = []

    def add(self, tag: str, body: str | None = None, /, **attrs: object) -> None:
        self.parts.append(element(tag, body, **attrs))

    def raw(self, text: str) -> None:
        self.parts.append(text)


def element(tag: str, body: str | None = None, /, **attrs: object) -> str:
    """``<tag a="…">body</tag>``; attribute names use ``_`` for ``-`` (``class_`` for ``class``)."""
    rendered = "".join(
        f' {name.rstrip("_").replace("_", "-")}="{escape(str(value))}"'
        for name, value in attrs.items()
        if value is not None
    )
    if body is None:
        return f"<{tag}{rendered}/>"
    return f"<{tag}{rendered}>{body}</{tag}>"


def _title(text: str) -> str:
    return f"<title>{escape(text)}</title>"


@dataclass(frozen=True)
class _Frame:
    """The plot area and its log scale."""

    x0: float
    x1: float
    y_top: float
    """Top of the log region (below the NaN strip when there is one)."""
    y_bottom: float
    """Bottom of the log region (above the zero strip when there is one)."""
    lo: int
    hi: int

    def y(self, log_value: float) -> float:
        span = self.hi - self.lo
        return self.y_bottom - (log_value - self.lo) / span * (self.y_bottom - self.y_top)


def _decade_range(values: Sequence[float], extra: Sequence[float]) -> tuple[int, int]:
    logs = [_log(v) for v in (*values, *extra) if v > 0 and math.isfinite(v)]
    if not logs:
        return -1, 1
    lo = math.floor(min(logs) - 0.3)
    hi = math.ceil(max(logs) + 0.3)
    return lo, max(hi, lo + 1)


def _y_axis(svg: _Svg, frame: _Frame, reference_label: str | None) -> None:
    height = frame.y_bottom - frame.y_top
    decades = frame.hi - frame.lo
    step = max(1, math.ceil(decades / max(1, height // DECADE_SPACING)))
    for exponent in range(frame.lo, frame.hi + 1):
        y = frame.y(exponent)
        strong = exponent == 0
        svg.add(
            "line",
            x1=_fmt(frame.x0),
            x2=_fmt(frame.x1),
            y1=_fmt(y),
            y2=_fmt(y),
            stroke="currentColor",
            stroke_opacity="0.45" if strong else "0.12",
            class_="grid",
        )
        if exponent % step == 0:
            svg.add(
                "text",
                escape(_decade(exponent)),
                x=_fmt(frame.x0 - 6),
                y=_fmt(y + 3.5),
                text_anchor="end",
                fill="currentColor",
                class_="yl",
            )
    if reference_label and frame.lo <= 0 <= frame.hi:
        svg.add(
            "text",
            escape(reference_label),
            x=_fmt(frame.x1 - 4),
            y=_fmt(frame.y(0) - 4),
            text_anchor="end",
            fill="currentColor",
            fill_opacity="0.7",
            class_="ref",
        )


def _bands(
    svg: _Svg, frame: _Frame, low: float | None, high: float | None, words: tuple[str, str] = ("vanishing", "exploding")
) -> None:
    """Shade what lies beyond the thresholds, with a dashed line on each."""
    width = _fmt(frame.x1 - frame.x0)
    for threshold, below, label in ((low, True, words[0]), (high, False, words[1])):
        if threshold is None or threshold <= 0 or not math.isfinite(threshold):
            continue
        level = min(max(_log(threshold), frame.lo), frame.hi)
        y = frame.y(level)
        top, bottom = (y, frame.y_bottom) if below else (frame.y_top, y)
        if bottom - top > 0:
            svg.add(
                "rect",
                x=_fmt(frame.x0),
                y=_fmt(top),
                width=width,
                height=_fmt(bottom - top),
                fill=BAND,
                fill_opacity="0.07",
                class_=f"band {label}",
            )
        if frame.lo < _log(threshold) < frame.hi:
            svg.add(
                "line",
                x1=_fmt(frame.x0),
                x2=_fmt(frame.x1),
                y1=_fmt(y),
                y2=_fmt(y),
                stroke=BAND,
                stroke_opacity="0.6",
                stroke_dasharray="5 4",
                class_="threshold",
            )
            sign = "<" if below else ">"
            svg.add(
                "text",
                escape(f"{label} {sign} {number(threshold, 'g')}"),
                x=_fmt(frame.x0 + 4),
                y=_fmt(y + 12 if below else y - 4),
                fill=BAND,
                class_="tl",
            )


def _legend(svg: _Svg, x: float, y: float, items: list[tuple[str, str]]) -> None:
    """Legend entries left to right: (marker SVG drawn around (0, 0), label)."""
    for marker, label in items:
        svg.raw(f'<g class="legend" transform="translate({_fmt(x)} {_fmt(y)})">{marker}')
        svg.add("text", escape(label), x="9", y="4", fill="currentColor")
        svg.raw("</g>")
        x += 26 + CHAR_WIDTH * len(label)


def _marker(kind: str, x: float, y: float, r: float) -> str:
    """The shape of one point: dots for measured values, a triangle for 0, a cross for NaN/Inf."""
    if kind == "zero":
        d = f"M{_fmt(x - r * 1.2)} {_fmt(y - r)}H{_fmt(x + r * 1.2)}L{_fmt(x)} {_fmt(y + r * 1.1)}Z"
        return element("path", d=d, fill=ORANGE, stroke=ORANGE)
    if kind == "nonfinite":
        s = r * 1.1
        d = (
            f"M{_fmt(x - s)} {_fmt(y - s)}L{_fmt(x + s)} {_fmt(y + s)}"
            f"M{_fmt(x - s)} {_fmt(y + s)}L{_fmt(x + s)} {_fmt(y - s)}"
        )
        return element("path", d=d, stroke=RED, stroke_width="2.2", fill="none")
    if kind == "nograd":
        return element("circle", cx=_fmt(x), cy=_fmt(y), r=_fmt(r), fill="none", stroke=GREY, stroke_width="1.5")
    colour = RED if kind == "flagged" else BLUE
    return element("circle", cx=_fmt(x), cy=_fmt(y), r=_fmt(r * (1.15 if kind == "flagged" else 1)), fill=colour)


KIND_WORDS = {
    "ok": "",
    "flagged": "",
    "zero": "underflowed to exactly 0",
    "nonfinite": "NaN/Inf",
    "nograd": "no gradient reached it",
}


def layer_chart_svg(report: Report, *, width: int = 900, height: int = 320) -> str:
    """The per-layer gradient, relative to the output end, on a log axis: input end left, output right.

    One point (an ``<a class="pt …">`` linking to the table row ``#L{index}``) per measured layer,
    with a ``<title>`` tooltip; flagged layers red, 0 (underflow) as triangles on a floor strip,
    NaN/Inf as crosses on a ceiling strip; the bands beyond ``report.thresholds``; the fitted gain per
    layer as a dashed line through the output end; every k-th layer labelled on deep models.
    """
    points = chart_points(report)
    activation = report.path.measured_with == "activation_gradients"
    what = "∂L/∂h ÷ output end" if activation else "(‖∂L/∂W‖/‖W‖) ÷ last layer's"
    head = (
        f'<svg class="chart layers" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
        f'aria-labelledby="chart-layers-title" font-family="system-ui, -apple-system, Segoe UI, sans-serif" '
        f'font-size="11">'
    )
    title = f"gradient per layer, {what}, log scale, input end left, output end right"
    parts = [head, f'<title id="chart-layers-title">{escape(title)}</title>']
    if not points:
        parts.append(
            element(
                "text",
                "no layer with a measured gradient",
                x=str(width // 2),
                y=str(height // 2),
                text_anchor="middle",
                fill="currentColor",
            )
        )
        return "".join(parts) + "</svg>"

    svg = _Svg()
    n = len(points)
    low = report.thresholds.get("vanishing_attenuation")
    high = report.thresholds.get("exploding_attenuation")
    finite = [p.value for p in points if p.value is not None and p.value > 0 and math.isfinite(p.value)]
    finite += [v for p in points for v in p.calls if v > 0 and math.isfinite(v)]
    lo, hi = _decade_range(finite, [t for t in (low, high, 1.0) if t is not None])

    labels_len = max(len(_short(p.layer.name)) for p in points)
    left, right, top = 58.0, 14.0, 44.0
    bottom = min(120.0, 22.0 + labels_len * CHAR_WIDTH * 0.72)
    x0, x1 = left, width - right
    has_nan = any(p.kind == "nonfinite" for p in points)
    has_floor = any(p.kind in ("zero", "nograd") for p in points) or any(v == 0 for p in points for v in p.calls)
    strip = 18.0
    y_top = top + (strip if has_nan else 0)
    y_bottom = height - bottom - (strip if has_floor else 0)
    frame = _Frame(x0, x1, y_top, y_bottom, lo, hi)

    slot = (x1 - x0) / n
    pad = min(14.0, slot / 2)

    def x_at(k: int) -> float:
        return (x0 + x1) / 2 if n == 1 else x0 + pad + k * (x1 - x0 - 2 * pad) / (n - 1)

    y_nan = top + strip / 2
    y_floor = height - bottom - strip / 2
    radius = max(1.6, min(4.0, slot / 3))

    # frame and strips
    _outline(svg, x0, x1, top, height - bottom)
    if has_nan:
        svg.add("rect", x=_fmt(x0), y=_fmt(top), width=_fmt(x1 - x0), height=_fmt(strip), fill=RED, fill_opacity="0.1")
        svg.add("text", "NaN/Inf", x=_fmt(x0 - 6), y=_fmt(y_nan + 3.5), text_anchor="end", fill=RED, class_="yl")
    if has_floor:
        svg.add(
            "rect",
            x=_fmt(x0),
            y=_fmt(y_bottom),
            width=_fmt(x1 - x0),
            height=_fmt(strip),
            fill=ORANGE,
            fill_opacity="0.1",
        )
        svg.add("text", "0", x=_fmt(x0 - 6), y=_fmt(y_floor + 3.5), text_anchor="end", fill=ORANGE, class_="yl")
    _bands(svg, frame, low, high)
    _y_axis(svg, frame, None)  # the output end sits on the strong line at 1; a label there would hide it
    svg.add(
        "text",
        escape(what),
        transform=f"translate(12 {_fmt((y_top + y_bottom) / 2)}) rotate(-90)",
        text_anchor="middle",
        fill="currentColor",
        class_="axis",
    )
    svg.add("text", "← input end", x=_fmt(x0), y=_fmt(top - 6), fill="currentColor", class_="axis")
    svg.add("text", "output end →", x=_fmt(x1), y=_fmt(top - 6), text_anchor="end", fill="currentColor", class_="axis")

    # measured curve: consecutive finite points joined
    path, pen = [], False
    for k, p in enumerate(points):
        if p.value is not None and p.value > 0 and math.isfinite(p.value):
            path.append(f"{'L' if pen else 'M'}{_fmt(x_at(k))} {_fmt(frame.y(_log(p.value)))}")
            pen = True
        else:
            pen = False
    if path:
        svg.add("path", d="".join(path), fill="none", stroke=BLUE, stroke_opacity="0.55", stroke_width="1.3")

    # fitted gain: value g**k at k calls before the output end, through the output end at 1
    gain = report.path.gain
    fitted = gain is not None and gain > 0 and math.isfinite(gain) and report.path.attenuation is not None
    fitted = fitted and not any(p.calls for p in points)  # per call, not per layer: the whiskers show it
    if fitted:
        assert gain is not None
        steps = _steps_back(report, points, activation)
        segments = []
        for k in range(n - 1):
            clipped = _clip_segment(
                x_at(k), steps[k] * _log(gain), x_at(k + 1), steps[k + 1] * _log(gain), frame.lo, frame.hi
            )
            if clipped is not None:
                xa, la, xb, lb = clipped
                segments.append(f"M{_fmt(xa)} {_fmt(frame.y(la))}L{_fmt(xb)} {_fmt(frame.y(lb))}")
        if segments:
            svg.add(
                "path",
                _title(f"fitted gain {number(gain)} per layer (geometric mean over the path)"),
                d="".join(segments),
                fill="none",
                stroke=ORANGE,
                stroke_width="1.6",
                stroke_dasharray="6 4",
                class_="fit",
            )

    # points
    for k, p in enumerate(points):
        x = x_at(k)
        body = [_title(_tooltip(p, what))]
        finite_calls = [v for v in p.calls if math.isfinite(v)]
        if finite_calls:
            ys = [frame.y(_log(v)) if v > 0 else y_floor for v in finite_calls]
            body.append(
                element(
                    "line",
                    x1=_fmt(x),
                    x2=_fmt(x),
                    y1=_fmt(min(ys)),
                    y2=_fmt(max(ys)),
                    stroke=RED if p.kind == "flagged" else BLUE,
                    stroke_opacity="0.45",
                    stroke_width=_fmt(max(2.0, radius * 1.2)),
                    stroke_linecap="round",
                    class_="calls",
                )
            )
        if p.kind == "nonfinite":
            y = y_nan
        elif p.kind in ("zero", "nograd"):
            y = y_floor
        else:
            assert p.value is not None
            y = frame.y(_log(p.value))
        body.append(_marker(p.kind, x, y, radius))
        svg.raw(element("a", "".join(body), href=f"#L{p.index}", class_=f"pt {p.kind}", id=f"pt-{p.index}"))

    # x labels
    for k in label_indices(n, x1 - x0):
        p = points[k]
        x, y = x_at(k), height - bottom + 12
        svg.add(
            "text",
            _title(p.layer.name or "(root)") + escape(_short(p.layer.name)),
            x=_fmt(x),
            y=_fmt(y),
            transform=f"rotate(-45 {_fmt(x)} {_fmt(y)})",
            text_anchor="end",
            fill=RED if p.kind in ("flagged", "nonfinite", "zero") else "currentColor",
            class_="xl",
        )

    # legend
    items = [(_marker("ok", 0, 0, 4), "measured"), (_marker("flagged", 0, 0, 4), "flagged")]
    if has_floor:
        items.append((_marker("zero", 0, 0, 4), "0 (underflow)"))
    if has_nan:
        items.append((_marker("nonfinite", 0, 0, 4), "NaN/Inf"))
    if any(p.kind == "nograd" for p in points):
        items.append((_marker("nograd", 0, 0, 4), "no gradient"))
    if any(p.calls for p in points):
        items.append(
            (element("line", x1="0", x2="0", y1="-5", y2="5", stroke=BLUE, stroke_width="3", stroke_opacity="0.45"),
             "range over calls")
        )  # fmt: skip
    if fitted:
        items.append(
            (
                element(
                    "line", x1="-6", x2="6", y1="0", y2="0", stroke=ORANGE, stroke_width="1.6", stroke_dasharray="4 3"
                ),
                f"fitted gain {number(gain)} per layer",
            )
        )
    if low is not None or high is not None:
        items.append(
            (
                element("rect", x="-5", y="-5", width="10", height="10", fill=BAND, fill_opacity="0.25"),
                "beyond threshold",
            )
        )
    _legend(svg, x0 + 6, 14, items)

    return "".join(parts) + "".join(svg.parts) + "</svg>"


def _steps_back(report: Report, points: list[ChartPoint], activation: bool) -> list[int]:
    """How many calls each point lies before the output end (0 at the output end itself)."""
    if activation:
        end = next((p.layer.position for p in points if p.layer.name == report.path.last_layer), None)
        if end is None:
            end = max(p.layer.position for p in points)
        return [end - max(p.layer.position, 0) for p in points]
    end_index = next((k for k, p in enumerate(points) if p.layer.name == report.path.last_layer), len(points) - 1)
    return [end_index - k for k in range(len(points))]


def _tooltip(p: ChartPoint, what: str) -> str:
    layer = p.layer
    position = "–" if layer.position < 0 else str(layer.position)
    text = f"#{position} {layer.name or '(root)'} ({layer.type})\n{what}: {number(p.value, '.3g')}"
    if KIND_WORDS.get(p.kind):
        text += f" — {KIND_WORDS[p.kind]}"
    if p.calls:
        finite = [v for v in p.calls if math.isfinite(v)]
        zeros = sum(1 for v in p.calls if v == 0)
        text += f"\n{len(p.calls)} calls"
        if finite:
            text += f": {number(min(finite), '.2g')} … {number(max(finite), '.2g')}"
        if zeros:
            text += f", {zeros} underflowed to 0"
    if layer.grad_norm is not None:
        text += f"\n‖∂L/∂W‖ {number(layer.grad_norm, '.3g')}"
    if layer.flags:
        text += f"\nflags: {', '.join(layer.flags)}"
    return text


def steps_chart_svg(trace: OptimisationTrace, *, width: int = 900, height: int = 230) -> str:
    """The optimisation probe: total gradient norm ÷ step 0's per optimiser step, on a log axis.

    One ``<g class="step">`` per record (NaN/Inf as a cross on the ceiling strip); the onset step is
    marked with a vertical line; the 10^-3 … 10^3 band around step 0 (``optimise.COLLAPSE_LIMIT``,
    ``GROWTH_LIMIT``) is the stable range.
    """
    records = trace.steps
    reference = records[0].grad_norm if records else math.nan
    usable = bool(records) and math.isfinite(reference) and reference > 0
    ratios = [r.grad_norm / reference for r in records] if usable else []
    unstable = trace.verdict != "stable" and trace.onset_step is not None
    onset = trace.onset_step if unstable else None

    def tooltip(k: int) -> str:
        record = records[k]
        return (
            f"step {record.step}: loss {number(record.loss, '.4g')}, ‖∂L/∂θ‖ {number(record.grad_norm, '.3g')} "
            f"({number(ratios[k], '.3g')}× step 0), attenuation {number(record.attenuation, '.3g')}, "
            f"gain {number(record.gain, '.3g')}"
        )

    return log_series_svg(
        ratios,
        [r.step for r in records],
        css="steps",
        point_class="step",
        title="total gradient norm per optimiser step, ÷ step 0, log scale",
        y_label="‖∂L/∂θ‖ ÷ step 0",
        x_label="step",
        reference="step 0 = 1",
        bands=(1e-3, 1e3),
        words=("collapsing", "exploding"),
        onset=onset,
        tooltip=tooltip,
        empty="no finite gradient norm at step 0 to compare with",
        width=width,
        height=height,
    )


def history_chart_svg(history: TrainingHistory, *, width: int = 900, height: int = 250) -> str:
    """A training history: total gradient norm ÷ the first record's per recorded step, on a log axis.

    One ``<g class="record">`` per shown record (at most ``MAX_HISTORY_POINTS``: first, onsets and last
    kept), unhealthy records red, NaN/Inf as a cross on the ceiling strip; each onset a vertical line.
    """
    view = steps_view(history)
    shown = history_points(history)
    records = [history.steps[i] for i in shown]
    reference = history.steps[0].grad_norm if history.steps else math.nan
    usable = bool(records) and math.isfinite(reference) and reference > 0
    ratios = [r.grad_norm / reference for r in records] if usable else []
    first = history.steps[0].step if history.steps else 0
    marks = [(step, f"{', '.join(onset_problems(history, step))} from {step}") for step in view.marked]

    def tooltip(k: int) -> str:
        record = records[k]
        text = (
            f"step {record.step}: loss {number(view.loss(record), '.4g')}, ‖∂L/∂θ‖ {number(record.grad_norm, '.3g')} "
            f"({number(ratios[k], '.3g')}× step {first}), attenuation {number(record.attenuation, '.3g')}, "
            f"gain {number(record.gain, '.3g')}"
        )
        problems = dict(history.problem_steps).get(record.step)
        if problems:
            text += f"\nunhealthy: {', '.join(PROBLEM_WORDS.get(p, p) for p in problems)}"
        return text

    return log_series_svg(
        ratios,
        [r.step for r in records],
        css="history",
        point_class="record",
        title=f"total gradient norm per recorded training step, ÷ step {first}, log scale",
        y_label=f"‖∂L/∂θ‖ ÷ step {first}",
        x_label="training step",
        reference=f"step {first} = 1",
        bands=(None, None),
        words=("vanishing", "exploding"),
        onset=None,
        tooltip=tooltip,
        empty="no finite gradient norm at the first record to compare with",
        width=width,
        height=height,
        marks=marks,
        flagged=[r.step in view.bad for r in records],
    )


def history_points(history: TrainingHistory) -> list[int]:
    """Indices of the records the HTML chart and table show: all up to ``MAX_HISTORY_POINTS``."""
    return shown_rows(history.steps, steps_view(history).keep, limit=MAX_HISTORY_POINTS)


def _mark_label(
    svg: _Svg, taken: list[list[tuple[float, float]]], label: str, x: float, top: float, width: int
) -> None:
    """A vertical line's label above the plot: right of the line (left of it near the right edge), in the
    first of the label rows where it overlaps nothing; where none is free the line's tooltip says it."""
    size = CHAR_WIDTH * len(label)
    right = x + 4 + size <= width - 2
    span = (x + 4, x + 4 + size) if right else (x - 4 - size, x - 4)
    for row, spans in enumerate(taken):
        if span[0] < 0 or any(span[0] < b + 6 and a < span[1] + 6 for a, b in spans):
            continue
        spans.append(span)
        svg.add(
            "text",
            escape(label),
            x=_fmt(x + 4 if right else x - 4),
            y=_fmt(top - 6 - 12 * row),
            text_anchor=None if right else "end",
            fill=RED,
        )
        return


def through_time(report: Report) -> list[tuple[LayerStats, tuple[float, ...], str]]:
    """Layers with a gradient through time: (layer, values relative to the output end, what they are).

    A module called many times (an ``nn.RNNCell`` in a loop, a shared block) gives ‖∂L/∂h‖ per call ÷
    the output end's; a fused ``nn.RNN``/``LSTM``/``GRU`` gives ‖∂L/∂x_t‖ per step ÷ the last step's.
    """
    out_end = _output_norm(report)
    series = []
    for i in forward_order(report):
        layer = report.layers[i]
        if out_end and len(layer.act_grad_norms) > 1:
            series.append((layer, tuple(v / out_end for v in layer.act_grad_norms), "call"))
        elif len(layer.time_grad_norms) > 1:
            last = layer.time_grad_norms[-1]
            if math.isfinite(last) and last > 0:
                series.append((layer, tuple(v / last for v in layer.time_grad_norms), "time step"))
    return series


def time_chart_svg(
    layer: LayerStats, values: Sequence[float], unit: str, report: Report, *, width: int = 900, height: int = 230
) -> str:
    """One layer's gradient per call (or per time step), forward order left to right, on a log axis."""
    reference = "output end = 1" if unit == "call" else "last step = 1"
    what = "‖∂L/∂h‖ ÷ output end" if unit == "call" else "‖∂L/∂x_t‖ ÷ last step"
    name = layer.name or "(root)"
    return log_series_svg(
        list(values),
        list(range(1, len(values) + 1)),
        css="time",
        point_class="call",
        title=f"{name}: gradient per {unit}, first {unit} left, log scale",
        y_label=what,
        x_label=f"{unit} (forward order: the first {unit} is the farthest from the loss)",
        reference=reference,
        bands=(report.thresholds.get("vanishing_attenuation"), report.thresholds.get("exploding_attenuation")),
        words=("vanishing", "exploding"),
        onset=None,
        tooltip=lambda k: f"{name}, {unit} {k + 1} of {len(values)}: {what} {number(values[k], '.3g')}",
        empty="nothing measured",
        width=width,
        height=height,
    )


def log_series_svg(
    values: Sequence[float],
    xs: Sequence[int],
    *,
    css: str,
    point_class: str,
    title: str,
    y_label: str,
    x_label: str,
    reference: str,
    bands: tuple[float | None, float | None],
    words: tuple[str, str],
    onset: int | None,
    tooltip: Callable[[int], str],
    empty: str,
    width: int = 900,
    height: int = 230,
    marks: Sequence[tuple[int, str]] = (),
    flagged: Sequence[bool] | None = None,
) -> str:
    """A line of values (relative to a reference of 1) against integer x, on a log axis.

    One ``<g class="{point_class}">`` per value with a ``<title>``; 0 as a triangle on a floor strip,
    NaN/Inf as a cross on a ceiling strip; ``bands`` shaded beyond; ``onset`` marked red from there on.
    ``marks`` (x, label) draw more such vertical lines; ``flagged`` (one per value), when given, says
    which points are red instead of "from the onset on".
    """
    head = (
        f'<svg class="chart {escape(css)}" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
        f'role="img" aria-label="{escape(title)}" font-family="system-ui, -apple-system, Segoe UI, sans-serif" '
        f'font-size="11">'
    )
    parts = [head, _title(title)]
    if not values:
        parts.append(
            element(
                "text", escape(empty), x=str(width // 2), y=str(height // 2), text_anchor="middle", fill="currentColor"
            )
        )
        return "".join(parts) + "</svg>"
    svg = _Svg()
    low, high = bands
    lo, hi = _decade_range(values, [v for v in (low, high, 1.0) if v is not None])
    has_nan = any(not math.isfinite(v) for v in values)
    has_zero = any(v == 0 for v in values)
    left, right, top, bottom, strip = 58.0, 14.0, 30.0, 34.0, 16.0
    x0, x1 = left, width - right
    frame = _Frame(x0, x1, top + (strip if has_nan else 0), height - bottom - (strip if has_zero else 0), lo, hi)
    first, last = xs[0], xs[-1]
    span = max(1, last - first)

    def x_at(x: int) -> float:
        return (x0 + x1) / 2 if last == first else x0 + 10 + (x - first) * (x1 - x0 - 20) / span

    _outline(svg, x0, x1, top, height - bottom)
    if has_nan:
        svg.add("text", "NaN/Inf", x=_fmt(x0 - 6), y=_fmt(top + strip / 2 + 3.5), text_anchor="end", fill=RED)
    if has_zero:
        svg.add("text", "0", x=_fmt(x0 - 6), y=_fmt(frame.y_bottom + strip / 2 + 3.5), text_anchor="end", fill=ORANGE)
    _bands(svg, frame, low, high, words)
    _y_axis(svg, frame, reference)
    svg.add(
        "text",
        escape(y_label),
        transform=f"translate(12 {_fmt((frame.y_top + frame.y_bottom) / 2)}) rotate(-90)",
        text_anchor="middle",
        fill="currentColor",
        class_="axis",
    )
    for k in label_indices(len(xs), x1 - x0, 36):
        svg.add(
            "text",
            str(xs[k]),
            x=_fmt(x_at(xs[k])),
            y=_fmt(height - bottom + 14),
            text_anchor="middle",
            fill="currentColor",
            class_="xl",
        )
    svg.add(
        "text", escape(x_label), x=_fmt((x0 + x1) / 2), y=_fmt(height - 4), text_anchor="middle", fill="currentColor"
    )
    lines = ([(onset, f"onset: {onset}")] if onset is not None else []) + list(marks)
    taken: list[list[tuple[float, float]]] = [[], []]  # two rows of labels above the plot: spans in use
    for at, label in lines:
        x = x_at(at)
        svg.add(
            "line",
            _title(label),
            x1=_fmt(x),
            x2=_fmt(x),
            y1=_fmt(top),
            y2=_fmt(height - bottom),
            stroke=RED,
            stroke_dasharray="4 3",
            class_="onset",
        )
        _mark_label(svg, taken, label, x, top, width)
    path, pen = [], False
    for x, value in zip(xs, values, strict=True):
        if value > 0 and math.isfinite(value):
            path.append(f"{'L' if pen else 'M'}{_fmt(x_at(x))} {_fmt(frame.y(_log(value)))}")
            pen = True
        else:
            pen = False
    if path:
        svg.add("path", d="".join(path), fill="none", stroke=BLUE, stroke_opacity="0.6", stroke_width="1.3")
    radius = max(1.2, min(3.5, (x1 - x0) / len(values) / 3))
    for k, (x, value) in enumerate(zip(xs, values, strict=True)):
        late = flagged[k] if flagged is not None else onset is not None and x >= onset
        red = late or (low is not None and 0 < value < low) or (high is not None and value > high)
        px = x_at(x)
        if not math.isfinite(value):
            marker = _marker("nonfinite", px, top + strip / 2, radius)
        elif value == 0:
            marker = _marker("zero", px, frame.y_bottom + strip / 2, radius)
        else:
            marker = _marker("flagged" if red else "ok", px, frame.y(_log(value)), radius)
        svg.raw(element("g", _title(tooltip(k)) + marker, class_=point_class))
    return "".join(parts) + "".join(svg.parts) + "</svg>"


def _outline(svg: _Svg, x0: float, x1: float, top: float, bottom: float) -> None:
    """The plot area's faint outline."""
    svg.add(
        "rect",
        x=_fmt(x0),
        y=_fmt(top),
        width=_fmt(x1 - x0),
        height=_fmt(bottom - top),
        fill="none",
        stroke="currentColor",
        stroke_opacity="0.3",
    )
