"""The log axis every chart draws on: whole decades, a strip at the bottom for values that are exactly 0
(underflow) and one at the top for NaN/Inf, series and points placed on it, the thresholds as bands."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeGuard

from gradcheck_cli.render.charts.style import BLUE, EXPLODE_FILL, GREY, RED, STRIP_FILL, VANISH_FILL

if TYPE_CHECKING:
    from matplotlib.axes import Axes

TINY = 1e-300
"""Below this a value is drawn as 0 (the subnormals and exact zeros: underflow)."""
HUGE = 1e300
"""Above this a value is drawn as Inf."""
NICE_STEPS = (1, 2, 3, 5, 10, 20, 25, 50, 100)


def finite_positive(value: float | None) -> TypeGuard[float]:
    """Whether ``value`` has a place on the log axis itself (not in a strip)."""
    return value is not None and TINY <= value <= HUGE


def is_zero(value: float | None) -> bool:
    """Whether ``value`` is drawn in the bottom strip (0: the gradient underflowed)."""
    return value is not None and not math.isnan(value) and value < TINY


def is_bad(value: float | None) -> bool:
    """Whether ``value`` is drawn in the top strip (NaN/Inf)."""
    return value is not None and (math.isnan(value) or value > HUGE)


def power(base: float, k: float) -> float:
    """base**k in log space, clamped to what a log axis can draw."""
    if base <= 0:
        return 0.0
    exponent = k * math.log10(base)
    return 10 ** max(-320.0, min(300.0, exponent)) if exponent < 300 else math.inf


@dataclass(frozen=True)
class LogScale:
    """A log y axis over whole decades, with optional strips for zeros (bottom) and NaN/Inf (top)."""

    low: int
    """Lowest decade of the data range."""
    high: int
    zeros: bool = False
    """Whether a strip at the bottom shows values that are 0 (underflow)."""
    bad: bool = False
    """Whether a strip at the top shows NaN/Inf."""

    @property
    def strip(self) -> float:
        """Height of a strip in decades: visible however many decades the data spans."""
        return min(15.0, max(1.2, 0.08 * (self.high - self.low)), self.low + 306.0, 306.0 - self.high)

    @property
    def zero_y(self) -> float | None:
        """Where zeros are drawn (inside the bottom strip), or None when there are none."""
        return 10.0 ** (self.low - 0.7 * self.strip) if self.zeros else None

    @property
    def bad_y(self) -> float | None:
        """Where NaN/Inf are drawn (inside the top strip), or None."""
        return 10.0 ** (self.high + 0.7 * self.strip) if self.bad else None

    @property
    def zero_edge(self) -> float:
        """Top of the zero strip: the data range starts above it."""
        return 10.0 ** (self.low - 0.35 * self.strip)

    @property
    def bad_edge(self) -> float:
        """Bottom of the NaN/Inf strip."""
        return 10.0 ** (self.high + 0.35 * self.strip)

    def place(self, value: float | None) -> float | None:
        """The y at which to draw ``value`` (None: not drawn)."""
        if value is None:
            return None
        if is_bad(value):
            return self.bad_y
        if is_zero(value):
            return self.zero_y
        return value

    def apply(self, ax: Axes) -> None:
        """Log scale, limits, decade ticks inside the data range only (none in the strips), strip labels."""
        from matplotlib.ticker import FixedLocator, LogFormatterSciNotation, NullLocator

        ax.set_yscale("log")
        bottom = 10.0 ** (self.low - (self.strip if self.zeros else 0.0))
        top = 10.0 ** (self.high + (self.strip if self.bad else 0.0))
        ax.set_ylim(bottom, top)
        span = self.high - self.low
        step = next((n for n in NICE_STEPS if span / n <= 10), math.ceil(span / 10))
        decades = [d for d in range(self.low, self.high + 1) if d % step == 0]
        ax.yaxis.set_major_locator(FixedLocator([10.0**d for d in decades]))
        ax.yaxis.set_major_formatter(LogFormatterSciNotation())
        if step == 1 and span <= 8:
            minors = [m * 10.0**d for d in range(self.low, self.high) for m in range(2, 10)]
            ax.yaxis.set_minor_locator(FixedLocator(minors))
        else:
            ax.yaxis.set_minor_locator(NullLocator())
        label: dict[str, Any] = {"transform": ax.get_yaxis_transform(), "ha": "right", "va": "center"}
        if self.zeros:
            ax.axhspan(bottom, self.zero_edge, color=STRIP_FILL, zorder=0.6, lw=0)
            ax.text(-0.012, 10.0 ** (self.low - 0.7 * self.strip), "0", fontsize=9, **label)
        if self.bad:
            ax.axhspan(self.bad_edge, top, color=STRIP_FILL, zorder=0.6, lw=0)
            ax.text(-0.012, 10.0 ** (self.high + 0.7 * self.strip), "NaN/Inf", fontsize=8, **label)


def log_scale(values: Sequence[float | None], *, include: Sequence[float] = ()) -> LogScale:
    """The decades covering the finite positive ``values`` and ``include``, strips for zeros and NaN/Inf."""
    finite = [v for v in values if finite_positive(v)]
    finite += [v for v in include if finite_positive(v)]
    if not finite:
        finite = [1.0]
    low = math.floor(math.log10(min(finite)) + 1e-9)
    high = math.ceil(math.log10(max(finite)) - 1e-9)
    if high <= low:
        high = low + 1
    return LogScale(low=low, high=high, zeros=any(is_zero(v) for v in values), bad=any(is_bad(v) for v in values))


@dataclass(frozen=True)
class Line:
    """How :func:`draw_series` draws one series."""

    label: str
    color: str
    marker: str | None = "o"
    linestyle: str = "-"
    markersize: float = 4.0
    zorder: float = 3
    gid: str | None = None
    """The SVG id of the line (tests and the HTML page find it by this)."""


def draw_series(ax: Axes, xs: Sequence[float], values: Sequence[float | None], scale: LogScale, line: Line) -> None:
    """A line through the finite positive values; zeros and NaN/Inf as marks in their strips."""
    ys = [v if finite_positive(v) else math.nan for v in values]
    (artist,) = ax.plot(
        xs, ys, linestyle=line.linestyle, marker=line.marker, markersize=line.markersize, color=line.color,
        label=line.label, lw=1.4, zorder=line.zorder,
    )  # fmt: skip
    artist.set_gid(line.gid)
    zero_x = [x for x, v in zip(xs, values, strict=True) if is_zero(v)]
    bad_x = [x for x, v in zip(xs, values, strict=True) if is_bad(v)]
    if zero_x and scale.zero_y is not None:
        size = 5.0 if len(zero_x) <= 40 else 3.0
        ax.plot(zero_x, [scale.zero_y] * len(zero_x), "v", color=line.color, markersize=size, zorder=line.zorder, lw=0)
    if bad_x and scale.bad_y is not None:
        ax.plot(bad_x, [scale.bad_y] * len(bad_x), "X", color=RED, markersize=6, zorder=line.zorder, lw=0)


def draw_points(
    ax: Axes, xs: Sequence[float], values: Sequence[float | None], scale: LogScale, red: Sequence[bool], gid: str
) -> None:
    """One artist per value (SVG id ``{gid}-{k}``, so that each can carry its own tooltip): red where
    ``red`` says, 0 in the bottom strip, NaN/Inf as a cross in the top strip."""
    size = 4.5 if len(values) <= 60 else 3.0
    for k, (x, value) in enumerate(zip(xs, values, strict=True)):
        y = scale.place(value)
        if y is None:
            continue
        marker, colour = ("X", RED) if is_bad(value) else ("v" if is_zero(value) else "o", RED if red[k] else None)
        (artist,) = ax.plot(
            [x], [y], linestyle="none", marker=marker, markersize=size, color=colour or BLUE, zorder=4,
            markeredgewidth=0.5, label="_nolegend_",
        )  # fmt: skip
        artist.set_gid(f"{gid}-{k}")


def bands(ax: Axes, scale: LogScale, limits: tuple[float, float], words: tuple[str, str], what: str) -> None:
    """Shade below ``limits[0]`` (``words[0]``, vanishing) and above ``limits[1]`` (exploding), up to the
    strips or the axis limits; a dotted line at 1 (the reference). SVG ids ``band-low``/``band-high``."""
    low, high = limits
    bottom, top = ax.get_ylim()
    if scale.zero_y is not None:
        bottom = scale.zero_edge
    if scale.bad_y is not None:
        top = scale.bad_edge
    if bottom < low:
        shade = ax.axhspan(
            bottom, low, color=VANISH_FILL, alpha=0.55, lw=0, zorder=0.5, label=f"{words[0]}: < {low:g}{what}"
        )
        shade.set_gid("band-low")
    if top > high:
        shade = ax.axhspan(
            high, top, color=EXPLODE_FILL, alpha=0.65, lw=0, zorder=0.5, label=f"{words[1]}: > {high:g}{what}"
        )
        shade.set_gid("band-high")
    ax.axhline(1.0, color=GREY, lw=0.8, ls=":", zorder=1)
