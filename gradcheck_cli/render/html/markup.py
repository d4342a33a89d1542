"""The small pieces of markup every section of the HTML page uses; every string goes through ``escape``."""

from __future__ import annotations

import math
from collections.abc import Iterable
from html import escape

from gradcheck_cli.render.numbers import number
from gradcheck_cli.report.report import Report, Severity

NUMERIC = ' class="n"'
SEVERITY_WORD = {Severity.ERROR: "error", Severity.WARNING: "warning", Severity.INFO: "info"}


def e(text: object) -> str:
    """``text`` escaped for HTML text and attribute values."""
    return escape(str(text), quote=True)


def num(value: float | None, spec: str = ".3g") -> str:
    """A number as the tables show it (:func:`gradcheck_cli.render.numbers.number`), escaped."""
    return e(number(value, spec))


def code(text: str) -> str:
    return f"<code>{e(text)}</code>"


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def ul(items: Iterable[str], cls: str | None = None) -> str:
    """A list of items that are already HTML."""
    attr = f' class="{cls}"' if cls else ""
    return f"<ul{attr}>" + "".join(f"<li>{item}</li>" for item in items) + "</ul>"


def anchors(report: Report) -> dict[str, int]:
    """Each layer name → the index of its row (``#L{index}``) in the layer table."""
    names: dict[str, int] = {}
    for index, layer in enumerate(report.layers):
        names.setdefault(layer.name, index)
    return names


def layer_ref(name: str | None, names: dict[str, int]) -> str:
    """A layer name as code, linked to its table row when the table has it."""
    if name is None:
        return '<span class="muted">(model)</span>'
    shown = code(name or "(root)")
    return f'<a href="#L{names[name]}">{shown}</a>' if name in names else shown


def sort_value(value: float | None) -> str:
    """A ``data-v`` for the sorting script: JS ``parseFloat`` reads it; empty for a missing value."""
    if value is None:
        return ""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return repr(float(value))


def simple_table(headers: list[tuple[str, bool]], rows: list[list[str]], row_classes: list[str] | None = None) -> str:
    """A plain table; ``headers`` are (title, numeric); cells are already HTML."""
    head = "".join(f"<th{NUMERIC if numeric else ''}>{e(title)}</th>" for title, numeric in headers)
    body = []
    for k, row in enumerate(rows):
        cls = f' class="{row_classes[k]}"' if row_classes and row_classes[k] else ""
        cells = "".join(
            f"<td{NUMERIC if numeric else ''}>{cell}</td>" for cell, (_, numeric) in zip(row, headers, strict=True)
        )
        body.append(f"<tr{cls}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
