"""The CI gate: which findings fail the run (``--fail-on``)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from gradcheck_cli.errors import GradcheckError
from gradcheck_cli.report.report import Finding, Problem, Report, Severity


@dataclass(frozen=True)
class FailOn:
    """Fail on findings at or above a severity, or on error findings of the named problems.

    Problem names match errors only (what the report lists under ``problems``); warnings, such as
    a gated RNN vanishing through time, fail the gate with ``--fail-on warning``.
    """

    severity: Severity | None = Severity.ERROR
    problems: frozenset[Problem] = frozenset()

    @property
    def never(self) -> bool:
        """``--fail-on never``: nothing fails the gate."""
        return self.severity is None and not self.problems

    def fails(self, report: Report) -> bool:
        """Whether ``report`` holds a finding that fails the gate.

        With a baseline, only what got worse counts: new findings, and layers whose gradient moved
        beyond the tolerance (unless the gate is ``never``).
        """
        if report.baseline is None:
            return any(self._fails_on(f) for f in report.findings)
        if self.never:
            return False
        return bool(report.baseline.worse_layers) or any(self._fails_on(f) for f in report.baseline.new_findings)

    def _fails_on(self, finding: Finding) -> bool:
        if self.severity is not None and finding.severity.rank >= self.severity.rank:
            return True
        return finding.severity is Severity.ERROR and finding.problem in self.problems


FAIL_ON_CHOICES = ("error", "warning", "info", "never", *(p.value for p in Problem))


def parse_fail_on(values: Iterable[str]) -> FailOn:
    """Parse ``--fail-on`` values (repeatable, comma-separated): a severity, ``never`` or problem names."""
    tokens = [t.strip().lower().replace("-", "_") for v in values for t in v.split(",") if t.strip()]
    severity: Severity | None = None
    problems: set[Problem] = set()
    for token in tokens or ["error"]:
        if token == "never":
            continue
        if token in ("error", "warning", "info"):
            candidate = Severity(token)
            if severity is None or candidate.rank < severity.rank:
                severity = candidate
        elif token in {p.value for p in Problem}:
            problems.add(Problem(token))
        else:
            raise GradcheckError(f"--fail-on {token!r} is not one of: {', '.join(FAIL_ON_CHOICES)}")
    return FailOn(severity=severity, problems=frozenset(problems))
