"""The JSON Schema of the report (docs/report.schema.json), generated from the report's dataclasses.

Every object is closed (``additionalProperties: false``) and every key that ``Report.to_dict`` writes is
required, so a field added to a dataclass, or a key ``to_dict`` writes that no dataclass declares, fails
validation until the schema is generated again (tests/test_schema.py compares the committed file with
:func:`schema_text`). Descriptions are the classes' and fields' docstrings. What the dataclasses cannot
say lives in the tables below: the keys ``to_dict`` derives or renames, and the constraints on a value.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import textwrap
import types
import typing
from enum import Enum
from typing import Any

from gradcheck_cli.report.error import ErrorReport
from gradcheck_cli.report.report import (
    NOT_MEASURED,
    SCHEMA_VERSION,
    STATUSES,
    BaselineDiff,
    LayerMove,
    LayerStats,
    Problem,
    Report,
)

TITLE = "gradcheck inspect report"
DESCRIPTION = (
    "The object `gradcheck inspect --format json` prints (DESIGN.md section 3); `gradcheck history --format json` "
    "prints the same object with `history` set. A run that could not run (exit 2) or hit an internal error "
    '(exit 3) prints an ErrorReport instead: status "error", the exit code and the message. Changes are additive '
    "only; schema_version is bumped on any breaking change. Numbers that are NaN or infinite are written as the "
    'strings "nan", "inf" and "-inf". '
    "Generated from gradcheck_cli/report (python -m pytest tests/test_schema.py with GRADCHECK_UPDATE_GOLDEN=1)."
)
NUMBER = {"$ref": "#/$defs/number"}
NULL = {"type": "null"}
JSON_TYPES: dict[Any, str] = {str: "string", int: "integer", bool: "boolean"}

RENAMED: dict[type, dict[str, str]] = {BaselineDiff: {"baseline": "file", "tolerance": "tolerance_orders"}}
"""Fields ``to_dict`` writes under another key."""
DERIVED: dict[type, dict[str, dict[str, Any]]] = {
    Report: {
        "schema_version": {"const": SCHEMA_VERSION},
        "status": {"enum": list(STATUSES)},
        "problems": {"type": "array", "items": {"$ref": "#/$defs/Problem"}, "uniqueItems": True},
    },
    LayerStats: {"grad_weight_ratio": {"anyOf": [NULL, NUMBER]}},
    LayerMove: {"orders": NUMBER},
    BaselineDiff: {"regressed": {"type": "boolean"}},
    ErrorReport: {"schema_version": {"const": SCHEMA_VERSION}, "status": {"const": "error"}},
}
"""Keys ``to_dict`` computes from a property (described by the property's docstring) or from ``healthy``."""
DERIVED_FIRST = ("schema_version", "status", "problems")
"""Report (and ErrorReport) keys written before the fields, in this order."""
IS_ERROR = {"properties": {"status": {"const": "error"}}, "required": ["status"]}
"""An object whose ``status`` is ``error`` is an :class:`ErrorReport`; any other, a :class:`Report`."""
OVERRIDDEN: dict[tuple[type, str], dict[str, Any]] = {
    (Report, "timing"): {"anyOf": [NULL, {"type": "object", "additionalProperties": NUMBER}]},
}
"""Fields whose JSON is not their type's: ``timing`` is null when empty."""
CONSTRAINTS: dict[tuple[str, str], dict[str, Any]] = {
    ("ErrorReport", "code"): {"enum": [2, 3]},
    ("LayerStats", "position"): {"minimum": -1},
    ("LayerStats", "calls"): {"minimum": 0},
    ("LayerStats", "params"): {"minimum": 0},
    ("PathSummary", "length"): {"minimum": 0},
    ("RunInfo", "parameters"): {"minimum": 0},
    ("RunInfo", "mode"): {"enum": ["train", "eval"]},
    ("Finding", "code"): {"pattern": "^GC[0-9]{3}$"},
    ("Recommendation", "id"): {"pattern": "^[a-z0-9_]+$"},
    ("InitLayer", "flag"): {"enum": ["too_small", "too_large", None]},
    ("ActivationLayer", "flag"): {"enum": ["saturated", "dead", None]},
    ("StepRecord", "step"): {"minimum": 0},
    ("Onset", "step"): {"minimum": 0},
    ("Onset", "codes"): {"items": {"type": "string", "pattern": "^GC[0-9]{3}$"}},
    ("Onset", "problem"): {"enum": [p.value for p in Problem]},
    ("TrainingHistory", "every"): {"minimum": 1},
    ("TrainingHistory", "records"): {"minimum": 0},
    ("TrainingHistory", "earlier_runs"): {"minimum": 0},
    ("TrainingHistory", "skipped_lines"): {"minimum": 0},
    ("TrainingHistory", "problem_steps"): {
        "items": {
            "type": "array",
            "prefixItems": [
                {"type": "integer", "minimum": 0},
                {"type": "array", "items": {"$ref": "#/$defs/Problem"}},
            ],
            "minItems": 2,
            "maxItems": 2,
        }
    },
}
"""Constraints on values that their Python type does not carry (merged into the generated property)."""
HEALTH = [
    {
        "if": {"properties": {"status": {"const": status}}, "required": ["status"]},
        "then": {"properties": {"problems": {bound: count}}},
    }
    for status, bound, count in (
        ("healthy", "maxItems", 0),
        ("unhealthy", "minItems", 1),
        (NOT_MEASURED, "maxItems", 0),
    )
]
"""A healthy report lists no problem, an unhealthy one at least one, a not-measured one none."""


def report_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of ``Report.to_dict()``, or of ``ErrorReport.to_dict()`` where
    ``status`` is ``error``."""
    defs: dict[str, Any] = {
        "number": {
            "description": "A number, or one of the strings that stand for NaN and the infinities.",
            "anyOf": [{"type": "number"}, {"enum": ["nan", "inf", "-inf"]}],
        }
    }
    defs["Report"] = {**_object(Report, defs), "allOf": HEALTH}
    defs["ErrorReport"] = _object(ErrorReport, defs)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": TITLE,
        "description": DESCRIPTION,
        "if": IS_ERROR,
        "then": {"$ref": "#/$defs/ErrorReport"},
        "else": {"$ref": "#/$defs/Report"},
        "$defs": dict(sorted(defs.items())),
    }


def schema_text() -> str:
    """The schema as docs/report.schema.json holds it: two-space indent, a final newline."""
    return json.dumps(report_schema(), indent=2, ensure_ascii=False) + "\n"


def _object(cls: type, defs: dict[str, Any]) -> dict[str, Any]:
    """A closed object schema for a dataclass: its fields, renamed and derived keys, all required."""
    hints = typing.get_type_hints(cls)
    docs = _field_docs(cls)
    renamed = RENAMED.get(cls, {})
    derived = DERIVED.get(cls, {})
    properties: dict[str, Any] = {}
    for key in (k for k in DERIVED_FIRST if k in derived):
        properties[key] = derived[key]
    for field in dataclasses.fields(cls):
        value = OVERRIDDEN.get((cls, field.name)) or _value(hints[field.name], defs)
        value = {**value, **CONSTRAINTS.get((cls.__name__, field.name), {})}
        if field.name in docs:
            value = {"description": docs[field.name], **value}
        properties[renamed.get(field.name, field.name)] = value
    for key, value in derived.items():
        if key not in properties:
            doc = inspect.getdoc(getattr(cls, key, None))
            properties[key] = {"description": doc, **value} if doc else value
    schema: dict[str, Any] = {"type": "object", "additionalProperties": False}
    if cls.__doc__:
        schema = {"description": inspect.cleandoc(cls.__doc__), **schema}
    return {**schema, "required": list(properties), "properties": properties}


def _value(hint: Any, defs: dict[str, Any]) -> dict[str, Any]:
    """The schema of one value of type ``hint``."""
    if hint is float:
        return NUMBER
    if hint in JSON_TYPES:
        return {"type": JSON_TYPES[hint]}
    if isinstance(hint, type) and issubclass(hint, Enum):
        defs.setdefault(hint.__name__, {"description": inspect.cleandoc(hint.__doc__ or ""), "enum": _values(hint)})
        return {"$ref": f"#/$defs/{hint.__name__}"}
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        if hint.__name__ not in defs:
            defs[hint.__name__] = {}  # placeholder: a recursive reference ends here
            defs[hint.__name__] = _object(hint, defs)
        return {"$ref": f"#/$defs/{hint.__name__}"}
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        options = [_value(a, defs) for a in args if a is not type(None)]
        return {"anyOf": [NULL, *options]} if type(None) in args else {"anyOf": options}
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return {"type": "array", "items": _value(args[0], defs)}
    if origin is tuple:
        items = [_value(a, defs) for a in args]
        return {"type": "array", "prefixItems": items, "minItems": len(items), "maxItems": len(items)}
    if origin is dict and args[1] is not Any:
        return {"type": "object", "additionalProperties": _value(args[1], defs)}
    if origin is dict:
        return {"type": "object"}
    raise TypeError(f"no JSON Schema for {hint!r}: extend report/schema.py")


def _values(enum: type[Enum]) -> list[Any]:
    return [member.value for member in enum]


def _field_docs(cls: type) -> dict[str, str]:
    """The docstring under each annotated field of a dataclass (PEP 257 attribute docstrings)."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0]
    assert isinstance(body, ast.ClassDef)
    docs: dict[str, str] = {}
    for statement, following in zip(body.body, body.body[1:], strict=False):
        if (
            isinstance(statement, ast.AnnAssign)
            and isinstance(statement.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[statement.target.id] = inspect.cleandoc(following.value.value)
    return docs
