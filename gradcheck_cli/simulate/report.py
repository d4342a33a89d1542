"""The frozen result of a simulation, read by the renderers. Imports no torch."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from gradcheck_cli.report.report import json_safe

VANISHING_BELOW = 1e-3
EXPLODING_ABOVE = 1e3


def verdict_of(ratio: float, below: float = VANISHING_BELOW, above: float = EXPLODING_ABOVE) -> str:
    """``vanishing`` / ``exploding`` / ``stable`` for a first-layer ÷ last-layer gradient ratio."""
    if math.isnan(ratio):  # in a simulation NaN only comes from inf − inf: an overflow
        return "exploding"
    if ratio < below:
        return "vanishing"
    if ratio > above:
        return "exploding"
    return "stable"


@dataclass(frozen=True)
class SimLayer:
    """One layer (or iteration, or time step) of a simulation."""

    index: int
    """1-based distance from the output: the gradient after ``index`` backward steps."""
    value: float
    """The headline gradient magnitude relative to the output end (the chain: factor**index)."""
    theory: float | None = None
    monte_carlo: float | None = None
    low: float | None = None
    """Spread of the Monte Carlo value over seeds (min)."""
    high: float | None = None
    """Spread of the Monte Carlo value over seeds (max)."""
    extra: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Estimate:
    """A gain and ratio from one method (theory or Monte Carlo) for the finite depth asked for."""

    gain: float
    """Geometric-mean factor per layer over the depth."""
    ratio: float
    """Gradient at the first layer divided by that at the last."""
    depth_scale: float | None = None
    """ξ = −1/ln(gain): the depth over which the gradient changes by a factor e (None at gain 1)."""
    gain_low: float | None = None
    gain_high: float | None = None
    ratio_low: float | None = None
    ratio_high: float | None = None
    seeds: int | None = None


def depth_scale(gain: float) -> float | None:
    """ξ = −1/ln(gain); positive when vanishing, negative when exploding, None at gain 1 or 0."""
    if gain <= 0 or not math.isfinite(gain) or gain == 1.0:
        return None
    return -1.0 / math.log(gain)


@dataclass(frozen=True)
class SimulationReport:
    """Everything one ``simulate`` run computed (DESIGN.md §3 keys plus additive ones)."""

    mode: str
    """``chain``, ``network``, ``compare``, ``map`` or ``rnn``."""
    depth: int
    ratio: float
    gain: float
    verdict: str
    layers: tuple[SimLayer, ...]
    spec: dict[str, Any] = field(default_factory=dict)
    """The inputs: factor, activation, init, width..."""
    theory: Estimate | None = None
    monte_carlo: Estimate | None = None
    crossings: dict[str, int | None] = field(default_factory=dict)
    """Depth at which the gradient first crosses 1e-3 (``vanishing``) or 1e3 (``exploding``)."""
    rows: tuple[dict[str, Any], ...] = ()
    """Compare mode: one row per remedy, ranked."""
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """The JSON object: ``depth``, ``ratio``, ``gain``, ``verdict``, ``layers`` and the rest."""
        data: dict[str, Any] = {
            "schema_version": 1,
            "mode": self.mode,
            "depth": self.depth,
            "ratio": self.ratio,
            "gain": self.gain,
            "verdict": self.verdict,
            "crossings": dict(self.crossings),
            "spec": dict(self.spec),
            "layers": [_layer_dict(layer) for layer in self.layers],
            "notes": list(self.notes),
        }
        if self.theory is not None:
            data["theory"] = asdict(self.theory)
        if self.monte_carlo is not None:
            data["monte_carlo"] = asdict(self.monte_carlo)
        if self.rows:
            data["rows"] = [dict(row) for row in self.rows]
        return json_safe(data)


def _layer_dict(layer: SimLayer) -> dict[str, Any]:
    entry: dict[str, Any] = {"index": layer.index, "value": layer.value}
    for key in ("theory", "monte_carlo", "low", "high"):
        value = getattr(layer, key)
        if value is not None:
            entry[key] = value
    entry.update(layer.extra)
    return entry
