"""The SARIF 2.1.0 log: what GitHub code scanning and other static-analysis viewers read."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from gradcheck_cli.diagnose.rule_codes import (
    DEAD_UNITS,
    EXPLODING,
    EXPLODING_THROUGH_TIME,
    FP16_OVERFLOW,
    FP16_UNDERFLOW,
    INIT_SCALE,
    NO_GRADIENT,
    NON_FINITE_FORWARD,
    NON_FINITE_GRADIENT,
    PARAMETER_GRADIENTS_ONLY,
    RULES,
    SATURATED_ACTIVATION,
    TRAINING_LOSS_DIVERGENCE,
    TRAINING_LOSS_NON_FINITE,
    TRAINING_SPIKE,
    UNSTABLE_OPTIMISATION,
    UNUSED_LAYER,
    VANISHING,
    VANISHING_THROUGH_TIME,
    finding_key,
)
from gradcheck_cli.report.report import BaselineDiff, Finding, Report, Severity, json_safe
from gradcheck_cli.version import __version__

SARIF_VERSION = "2.1.0"
SARIF_SCHEMA = "https://docs.oasis-open.org/sarif/sarif/v2.1.0/errata01/os/schemas/sarif-schema-2.1.0.json"
INFORMATION_URI = "https://github.com/gradcheck/gradcheck"
"""The project's home page (``tool.driver.informationUri``)."""
RULES_DOC_URI = f"{INFORMATION_URI}/blob/main/docs/rules.md"
"""docs/rules.md on the web; each rule's ``helpUri`` is this plus ``#gc001``..."""
FINGERPRINT_KEY = "gradcheckFinding/v1"
"""Bump the version suffix if what goes into the fingerprint ever changes."""

LEVELS = {Severity.ERROR: "error", Severity.WARNING: "warning", Severity.INFO: "note"}


@dataclass(frozen=True)
class RuleText:
    """What a viewer shows about a rule: one line, a paragraph, its usual level."""

    short: str
    full: str
    level: str


RULE_TEXT: dict[str, RuleText] = {
    VANISHING.code: RuleText(
        "The gradient vanishes on its way from the output to the input end of the model.",
        "The activation gradient at the input end of the forward path is below --vanishing-below (default 1e-3) "
        "of the gradient at the output end, so the early layers barely learn.",
        "error",
    ),
    EXPLODING.code: RuleText(
        "The gradient explodes on its way from the output to the input end of the model.",
        "The activation gradient at the input end is above --exploding-above (default 1e3) times the gradient at "
        "the output end, so updates to the early layers are unstable.",
        "error",
    ),
    NON_FINITE_GRADIENT.code: RuleText(
        "Some gradients are NaN or Inf.",
        "A layer's parameter or activation gradient holds NaN or Inf; one such step corrupts the weights.",
        "error",
    ),
    NON_FINITE_FORWARD.code: RuleText(
        "The forward pass produces NaN or Inf.",
        "The loss or the model's output is NaN or Inf, often because some weights already are.",
        "error",
    ),
    NO_GRADIENT.code: RuleText(
        "A layer that ran received no gradient at all.",
        "A layer with parameters ran in the forward pass but got no gradient: the graph is cut between it and the "
        "loss (.detach(), torch.no_grad(), .item() or an integer op).",
        "error",
    ),
    PARAMETER_GRADIENTS_ONLY.code: RuleText(
        "Only parameter gradients could be measured.",
        "Module hooks cannot fire (TorchScript, torch.export), so the path is followed through the parameter "
        "gradient ratio ‖∂L/∂W‖/‖W‖ instead of the activation gradient ‖∂L/∂h‖.",
        "note",
    ),
    UNUSED_LAYER.code: RuleText(
        "A layer with parameters never ran.",
        "A module with parameters never ran in the forward pass and its parameters got no gradient.",
        "note",
    ),
    VANISHING_THROUGH_TIME.code: RuleText(
        "The gradient vanishes through time in a recurrent layer.",
        "In a fused recurrent module the gradient reaching the first time step's input is below --vanishing-below "
        "of the last step's: an error for plain RNNs, a warning for LSTM/GRU, whose gates can learn to open.",
        "error",
    ),
    EXPLODING_THROUGH_TIME.code: RuleText(
        "The gradient explodes through time in a recurrent layer.",
        "In a fused recurrent module the gradient reaching the first time step's input is above --exploding-above "
        "times the last step's.",
        "error",
    ),
    INIT_SCALE.code: RuleText(
        "Weights are initialised far from the scale their activation needs.",
        "Against Xavier/Kaiming with nn.init.calculate_gain of the following activation, the weights' standard "
        "deviation is far off, alone or compounded over a stack without normalisation (skipped for trained "
        "checkpoints).",
        "warning",
    ),
    SATURATED_ACTIVATION.code: RuleText(
        "Sigmoid or tanh units are saturated.",
        "A large share of the pre-activations sit where the activation's derivative is below 1 % of its maximum, "
        "so almost no gradient passes those units.",
        "warning",
    ),
    DEAD_UNITS.code: RuleText(
        "Most ReLU units are dead.",
        "Most units of a ReLU layer were ≤ 0 for every sample of the batch, so no gradient passes them.",
        "warning",
    ),
    FP16_UNDERFLOW.code: RuleText(
        "Half precision would flush gradients to zero.",
        "A large share of a layer's gradient elements lies below fp16's range (under 2.98e-8 they round to 0): for "
        "a float32 model even at the loss scale a GradScaler would reach, for an fp16 one without scaling; bf16 keeps "
        "float32's range.",
        "note",
    ),
    FP16_OVERFLOW.code: RuleText(
        "Half precision would overflow gradients.",
        "Some gradient elements exceed fp16's largest value (65504) and would become Inf.",
        "note",
    ),
    UNSTABLE_OPTIMISATION.code: RuleText(
        "Gradients grow without bound or collapse during optimisation.",
        "Over the optimisation probe's steps on the sample batch (--steps), the gradient norm or the path "
        "attenuation left the healthy band, or became NaN/Inf.",
        "error",
    ),
    TRAINING_SPIKE.code: RuleText(
        "The gradient norm spiked during training.",
        "A recorded training step's total gradient norm rose far above the median of the healthy records "
        "before it (gradcheck history, watch).",
        "error",
    ),
    TRAINING_LOSS_NON_FINITE.code: RuleText(
        "The training loss became NaN/Inf.",
        "A loss given to watch's step() was NaN/Inf; the step where it first happened is named even between "
        "recorded steps.",
        "error",
    ),
    TRAINING_LOSS_DIVERGENCE.code: RuleText(
        "The training loss diverged.",
        "The loss stayed above twice the median of the healthy records before it for 3 records in a row, "
        "dated from the first of them (gradcheck history, watch).",
        "error",
    ),
}


