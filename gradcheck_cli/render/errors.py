"""What each format shows when gradcheck could not run (exit 2) or hit an internal error (exit 3).

A consumer that parses a machine format must always find a document: JSON gets an
:class:`~gradcheck_cli.report.error.ErrorReport` (``status: "error"``, the exit code, the message; in
docs/report.schema.json), SARIF a run whose invocation failed with a tool-execution notification, JUnit an
``<error>`` test case, GitHub an ``::error`` workflow command. Text, Markdown and HTML on standard output get
nothing beyond the ``error: …`` line on standard error; written to an ``--output`` file, they hold that line
too, so the file never keeps an earlier run's report.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from html import escape

from gradcheck_cli.render.github import command
from gradcheck_cli.render.junit import SUITE, clean
from gradcheck_cli.render.registry import ReportFormat
from gradcheck_cli.render.sarif import INFORMATION_URI, SARIF_SCHEMA, SARIF_VERSION
from gradcheck_cli.report.error import ErrorReport
from gradcheck_cli.version import __version__

MACHINE_FORMATS = frozenset({ReportFormat.json, ReportFormat.sarif, ReportFormat.junit, ReportFormat.github})
"""The formats a program parses: they get an error document on standard output too."""
WHAT = {2: "could not run", 3: "hit an internal error"}


def render_error(kind: ReportFormat, error: ErrorReport) -> str:
    """The error document of ``kind``, ending with a newline."""
    if kind is ReportFormat.json:
        return json.dumps(error.to_dict(), indent=2, ensure_ascii=False) + "\n"
    if kind is ReportFormat.sarif:
        return _sarif(error)
    if kind is ReportFormat.junit:
        return _junit(error)
    what = f"gradcheck {WHAT.get(error.code, 'failed')} (exit {error.code})"
    if kind is ReportFormat.github:
        return command("error", error.message, title=what) + "\n"
    if kind is ReportFormat.markdown:
        return f"## gradcheck: ⚠️ error — {what}\n\n{error.message}\n"
    if kind is ReportFormat.html:
        return (
            '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f"<title>{escape(what)}</title>\n</head>\n<body>\n<h1>{escape(what)}</h1>\n"
            f"<p>error: {escape(error.message)}</p>\n</body>\n</html>\n"
        )
    return f"error: {error.message}\n"


def _sarif(error: ErrorReport) -> str:
    """A SARIF log with one run: no results, its invocation failed, the reason a tool-execution notification."""
    notification = {
        "level": "error",
        "message": {"text": error.message},
        "descriptor": {"id": f"exit-{error.code}"},
    }
    run = {
        "tool": {
            "driver": {
                "name": "gradcheck",
                "version": __version__,
                "semanticVersion": __version__,
                "informationUri": INFORMATION_URI,
                "rules": [],
            }
        },
        "invocations": [
            {"executionSuccessful": False, "exitCode": error.code, "toolExecutionNotifications": [notification]}
        ],
        "results": [],
        "properties": {"status": "error", "code": error.code},
    }
    log = {"$schema": SARIF_SCHEMA, "version": SARIF_VERSION, "runs": [run]}
    return json.dumps(log, indent=2, ensure_ascii=False) + "\n"


def _junit(error: ErrorReport) -> str:
    """A ``<testsuites>`` document whose one test case errored (JUnit's word for "could not run")."""
    root = ET.Element("testsuites", name=SUITE, tests="1", failures="0", errors="1", skipped="0")
    suite = ET.SubElement(root, "testsuite", name=SUITE, tests="1", failures="0", errors="1", skipped="0")
    case = ET.SubElement(suite, "testcase", name="gradcheck ran", classname=SUITE)
    failed = ET.SubElement(case, "error", message=clean(error.message), type=f"exit-{error.code}")
    failed.text = clean(f"gradcheck {WHAT.get(error.code, 'failed')} (exit {error.code}): {error.message}")
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"
