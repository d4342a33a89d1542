"""Gradient health as a test assertion: ``assert_gradients_healthy`` and the ``gradcheck`` pytest fixture.

``assert_gradients_healthy(model, batch)`` runs :func:`gradcheck_cli.check` on a model and batch already
in memory and raises :class:`GradientHealthError`, an ``AssertionError``, when the report fails the gate
(``fail_on``, the vocabulary of ``--fail-on``). It needs no pytest: a plain script or another test runner
gets the same exception. Under pytest the message shows the verdict, the path, the worst layers, the
findings with their codes and the ranked recommendations; the exception's ``report`` holds everything.

Loaded as a pytest plugin (the ``pytest11`` entry point, or ``-p gradcheck_cli.pytest_plugin``), this
module adds the ``gradcheck`` fixture. It imports torch only when a check runs, so a test session that
never uses the fixture does not pay for torch. PYTEST_DONT_REWRITE: it holds no ``assert`` statements.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from gradcheck_cli.errors import GradcheckError
from gradcheck_cli.gate.fail_on import FailOn, parse_fail_on
from gradcheck_cli.render.numbers import number
from gradcheck_cli.report.report import LayerStats, Report

if TYPE_CHECKING:
    from torch import nn

__all__ = ["GradientChecker", "GradientHealthError", "assert_gradients_healthy", "failure_message"]

WORST_LAYERS = 5
"""How many layers the failure message lists, those furthest from the output end's gradient first."""


class GradientHealthError(AssertionError):
    """The gradients failed the check; ``report`` is the full :class:`~gradcheck_cli.report.report.Report`."""

    def __init__(self, message: str, report: Report) -> None:
        super().__init__(message)
        self.report = report


def assert_gradients_healthy(
    model: nn.Module,
    batch: Any,
    *,
    vanishing: float = 1e-3,
    exploding: float = 1e3,
    fail_on: str | Iterable[str] = "error",
    seed: int = 0,
    train: bool = True,
    unfreeze: bool = False,
    worst: int = WORST_LAYERS,
) -> Report:
    """Check ``model`` on ``batch`` and raise :class:`GradientHealthError` if the report fails ``fail_on``, or
    if the gradient path could not be measured (a TorchScript program without hooks or biases; not with
    ``fail_on="never"``).

    ``batch`` is what :func:`gradcheck_cli.check` takes: a tensor, ``(inputs..., target)`` or a dict of
    keyword tensors. ``vanishing`` and ``exploding`` are the attenuation thresholds (``--vanishing-below``,
    ``--exploding-above``); ``fail_on`` is a severity (``error``, ``warning``, ``info``), ``never`` or
    problem names (``vanishing``, ``exploding``, ``non_finite``), as ``--fail-on`` takes them. ``worst`` is
    how many layers the message lists. Returns the report when the check passes. A model or batch that
    cannot be probed raises :class:`~gradcheck_cli.errors.GradcheckError` (not an assertion: the test is
    broken, not the gradients); bad arguments raise ``ValueError``.
    """
    __tracebackhide__ = True  # pytest shows the caller's line, not this function's
    tokens = [fail_on] if isinstance(fail_on, str) else list(fail_on)
    gate = _gate(tokens)
    report = _check(model, batch, vanishing=vanishing, exploding=exploding, seed=seed, train=train, unfreeze=unfreeze)
    unmeasured = not report.measured and not gate.never
    if gate.fails(report) or unmeasured:  # a path nothing could measure is no evidence of health
        raise GradientHealthError(failure_message(report, fail_on=",".join(tokens), worst=worst), report)
    return report


