"""Reports made safe to show: control characters from the file's names escaped, in every string.

Layer names, parameter keys and class names come from the user's file. One that holds terminal escape
sequences (``\\x1b[2J``), carriage returns or bidirectional overrides would redraw the terminal or the CI log
when printed raw. Every human-readable format shows the report through :func:`printable`: each such
character becomes a visible ``\\x1b``-style escape. Newlines and tabs, which gradcheck's own messages and
snippets use, are kept. JSON needs none of this: ``json.dumps`` escapes control characters itself.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, TypeVar

T = TypeVar("T")

_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def printable_text(text: str) -> str:
    """``text`` with every control character but newline and tab shown as an escape."""
    return _UNSAFE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


def printable(value: T) -> T:
    """A copy of ``value`` (a frozen report, or anything inside one) whose every string is printable."""
    return _clean(value)  # type: ignore[no-any-return]


def _clean(value: Any) -> Any:
    if isinstance(value, str):
        return printable_text(value) if _UNSAFE.search(value) else value
    if isinstance(value, tuple):
        cleaned = tuple(_clean(v) for v in value)
        return type(value)(*cleaned) if hasattr(value, "_fields") else cleaned
    if isinstance(value, list):
        return [_clean(v) for v in value]
    if isinstance(value, dict):
        return {_clean(k): _clean(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {f.name: _clean(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
        return dataclasses.replace(value, **changes)
    return value
