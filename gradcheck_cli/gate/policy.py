"""Which findings a team wants to see: ``--select`` / ``--ignore`` by rule code, ``--ignore-layer`` by name."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass, replace

from gradcheck_cli.diagnose.rule_codes import PATH_RULES, RULES
from gradcheck_cli.errors import GradcheckError
from gradcheck_cli.report.report import Finding, Report

RULE_CODES = frozenset(rule.code for rule in RULES)
"""The codes of docs/rules.md, from the one table of rules (no torch import here)."""


@dataclass(frozen=True)
class Policy:
    """Selected and ignored rule codes and ignored layer-name patterns (fnmatch, e.g. ``encoder.*.attn``)."""

    select: frozenset[str] | None = None
    ignore: frozenset[str] = frozenset()
    ignore_layers: tuple[str, ...] = ()

    @classmethod
    def build(cls, select: Iterable[str] = (), ignore: Iterable[str] = (), ignore_layers: Iterable[str] = ()) -> Policy:
        """A policy from flag or config values, rejecting codes that do not exist."""
        chosen = _codes(select, "--select")
        return cls(select=chosen or None, ignore=_codes(ignore, "--ignore"), ignore_layers=tuple(ignore_layers))

    def keeps(self, code: str, layer: str | None) -> bool:
        """Whether a finding with this code about this layer stays in the report.

        Path-level findings (:data:`PATH_RULES`) name only where the gradient crosses the threshold;
        ``apply`` drops them when every layer flagged with their problem is ignored.
        """
        if self.select is not None and code not in self.select:
            return False
        if code in self.ignore:
            return False
        return code in PATH_RULES or not (layer is not None and self.layer_ignored(layer))

    def _all_flagged_ignored(self, report: Report, finding: Finding) -> bool:
        flagged = _flagged_layers(report, finding) or ([finding.layer] if finding.layer else [])
        return bool(self.ignore_layers) and bool(flagged) and all(self.layer_ignored(name) for name in flagged)

    def layer_ignored(self, name: str) -> bool:
        """Whether a layer name matches one of the ignored patterns."""
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.ignore_layers)

    def apply(self, report: Report) -> Report:
        """The report without the findings this policy drops, their layers' flags, and advice left without a finding."""
        if self.select is None and not self.ignore and not self.ignore_layers:
            return report
        findings = tuple(
            f
            for f in report.findings
            if self.keeps(f.code, f.layer) and not (f.code in PATH_RULES and self._all_flagged_ignored(report, f))
        )
        problems = {f.problem for f in findings if f.problem is not None}
        advice = tuple(r for r in report.recommendations if not r.addresses or set(r.addresses) & problems)
        layers = tuple(
            replace(layer, flags=()) if self.layer_ignored(layer.name) or not problems else layer
            for layer in report.layers
        )
        dropped = len(report.findings) - len(findings)
        notes = report.notes + (
            (f"{dropped} finding(s) left out by --select/--ignore/--ignore-layer",) if dropped else ()
        )
        kept = {r.id for r in advice}
        verifications = tuple(v for v in report.verifications if v.id in kept)
        return replace(
            report, findings=findings, recommendations=advice, verifications=verifications, layers=layers, notes=notes
        )


def _flagged_layers(report: Report, finding: Finding) -> list[str]:
    problem = finding.problem.value if finding.problem is not None else None
    return [layer.name for layer in report.layers if problem in layer.flags]


def _codes(values: Iterable[str], flag: str) -> frozenset[str]:
    codes = frozenset(token.strip().upper() for value in values for token in value.split(",") if token.strip())
    unknown = sorted(codes - RULE_CODES)
    if unknown:
        raise GradcheckError(
            f"{flag} {', '.join(unknown)}: no such rule code; see docs/rules.md ({min(RULE_CODES)}–{max(RULE_CODES)})"
        )
    return codes