class GradientChecker:
    """What the ``gradcheck`` fixture gives a test: call it (or ``assert_healthy``) to assert, ``check`` to measure."""

    def check(
        self,
        model: nn.Module,
        batch: Any,
        *,
        vanishing: float = 1e-3,
        exploding: float = 1e3,
        seed: int = 0,
        train: bool = True,
        unfreeze: bool = False,
    ) -> Report:
        """The report, without asserting anything: for tests about its numbers."""
        return _check(model, batch, vanishing=vanishing, exploding=exploding, seed=seed, train=train, unfreeze=unfreeze)

    def assert_healthy(
        self,
        model: nn.Module,
        batch: Any,
        *,
        vanishing: float = 1e-3,
        exploding: float = 1e3,
        fail_on: str | Iterable[str] = "error",
        seed: int = 0,
        train: bool = True,
        unfreeze: bool = False,
        worst: int = WORST_LAYERS,
    ) -> Report:
        """:func:`assert_gradients_healthy`."""
        __tracebackhide__ = True
        return assert_gradients_healthy(
            model,
            batch,
            vanishing=vanishing,
            exploding=exploding,
            fail_on=fail_on,
            seed=seed,
            train=train,
            unfreeze=unfreeze,
            worst=worst,
        )

    __call__ = assert_healthy

    def __repr__(self) -> str:
        return "GradientChecker()"


def failure_message(report: Report, *, fail_on: str = "error", worst: int = WORST_LAYERS) -> str:
    """The assertion message: verdict, run, path, the ``worst`` layers, findings, recommendations, notes."""
    if report.problems:
        verdict = f"unhealthy: {', '.join(p.value for p in report.problems)}"
    elif not report.measured:
        verdict = "not measured: the gradient path could not be measured (GC006), so health cannot be asserted"
    else:
        verdict = "healthy, but findings fail the gate"
    run = report.run
    lines = [
        f"gradcheck: {verdict} (fail_on={fail_on})",
        f"model: {run.model_type}, {run.parameters} parameters, {run.mode} mode, seed {run.seed}; "
        f"batch {run.batch}; loss {run.loss}",
        _path_line(report),
    ]
    ranked = _worst_layers(report)
    if ranked and worst > 0:
        label = "∂L/∂h" if report.path.measured_with == "activation_gradients" else "‖∂L/∂W‖/‖W‖"
        shown = ranked[:worst]
        lines.append(f"worst layers ({len(shown)} of {len(report.layers)}; {label} ÷ the output end's):")
        name_width = max(len(_name(layer)) for layer, _ in shown)
        type_width = max(len(layer.type) for layer, _ in shown)
        for layer, rel in shown:
            flags = ",".join(layer.flags) or "-"
            lines.append(
                f"  {_name(layer):<{name_width}}  {layer.type:<{type_width}}  {_fmt_rel(rel):>13}  flags: {flags}"
            )
        hidden = sorted((layer for layer, _ in ranked[len(shown) :] if layer.flags), key=lambda layer: layer.position)
        if hidden:
            span = f", {_name(hidden[0])} to {_name(hidden[-1])} in forward order" if len(hidden) > 1 else ""
            lines.append(f"  … and {len(hidden)} more flagged layer(s){span}")
    if report.findings:
        lines.append("findings:")
        for f in report.findings:
            where = f" [{f.layer}]" if f.layer else ""
            lines.append(f"  {f.code} {f.severity.value} {f.name}{where}: {f.message}")
    if report.recommendations:
        verified = {v.id: v for v in report.verifications}
        order = "ordered by the effect verified on a copy" if verified else "most likely fix first"
        lines.append(f"recommendations ({order}):")
        for rank, rec in enumerate(report.recommendations, start=1):
            check = verified.get(rec.id)
            tried = ""
            if check is not None and check.verified:
                tried = " (verified: healthy on a copy)" if check.fixed else " (tried on a copy: not enough alone)"
            lines.append(f"  {rank}. [{rec.id}] {rec.title}{tried}")
            first = next((line.strip() for line in rec.snippet.splitlines() if line.strip()), "")
            if first:
                lines.append(f"       {first}")
    lines.extend(f"note: {note}" for note in report.notes)
    lines.append("the exception's .report holds the full report (gradcheck_cli.render.text.render_text prints it)")
    return "\n".join(lines)


