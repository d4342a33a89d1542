"""From the probe's activation statistics to the report's section and findings (GC011, GC012).

Thresholds (calibration in docs/calibration.md): a layer is *saturated* when at least 25 % of its
sigmoid/tanh pre-activations sit where φ'(z) < 1 % of its maximum (healthy models: 0 %; a 50-layer
sigmoid net with N(0, 1) weights: 70 %); it has *dead* units when at least 75 % of its ReLU units
were ≤ 0 for every one of at least 8 samples (healthy: at most 47 %, the last layers of a 50-layer
Kaiming ReLU MLP, where deep plain ReLU stacks correlate their inputs; a large negative bias: 100 %).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from gradcheck_cli.diagnose.rule_codes import DEAD_UNITS, SATURATED_ACTIVATION
from gradcheck_cli.probe.activations import SATURATION_BOUND
from gradcheck_cli.probe.results import ActivationTotals
from gradcheck_cli.report.report import Finding, Problem, Severity
from gradcheck_cli.report.sections import ActivationLayer

SATURATED_SHARE = 0.25
DEAD_SHARE = 0.75
MIN_SAMPLES_PER_UNIT = 8
"""Below this a healthy unit can be ≤ 0 on every sample by chance (2⁻⁸ ≈ 0.4 % at 8)."""


def activation_section(totals: Sequence[ActivationTotals]) -> tuple[ActivationLayer, ...]:
    """One entry per measured activation module, with its flag."""
    out = []
    for t in totals:
        if t.elements == 0:
            continue
        saturated = None if t.saturated is None else t.saturated / t.sampled
        measurable = t.dead is not None and t.units > 0 and t.samples_per_unit >= MIN_SAMPLES_PER_UNIT
        dead = t.dead / t.units if measurable and t.dead is not None else None
        flag = None
        if saturated is not None and saturated >= SATURATED_SHARE:
            flag = "saturated"
        elif dead is not None and dead >= DEAD_SHARE:
            flag = "dead"
        out.append(
            ActivationLayer(
                layer=t.name,
                type=t.type,
                calls=t.calls,
                elements=t.elements,
                derivative_rms=math.sqrt(t.derivative_sq / t.sampled),
                saturated=saturated,
                dead=dead,
                samples_per_unit=t.samples_per_unit,
                flag=flag,
            )
        )
    return tuple(out)


def activation_findings(section: Sequence[ActivationLayer]) -> tuple[Finding, ...]:
    """One finding per kind of trouble (saturated, dead), naming the first and worst layers."""
    findings = []
    saturated = [a for a in section if a.flag == "saturated"]
    if saturated:
        worst = max(saturated, key=lambda a: a.saturated or 0.0)
        findings.append(
            Finding(
                SATURATED_ACTIVATION.code,
                SATURATED_ACTIVATION.name,
                Severity.WARNING,
                Problem.VANISHING,
                saturated[0].layer,
                f"{len(saturated)} of {len(section)} activation layers are saturated: in {worst.layer} ({worst.type}) "
                f"{worst.saturated:.0%} of the pre-activations sit where φ'(z) is below {SATURATION_BOUND:.0%} of its "
                f"maximum, and φ'(z) averages {worst.derivative_rms:.3g} (RMS); the weights feeding it are too large "
                "or the inputs unnormalised",
                {
                    "layers": [a.layer for a in saturated],
                    "worst_layer": worst.layer,
                    "saturated_share": worst.saturated,
                    "derivative_rms": worst.derivative_rms,
                    "threshold": SATURATED_SHARE,
                },
            )
        )
    dead = [a for a in section if a.flag == "dead"]
    if dead:
        worst = max(dead, key=lambda a: a.dead or 0.0)
        findings.append(
            Finding(
                DEAD_UNITS.code,
                DEAD_UNITS.name,
                Severity.WARNING,
                Problem.VANISHING,
                dead[0].layer,
                f"{len(dead)} of {len(section)} activation layers have mostly dead units: in {worst.layer} "
                f"({worst.type}) {worst.dead:.0%} of the units were ≤ 0 for all {worst.samples_per_unit} samples, so "
                "no gradient passes them (a large negative bias, a too-high learning rate, or weights pushed negative)",
                {
                    "layers": [a.layer for a in dead],
                    "worst_layer": worst.layer,
                    "dead_share": worst.dead,
                    "samples_per_unit": worst.samples_per_unit,
                    "threshold": DEAD_SHARE,
                },
            )
        )
    return tuple(findings)
