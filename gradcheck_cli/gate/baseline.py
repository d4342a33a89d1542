"""Baselines: store a report, then judge a later run only by what got worse (``--baseline``)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from gradcheck_cli.diagnose.rule_codes import finding_key
from gradcheck_cli.errors import GradcheckError
from gradcheck_cli.outputs import write_text
from gradcheck_cli.parsing import MalformedDocument, loads_json
from gradcheck_cli.report.report import BaselineDiff, Finding, LayerMove, Problem, Report, Severity

DEFAULT_TOLERANCE = 1.0
"""Orders of magnitude a layer's relative gradient may move before it counts as a change."""


def write_baseline(report: Report, path: Path) -> None:
    """Store the report as JSON (the same object as ``--format json``)."""
    write_text(path, json.dumps(report.to_dict(), indent=2, ensure_ascii=False) + "\n", "--write-baseline")


def read_baseline(path: Path) -> dict[str, Any]:
    """A stored baseline: plain JSON, nothing executed."""
    if path.exists() and not path.is_file():  # a FIFO would block the run
        raise GradcheckError(f"--baseline {path} is not a regular file; pass a report written by --write-baseline")
    try:
        data = loads_json(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise GradcheckError(f"cannot read --baseline {path}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, MalformedDocument) as exc:
        raise GradcheckError(f"--baseline {path} is not a gradcheck JSON report: {exc}") from None
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("findings"), list)
        or not isinstance(data.get("layers"), list)
    ):
        raise GradcheckError(f"--baseline {path} is not a gradcheck JSON report (write one with --write-baseline)")
    return data


def compare(
    report: Report,
    path: Path,
    tolerance: float = DEFAULT_TOLERANCE,
    keeps: Callable[[str, str | None], bool] = lambda code, layer: True,
    layer_ignored: Callable[[str], bool] = lambda name: False,
) -> Report:
    """The report with its :class:`BaselineDiff` against the baseline stored at ``path``.

    ``keeps`` and ``layer_ignored`` are the run's ``--select``/``--ignore``/``--ignore-layer`` policy,
    applied to the stored report too, so what the policy hides is neither new nor fixed nor worse.
    A finding is new when the baseline has none with its key, or only a less severe one.
    """
    if not math.isfinite(tolerance) or tolerance < 0:
        raise GradcheckError(f"--tolerance must be zero or positive (orders of magnitude), got {tolerance}")
    data = read_baseline(path)
    stored = [f for f in (_finding(entry) for entry in data["findings"] if isinstance(entry, dict)) if f is not None]
    stored = [f for f in stored if keeps(f.code, f.layer)]
    before: dict[tuple[str, str | None], int] = {}
    for f in stored:
        key = finding_key(f.code, f.layer)
        before[key] = max(before.get(key, -1), f.severity.rank)
    now = {finding_key(f.code, f.layer) for f in report.findings}
    new = tuple(f for f in report.findings if f.severity.rank > before.get(finding_key(f.code, f.layer), -1))
    fixed = tuple(f for f in stored if finding_key(f.code, f.layer) not in now)
    old_rel = {
        entry["name"]: float(entry["act_grad_rel"])
        for entry in data["layers"]
        if isinstance(entry, dict)
        and isinstance(entry.get("name"), str)
        and isinstance(entry.get("act_grad_rel"), (int, float))
        and math.isfinite(entry["act_grad_rel"])
        and entry["act_grad_rel"] > 0
    }
    worse: list[LayerMove] = []
    better: list[LayerMove] = []
    for layer in report.layers:
        previous = old_rel.get(layer.name)
        current = layer.act_grad_rel
        if previous is None or current is None or layer_ignored(layer.name):
            continue
        move = LayerMove(layer.name, previous, current)
        if not (current > 0 and math.isfinite(current)):  # collapsed to 0, or overflowed / NaN
            worse.append(move)
            continue
        if abs(move.orders) <= tolerance:
            continue
        (better if abs(math.log10(current)) < abs(math.log10(previous)) else worse).append(move)
    diff = BaselineDiff(
        baseline=str(path),
        tolerance=tolerance,
        new_findings=new,
        fixed_findings=fixed,
        worse_layers=tuple(worse),
        better_layers=tuple(better),
    )
    return replace(report, baseline=diff)


def _finding(entry: dict[str, Any]) -> Finding | None:
    """A stored finding, or None when the entry is not one (a hand-edited or foreign file)."""
    code, layer, severity, problem = (entry.get(k) for k in ("code", "layer", "severity", "problem"))
    if not isinstance(code, str) or not (layer is None or isinstance(layer, str)):
        return None
    severities = {s.value: s for s in Severity}
    problems = {p.value: p for p in Problem}
    return Finding(
        code=code,
        name=str(entry.get("name", "")),
        severity=severities.get(severity, Severity.INFO) if isinstance(severity, str) else Severity.INFO,
        problem=problems.get(problem) if isinstance(problem, str) else None,
        layer=layer,
        message=str(entry.get("message", "")),
    )
