"""Every rule's stable code and name (docs/rules.md), codes never renumbered, and how a finding is recognised
across runs (baselines, SARIF fingerprints). No torch here: renderers and the gate read it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Rule:
    """A rule's stable code and name (docs/rules.md)."""

    code: str
    name: str


VANISHING = Rule("GC001", "vanishing-gradient")
EXPLODING = Rule("GC002", "exploding-gradient")
NON_FINITE_GRADIENT = Rule("GC003", "non-finite-gradient")
NON_FINITE_FORWARD = Rule("GC004", "non-finite-forward")
NO_GRADIENT = Rule("GC005", "no-gradient")
PARAMETER_GRADIENTS_ONLY = Rule("GC006", "parameter-gradients-only")
UNUSED_LAYER = Rule("GC007", "unused-layer")
VANISHING_THROUGH_TIME = Rule("GC008", "vanishing-through-time")
EXPLODING_THROUGH_TIME = Rule("GC009", "exploding-through-time")
INIT_SCALE = Rule("GC010", "init-scale")
SATURATED_ACTIVATION = Rule("GC011", "saturated-activation")
DEAD_UNITS = Rule("GC012", "dead-units")
FP16_UNDERFLOW = Rule("GC013", "fp16-underflow")
FP16_OVERFLOW = Rule("GC014", "fp16-overflow")
UNSTABLE_OPTIMISATION = Rule("GC015", "unstable-optimisation")
TRAINING_SPIKE = Rule("GC016", "training-gradient-spike")
TRAINING_LOSS_NON_FINITE = Rule("GC017", "training-loss-non-finite")
TRAINING_LOSS_DIVERGENCE = Rule("GC018", "training-loss-divergence")

RULES = (
    VANISHING,
    EXPLODING,
    NON_FINITE_GRADIENT,
    NON_FINITE_FORWARD,
    NO_GRADIENT,
    PARAMETER_GRADIENTS_ONLY,
    UNUSED_LAYER,
    VANISHING_THROUGH_TIME,
    EXPLODING_THROUGH_TIME,
    INIT_SCALE,
    SATURATED_ACTIVATION,
    DEAD_UNITS,
    FP16_UNDERFLOW,
    FP16_OVERFLOW,
    UNSTABLE_OPTIMISATION,
    TRAINING_SPIKE,
    TRAINING_LOSS_NON_FINITE,
    TRAINING_LOSS_DIVERGENCE,
)

PATH_RULES = frozenset({VANISHING.code, EXPLODING.code})
"""Rules about the whole path: their ``layer`` is where the gradient crosses the threshold, which moves
as a model changes, so they are matched by code alone."""

MODEL_RULES = frozenset(
    rule.code
    for rule in (INIT_SCALE, SATURATED_ACTIVATION, DEAD_UNITS, FP16_UNDERFLOW, FP16_OVERFLOW, UNSTABLE_OPTIMISATION)
)
"""Rules with one finding per kind for the whole model, whose ``layer`` is only the first one flagged."""


def finding_key(code: str, layer: str | None) -> tuple[str, str | None]:
    """How a finding is recognised across runs: code and layer, or code alone for path- and model-level rules."""
    return (code, None) if code in PATH_RULES | MODEL_RULES else (code, layer)
