"""Chain mode: the gradient after k layers is factor**k. Pure Python: imports neither torch nor numpy."""

from __future__ import annotations

import math

from gradcheck_cli.errors import GradcheckError
from gradcheck_cli.simulate.report import (
    EXPLODING_ABOVE,
    VANISHING_BELOW,
    SimLayer,
    SimulationReport,
    depth_scale,
    verdict_of,
)


def simulate_chain(depth: int, factor: float) -> SimulationReport:
    """Per-layer gradient factor**k for k = 1…depth, the ratio, crossings and a verdict.

    The ratio is the gradient reaching the first layer divided by the gradient at the output
    end: factor**depth (0.8**50 ≈ 1.43e-5, 1.2**50 ≈ 9.10e3). Computed in log space so that
    deep chains neither underflow nor overflow before they are reported.
    """
    if depth < 1:
        raise GradcheckError(f"--depth must be at least 1, got {depth}")
    if not math.isfinite(factor) or factor <= 0:
        raise GradcheckError(f"--factor must be a positive number, got {factor}")
    log_factor = math.log(factor)
    layers = tuple(SimLayer(index=k, value=_exp(k * log_factor)) for k in range(1, depth + 1))
    ratio = _exp(depth * log_factor)
    crossings = {
        "vanishing": crossing_depth(log_factor, math.log(VANISHING_BELOW)),
        "exploding": crossing_depth(log_factor, math.log(EXPLODING_ABOVE)),
    }
    notes = [f"log10(ratio) = {depth * log_factor / math.log(10):.4g}"]
    return SimulationReport(
        mode="chain",
        depth=depth,
        ratio=ratio,
        gain=factor,
        verdict=verdict_of(ratio),
        layers=layers,
        spec={"factor": factor, "depth_scale": depth_scale(factor)},
        crossings=crossings,
        notes=tuple(notes),
    )


def crossing_depth(log_factor: float, log_threshold: float) -> int | None:
    """The first k with factor**k strictly beyond the threshold (below 1e-3, above 1e3), or None.

    factor**k < t  ⟺  k·ln f < ln t  ⟺  k > ln t / ln f (both logs negative), and likewise above 1e3.
    """
    if log_factor == 0 or (log_threshold < 0) != (log_factor < 0):
        return None
    return math.floor(log_threshold / log_factor) + 1


def _exp(x: float) -> float:
    """e**x, 0.0 below the smallest double and inf above the largest, without OverflowError."""
    if x > 709.78:
        return math.inf
    return math.exp(x)