def _check(
    model: nn.Module, batch: Any, *, vanishing: float, exploding: float, seed: int, train: bool, unfreeze: bool
) -> Report:
    if not (0 < vanishing < 1 < exploding):
        raise ValueError(f"thresholds must satisfy 0 < vanishing < 1 < exploding (got {vanishing}, {exploding})")
    from gradcheck_cli.api import check
    from gradcheck_cli.diagnose.rules import Thresholds
    from gradcheck_cli.settings import ProbeSettings, Provenance

    settings = ProbeSettings(
        seed=seed, train=train, unfreeze=unfreeze, thresholds=Thresholds(vanishing=vanishing, exploding=exploding)
    )
    return check(model, batch, settings, Provenance(batch_source="passed to assert_gradients_healthy()"))


def _gate(tokens: list[str]) -> FailOn:
    try:
        return parse_fail_on(tokens)
    except GradcheckError as error:
        raise ValueError(str(error).replace("--fail-on", "fail_on")) from None


def _path_line(report: Report) -> str:
    path = report.path
    limits = report.thresholds
    bounds = (
        f"thresholds: vanishing below {limits['vanishing_attenuation']:g}, "
        f"exploding above {limits['exploding_attenuation']:g}"
        if {"vanishing_attenuation", "exploding_attenuation"} <= limits.keys()
        else "thresholds: n/a"
    )
    if path.attenuation is None:
        return f"path: the gradient could not be followed from output to input; {bounds}"
    gain = "n/a" if path.gain is None else f"{path.gain:.3g}"
    return (
        f"path: input end ({path.first_layer}) / output end ({path.last_layer}) = {_fmt_rel(path.attenuation)} "
        f"over {path.length} calls, gain {gain} per layer; {bounds}"
    )


def _worst_layers(report: Report) -> list[tuple[LayerStats, float | None]]:
    """Layers ranked by |log10| of their gradient relative to the output end's; unmeasured ones only if flagged."""
    activation = report.path.measured_with == "activation_gradients"
    reference = None if activation else _parameter_reference(report.layers)
    scored = []
    for layer in report.layers:
        rel = layer.act_grad_rel if activation else _ratio(layer.grad_weight_ratio, reference)
        if rel is None and layer.act_grad_norm is not None and not math.isfinite(layer.act_grad_norm):
            rel = layer.act_grad_norm
        distance = _distance(rel, layer)
        if distance is not None:
            scored.append((distance, layer, rel))
    scored.sort(key=lambda item: (-item[0], item[1].position < 0, item[1].position))
    return [(layer, rel) for _, layer, rel in scored]


def _distance(rel: float | None, layer: LayerStats) -> float | None:
    """Orders of magnitude from the output end's gradient: infinite for zero, NaN/Inf and cut layers."""
    if rel is None:
        return math.inf if layer.flags else None
    if rel <= 0 or not math.isfinite(rel):
        return math.inf
    return abs(math.log10(rel))


def _parameter_reference(layers: tuple[LayerStats, ...]) -> float | None:
    ordered = sorted(layers, key=lambda layer: (layer.position < 0, layer.position))
    return next((layer.grad_weight_ratio for layer in reversed(ordered) if layer.grad_weight_ratio), None)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def _name(layer: LayerStats) -> str:
    return layer.name or "(root)"


def _fmt_rel(value: float | None) -> str:
    if value is None:
        return "not measured"
    if value == 0:
        return "0 (underflow)"
    return number(value, ".2e")


try:
    import pytest
except ModuleNotFoundError:  # the assertion works without pytest; only the fixture needs it
    pass
else:

    @pytest.fixture(name="gradcheck")
    def gradcheck_fixture() -> GradientChecker:
        """Assert gradient health in a test: ``gradcheck(model, batch)``; ``gradcheck.check`` only measures."""
        return GradientChecker()
