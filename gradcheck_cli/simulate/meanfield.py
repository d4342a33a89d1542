"""Mean-field theory of deep random networks (Poole et al. 2016, Schoenholz et al. 2017). numpy only.

For a plain stack h_{l+1} = W_l φ(h_l) + b_l with σ_w² = fan_in·Var(W) and σ_b² = Var(b):

    q_{l+1} = σ_w²·E[φ(√q_l z)²] + σ_b²        (pre-activation variance, z ~ N(0, 1))
    χ_l     = σ_w²·E[φ'(√q_l z)²]              (squared gradient gain from layer l+1 back to l)

The expectations are Gaussian integrals over the pre-activation u = √q·z. Fixed 100-node
Gauss–Hermite is badly wrong when q is large (tanh/sigmoid with N(0,1) weights: φ'² is a spike of
width ~1 under a Gaussian of width √q), so they are computed with composite Gauss–Legendre
panels that resolve both scales: panels across ±12√q and extra fine panels across ±30 around 0,
where every activation here has its structure, with a breakpoint at 0 for ReLU-type kinks.
Closed forms check it: ReLU E[φ²] = q/2, E[φ'²] = 1/2.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

Array = NDArray[np.float64]

LEAKY_SLOPE = 0.01
ELU_ALPHA = 1.0
_NODES, _WEIGHTS = np.polynomial.legendre.leggauss(10)
_erf = np.vectorize(math.erf, otypes=[np.float64])


def _gelu(u: Array) -> Array:
    return 0.5 * u * (1.0 + _erf(u / math.sqrt(2.0)))


def _gelu_prime(u: Array) -> Array:
    cdf = 0.5 * (1.0 + _erf(u / math.sqrt(2.0)))
    return cdf + u * np.exp(-0.5 * u * u) / math.sqrt(2.0 * math.pi)


def _sigmoid(u: Array) -> Array:
    return 0.5 * (1.0 + np.tanh(0.5 * u))


ACTIVATIONS: dict[str, tuple[Callable[[Array], Array], Callable[[Array], Array]]] = {
    "linear": (lambda u: u, lambda u: np.ones_like(u)),
    "relu": (lambda u: np.maximum(u, 0.0), lambda u: (u > 0).astype(np.float64)),
    "leaky_relu": (
        lambda u: np.where(u > 0, u, LEAKY_SLOPE * u),
        lambda u: np.where(u > 0, 1.0, LEAKY_SLOPE),
    ),
    "tanh": (np.tanh, lambda u: 1.0 - np.tanh(u) ** 2),
    "sigmoid": (_sigmoid, lambda u: _sigmoid(u) * (1.0 - _sigmoid(u))),
    "gelu": (_gelu, _gelu_prime),
    "silu": (lambda u: u * _sigmoid(u), lambda u: _sigmoid(u) * (1.0 + u * (1.0 - _sigmoid(u)))),
    "elu": (
        lambda u: np.where(u > 0, u, ELU_ALPHA * np.expm1(np.minimum(u, 0.0))),
        lambda u: np.where(u > 0, 1.0, ELU_ALPHA * np.exp(np.minimum(u, 0.0))),
    ),
}
"""φ and φ' for every activation ``simulate`` offers (leaky slope 0.01 and ELU α = 1, torch's defaults)."""


def gaussian_expectation(f: Callable[[Array], Array], q: float) -> float:
    """E[f(√q·z)] for z ~ N(0, 1), accurate for q from 1e-12 up to 1e12."""
    if q <= 0:
        return float(f(np.zeros(1))[0])
    s = math.sqrt(q)
    edge = 12.0 * s
    breaks = np.linspace(-edge, edge, 121)
    fine = np.linspace(-30.0, 30.0, 601)
    breaks = np.unique(np.concatenate([breaks, fine[np.abs(fine) < edge], [0.0]]))
    left, right = breaks[:-1], breaks[1:]
    half = 0.5 * (right - left)
    middle = 0.5 * (right + left)
    u = middle[:, None] + half[:, None] * _NODES[None, :]
    density = np.exp(-0.5 * (u / s) ** 2) / (s * math.sqrt(2.0 * math.pi))
    return float(np.sum(half[:, None] * _WEIGHTS[None, :] * f(u) * density))


@dataclass(frozen=True)
class MeanField:
    """Layer-by-layer theory for a stack of ``depth`` layers plus a readout."""

    q: tuple[float, ...]
    """Pre-activation variance q_l of hidden layers l = 1…depth."""
    chi: tuple[float, ...]
    """Squared gradient gain χ_l from layer l+1 (the readout for l = depth) back to layer l."""

    @property
    def per_layer_gain(self) -> tuple[float, ...]:
        """√χ_l: the factor by which the gradient norm changes crossing each layer backwards."""
        return tuple(math.sqrt(c) for c in self.chi)

    def relative(self) -> tuple[float, ...]:
        """Gradient k layers back from the output, relative to the output, for k = 1…depth."""
        values = []
        log_total = 0.0
        for c in reversed(self.chi):
            log_total += 0.5 * math.log(c) if c > 0 else -math.inf
            values.append(math.exp(log_total) if log_total > -745 else 0.0)
        return tuple(values)

    @property
    def ratio(self) -> float:
        """Gradient at the first hidden layer divided by that at the output."""
        log_total = sum(0.5 * math.log(c) if c > 0 else -math.inf for c in self.chi)
        return math.exp(log_total) if -745 < log_total < 709 else (0.0 if log_total <= -745 else math.inf)

    @property
    def gain(self) -> float:
        """Geometric mean of the per-layer gains over the depth."""
        if any(c <= 0 for c in self.chi):
            return 0.0
        return math.exp(sum(0.5 * math.log(c) for c in self.chi) / len(self.chi))


def mean_field(activation: str, depth: int, sigma_w2: float, sigma_b2: float, input_variance: float) -> MeanField:
    """Propagate q forward from the input and evaluate χ at every hidden layer.

    The first hidden layer sees the input itself: q_1 = σ_w²·Var(x) + σ_b². Each later layer
    sees φ of the one before. χ_l uses q_l, the variance of the pre-activation whose φ' the
    gradient crosses.
    """
    phi, phi_prime = ACTIVATIONS[activation]
    q = sigma_w2 * input_variance + sigma_b2
    qs, chis = [], []
    for _ in range(depth):
        qs.append(q)
        chis.append(sigma_w2 * gaussian_expectation(lambda u: phi_prime(u) ** 2, q))
        q = sigma_w2 * gaussian_expectation(lambda u: phi(u) ** 2, q) + sigma_b2
    return MeanField(q=tuple(qs), chi=tuple(chis))
