"""The per-step gain over the stretch of a path where the gradient is still measurable. No torch."""

from __future__ import annotations

import math
from collections.abc import Sequence


def stretch_gain(values: Sequence[float]) -> float:
    """Geometric-mean factor per step, over the steps k = 1… where the gradient did not underflow.

    ``values[k − 1]`` is the gradient k steps back from the output, relative to the output. The
    farthest non-zero k gives gain = value_k**(1/k), so a gradient that underflowed to 0 further
    back does not hide the factor measured before it; 0 when even k = 1 underflowed. A value that
    overflowed to inf there makes the gain inf: it is exploding, whatever came before. NaN is
    skipped like an underflow.
    """
    for k in range(len(values), 0, -1):
        value = values[k - 1]
        if value == math.inf:
            return math.inf
        if value > 0:  # NaN compares False
            return float(value ** (1.0 / k))
    return 0.0
