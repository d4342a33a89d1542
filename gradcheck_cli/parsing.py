"""JSON and TOML from files the user gave, where every malformed document is one ``ValueError``.

``json.loads`` raises ``RecursionError`` on a document nested a few thousand levels deep and a plain
``ValueError`` (not a ``JSONDecodeError``) on an integer of more than 4300 digits; ``tomllib`` recurses
too. Callers catch ``ValueError`` and turn it into their one-line error.
"""

from __future__ import annotations

import json
import sys
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


class MalformedDocument(ValueError):
    """The text is not a document gradcheck can read; ``str()`` is one line."""


def loads_json(text: str | bytes) -> Any:
    """``json.loads`` whose every failure on malformed or hostile input is :class:`MalformedDocument`."""
    try:
        return json.loads(text)
    except RecursionError:
        raise MalformedDocument("nested too deeply to be a real document") from None
    except UnicodeDecodeError:
        raise MalformedDocument("not UTF-8 text") from None
    except ValueError as exc:  # JSONDecodeError, or an integer too long to convert
        raise MalformedDocument(_reason(exc, "not valid JSON")) from None


def loads_toml(text: str) -> dict[str, Any]:
    """``tomllib.loads`` whose every failure on malformed or hostile input is :class:`MalformedDocument`."""
    try:
        return tomllib.loads(text)
    except RecursionError:
        raise MalformedDocument("nested too deeply to be a real document") from None
    except ValueError as exc:  # TOMLDecodeError, or an integer too long to convert
        raise MalformedDocument(_reason(exc, "not valid TOML")) from None


def _reason(exc: ValueError, fallback: str) -> str:
    """The parser's first line, in the user's terms (Python's advice to raise its digit limit is not theirs)."""
    text = str(exc).splitlines()[0] if str(exc) else fallback
    if "integer string conversion" in text:
        return "it holds an integer thousands of digits long, which no real value needs"
    return text
