"""The JUnit XML report: one test case per rule, which GitLab, Jenkins and GitHub test reporters read.

Each rule in ``RULES`` is a test case, so every run lists the same checks. Error and warning
findings become ``<failure>`` elements of their rule's test case (``type`` says which severity);
a rule with several findings (one per layer) has several. Info findings fail nothing: they are
listed in the test case's ``<system-out>``. With a baseline, a second test suite holds two test
cases, new findings and worse layers, that fail when the model regressed.
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET

from gradcheck_cli.diagnose.rules import RULES
from gradcheck_cli.report.report import BaselineDiff, Finding, LayerMove, Report, Severity, json_safe

SUITE = "gradcheck"
BASELINE_SUITE = "gradcheck.baseline"
_NOT_XML = re.compile("[^\t\n\r\u0020-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def render_junit(report: Report) -> str:
    """A ``<testsuites>`` document with the ``gradcheck`` suite (and the baseline suite), ending with a newline."""
    root = ET.Element("testsuites", name=SUITE)
    suites = [_rules_suite(report)]
    if report.baseline is not None:
        suites.append(_baseline_suite(report.baseline))
    for suite in suites:
        root.append(suite)
    _count(root, suites)
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def clean(text: str) -> str:
    """Text without the control characters XML 1.0 cannot hold."""
    return _NOT_XML.sub("\ufffd", text)


def _count(element: ET.Element, suites: list[ET.Element]) -> None:
    for key in ("tests", "failures", "errors", "skipped"):
        element.set(key, str(sum(int(suite.get(key, "0")) for suite in suites)))


def _suite(name: str, cases: list[ET.Element]) -> ET.Element:
    suite = ET.Element("testsuite", name=name)
    failed = sum(case.find("failure") is not None for case in cases)
    suite.set("tests", str(len(cases)))
    suite.set("failures", str(failed))
    suite.set("errors", "0")
    suite.set("skipped", "0")
    suite.extend(cases)
    return suite


def _rules_suite(report: Report) -> ET.Element:
    cases = []
    for rule in RULES:
        findings = [f for f in report.findings if f.code == rule.code]
        case = ET.Element("testcase", name=f"{rule.code} {rule.name}", classname=SUITE)
        for finding in findings:
            if finding.severity is not Severity.INFO:
                case.append(_failure(finding, report.baseline))
        info = [f for f in findings if f.severity is Severity.INFO]
        if info:
            ET.SubElement(case, "system-out").text = clean("\n".join(_describe(f) for f in info))
        cases.append(case)
    suite = _suite(SUITE, cases)
    properties = ET.Element("properties")
    run = report.run
    for name, value in (
        ("status", report.status),
        ("problems", ",".join(p.value for p in report.problems)),
        ("source", run.source),
        ("model_type", run.model_type),
        ("checkpoint_kind", run.checkpoint_kind),
        ("mode", run.mode),
        ("seed", str(run.seed)),
        ("gradcheck_version", run.gradcheck_version),
        ("torch_version", run.torch_version),
    ):
        ET.SubElement(properties, "property", name=name, value=clean(value))
    suite.insert(0, properties)
    if report.notes:
        ET.SubElement(suite, "system-out").text = clean("\n".join(f"note: {note}" for note in report.notes))
    return suite


def _failure(finding: Finding, baseline: BaselineDiff | None) -> ET.Element:
    failure = ET.Element("failure", message=clean(finding.message), type=finding.severity.value)
    text = _describe(finding)
    if baseline is not None:
        new = any(f.code == finding.code and f.layer == finding.layer for f in baseline.new_findings)
        text += "\nnew since the baseline" if new else "\nalready in the baseline"
    failure.text = clean(text)
    return failure


def _describe(finding: Finding) -> str:
    layer = "the whole model" if finding.layer is None else f"layer {finding.layer or '(root)'}"
    lines = [f"{finding.code} {finding.name} ({finding.severity.value}) at {layer}", finding.message]
    if finding.evidence:
        lines.append("evidence: " + json.dumps(json_safe(finding.evidence), ensure_ascii=False))
    return "\n".join(lines)


def _baseline_suite(diff: BaselineDiff) -> ET.Element:
    head = f"baseline {diff.baseline}, tolerance {diff.tolerance:g} order{'' if diff.tolerance == 1 else 's'}"
    new = ET.Element("testcase", name="no new findings", classname=BASELINE_SUITE)
    if diff.new_findings:
        failure = ET.SubElement(
            new, "failure", message=f"{len(diff.new_findings)} new finding(s) since the baseline", type="regression"
        )
        failure.text = clean("\n\n".join(_describe(f) for f in diff.new_findings))
    if diff.fixed_findings:
        ET.SubElement(new, "system-out").text = clean(
            "fixed since the baseline:\n" + "\n\n".join(_describe(f) for f in diff.fixed_findings)
        )
    worse = ET.Element("testcase", name="no layer worse beyond the tolerance", classname=BASELINE_SUITE)
    if diff.worse_layers:
        failure = ET.SubElement(
            worse,
            "failure",
            message=clean(f"{len(diff.worse_layers)} layer(s) worse than the {head}"),
            type="regression",
        )
        failure.text = clean("\n".join(_move(m) for m in diff.worse_layers))
    if diff.better_layers:
        ET.SubElement(worse, "system-out").text = clean(
            "better than the baseline:\n" + "\n".join(_move(m) for m in diff.better_layers)
        )
    suite = _suite(BASELINE_SUITE, [new, worse])
    properties = ET.Element("properties")
    ET.SubElement(properties, "property", name="baseline", value=clean(diff.baseline))
    ET.SubElement(properties, "property", name="tolerance_orders", value=f"{diff.tolerance:g}")
    ET.SubElement(properties, "property", name="regressed", value=str(diff.regressed).lower())
    suite.insert(0, properties)
    return suite


def _move(move: LayerMove) -> str:
    return f"layer {move.layer or '(root)'}: {move.before:.3g} -> {move.after:.3g} ({move.orders:+.2f} orders)"