def render_sarif(report: Report) -> str:
    """One SARIF 2.1.0 log with one run, pretty-printed, ending with a newline."""
    log = {"$schema": SARIF_SCHEMA, "version": SARIF_VERSION, "runs": [_run(report)]}
    return json.dumps(log, indent=2, ensure_ascii=False) + "\n"


def help_uri(code: str) -> str:
    """The rule's entry in docs/rules.md."""
    return f"{RULES_DOC_URI}#{code.lower()}"


def fingerprint(finding: Finding) -> str:
    """A hash of the rule code and the layer: the same problem keeps it across runs whatever the numbers."""
    code, layer = finding_key(finding.code, finding.layer)  # path-level rules: the code alone
    return hashlib.sha256(f"{code}\0{layer or ''}".encode()).hexdigest()[:32]


def artifact_uri(source: str) -> str:
    """The checkpoint as a URI reference: the path as given, percent-encoded where it must be."""
    return quote(source.replace("\\", "/"), safe="/:@!$&'()*+,;=-._~")


def _run(report: Report) -> dict[str, Any]:
    version = report.run.gradcheck_version or __version__
    run: dict[str, Any] = {
        "tool": {
            "driver": {
                "name": "gradcheck",
                "version": version,
                "semanticVersion": version,
                "informationUri": INFORMATION_URI,
                "rules": [_rule(rule.code, rule.name) for rule in RULES],
            }
        },
        "invocations": [{"executionSuccessful": True}],
        "artifacts": [
            {
                "location": {"uri": artifact_uri(report.run.source)},
                "roles": ["analysisTarget"],
                "description": {"text": f"{report.run.model_type} ({report.run.checkpoint_kind})"},
            }
        ],
        "results": [_result(report, finding) for finding in report.findings],
        "properties": _properties(report),
    }
    return run


def _rule(code: str, name: str) -> dict[str, Any]:
    text = RULE_TEXT[code]
    return {
        "id": code,
        "name": name,
        "shortDescription": {"text": text.short},
        "fullDescription": {"text": text.full},
        "helpUri": help_uri(code),
        "help": {"text": f"{text.full} See {help_uri(code)}"},
        "defaultConfiguration": {"level": text.level},
    }


def _result(report: Report, finding: Finding) -> dict[str, Any]:
    codes = [rule.code for rule in RULES]
    location: dict[str, Any] = {
        "physicalLocation": {"artifactLocation": {"uri": artifact_uri(report.run.source), "index": 0}}
    }
    if finding.layer is not None:
        location["logicalLocations"] = [
            {"name": finding.layer or "(root)", "fullyQualifiedName": finding.layer or "(root)", "kind": "module"}
        ]
    result: dict[str, Any] = {
        "ruleId": finding.code,
        "level": LEVELS[finding.severity],
        "message": {"text": finding.message},
        "locations": [location],
        "partialFingerprints": {FINGERPRINT_KEY: fingerprint(finding)},
        "properties": json_safe(
            {
                "name": finding.name,
                "severity": finding.severity.value,
                "problem": finding.problem.value if finding.problem else None,
                "evidence": finding.evidence,
            }
        ),
    }
    if finding.code in codes:
        result["ruleIndex"] = codes.index(finding.code)
    if report.baseline is not None:
        result["baselineState"] = "new" if _in(finding, report.baseline.new_findings) else "unchanged"
    return result


def _in(finding: Finding, findings: tuple[Finding, ...]) -> bool:
    return any(f.code == finding.code and f.layer == finding.layer for f in findings)


def _properties(report: Report) -> dict[str, Any]:
    path = report.path
    properties: dict[str, Any] = {
        "status": report.status,
        "problems": [p.value for p in report.problems],
        "path": {
            "measured_with": path.measured_with,
            "attenuation": path.attenuation,
            "gain": path.gain,
            "length": path.length,
        },
        "recommendations": [r.id for r in report.recommendations],
        "notes": list(report.notes),
    }
    if report.baseline is not None:
        properties["baseline"] = _baseline(report.baseline)
    safe: dict[str, Any] = json_safe(properties)
    return safe


def _baseline(diff: BaselineDiff) -> dict[str, Any]:
    """Fixed findings and moved layers have no place among results (they are not problems): they go here."""

    return {
        "file": diff.baseline,
        "tolerance_orders": diff.tolerance,
        "regressed": diff.regressed,
        "fixed_findings": [
            {"ruleId": f.code, "layer": f.layer, "message": f.message, "fingerprint": fingerprint(f)}
            for f in diff.fixed_findings
        ],
        "worse_layers": [m.as_dict() for m in diff.worse_layers],
        "better_layers": [m.as_dict() for m in diff.better_layers],
    }
