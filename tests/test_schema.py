"""docs/report.schema.json is generated from the report's dataclasses and is closed: real reports validate,
a key no dataclass declares (or a declared one left out) does not."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from gradcheck_cli.api import check
from gradcheck_cli.load.examples import EXAMPLES, get_example
from gradcheck_cli.report.report import BaselineDiff, Finding, LayerMove, Problem, Report, Severity
from gradcheck_cli.report.schema import report_schema, schema_text
from gradcheck_cli.report.sections import Onset, StepRecord, TrainingHistory

jsonschema = pytest.importorskip("jsonschema")

SCHEMA_FILE = Path(__file__).resolve().parents[1] / "docs" / "report.schema.json"


@pytest.fixture(scope="module")
def validator() -> Any:
    schema = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


@pytest.fixture(scope="module")
def reports() -> dict[str, Report]:
    built = {}
    for name in EXAMPLES:
        model, batch = get_example(name).build(0)
        built[name] = check(model, batch, steps=2 if name == "relu-xavier" else 0)
    return built


def _errors(validator: Any, data: dict[str, Any]) -> list[str]:
    return [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(data)]


def test_committed_schema_is_the_generated_one() -> None:
    if os.environ.get("GRADCHECK_UPDATE_GOLDEN"):
        SCHEMA_FILE.write_text(schema_text(), encoding="utf-8")
    assert SCHEMA_FILE.read_text(encoding="utf-8") == schema_text(), (
        "docs/report.schema.json is stale: run GRADCHECK_UPDATE_GOLDEN=1 python -m pytest tests/test_schema.py"
    )


def test_every_object_is_closed_and_requires_every_key() -> None:
    schema = report_schema()
    assert schema["else"] == {"$ref": "#/$defs/Report"}  # an error document (status "error") is the other branch
    objects = [d for d in schema["$defs"].values() if d.get("type") == "object"]
    assert {"Report", "ErrorReport"} <= set(schema["$defs"])
    assert len(objects) > 15
    for obj in objects:
        assert obj["additionalProperties"] is False
        assert obj["required"] == list(obj["properties"])


def test_descriptions_come_from_the_docstrings() -> None:
    defs = report_schema()["$defs"]
    assert defs["LayerStats"]["properties"]["act_grad_norm"]["description"].startswith("‖∂L/∂output‖ over all calls")
    assert defs["LayerMove"]["properties"]["orders"]["description"].startswith("log10(after / before)")
    assert defs["InitAudit"]["description"] == "The initialisation audit of a whole model."


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_every_built_in_example_validates(validator: Any, reports: dict[str, Report], name: str) -> None:
    assert not _errors(validator, reports[name].to_dict())


def test_a_report_with_every_section_validates(validator: Any, reports: dict[str, Report]) -> None:
    report = reports["relu-xavier"]
    precision = reports["fp16-underflow"].precision  # a half-precision model: the forecast runs
    assert report.init_audit and report.optimisation and report.verifications and precision
    finding = Finding("GC001", "vanishing-gradient", Severity.ERROR, Problem.VANISHING, "0", "gone", {"x": 1.0})
    step = StepRecord(3, float("nan"), 1.5, 1e-3, 0.7, (1.0, float("inf")))
    onset = Onset("vanishing", 3, None, ("GC001",), ("0",), "began", 9, (("0", 2.5),))
    full = dataclasses.replace(
        reports["nan-weight"],
        init_audit=report.init_audit,
        optimisation=report.optimisation,
        verifications=report.verifications,
        precision=precision,
        baseline=BaselineDiff("base.json", 1.0, (finding,), (finding,), (LayerMove("0", 1.0, 0.0),), ()),
        history=TrainingHistory("log.jsonl", 10, 1, ("0",), (step,), "vanishing", (onset,), ((3, ("vanishing",)),)),
        timing={"probe": 0.1},
    )
    assert full.non_finite_origin is not None
    data = full.to_dict()
    assert all(data[key] for key in ("baseline", "history", "timing", "non_finite_origin", "init_audit"))
    assert not _errors(validator, data)


def test_a_key_no_dataclass_declares_fails_at_every_level(validator: Any, reports: dict[str, Report]) -> None:
    good = reports["relu-xavier"].to_dict()
    assert validator.is_valid(good)
    added = [
        {**good, "added_later": 1},
        {**good, "layers": [{**good["layers"][0], "added_later": 1}]},
        {**good, "findings": [{**good["findings"][0], "added_later": 1}]},
        {**good, "run": {**good["run"], "added_later": 1}},
        {**good, "path": {**good["path"], "added_later": 1}},
        {**good, "init_audit": {**good["init_audit"], "layers": [{**good["init_audit"]["layers"][0], "added": 1}]}},
        {**good, "optimisation": {**good["optimisation"], "steps": [{**good["optimisation"]["steps"][0], "a": 1}]}},
    ]
    assert not [doc for doc in added if validator.is_valid(doc)]


def test_a_declared_key_left_out_fails(validator: Any, reports: dict[str, Report]) -> None:
    good = reports["relu-xavier"].to_dict()
    dropped = [
        {k: v for k, v in good.items() if k != "timing"},
        {**good, "layers": [{k: v for k, v in good["layers"][0].items() if k != "grad_weight_ratio"}]},
        {**good, "run": {k: v for k, v in good["run"].items() if k != "torch_version"}},
    ]
    assert not [doc for doc in dropped if validator.is_valid(doc)]


def test_a_new_dataclass_field_reaches_the_schema(monkeypatch: pytest.MonkeyPatch) -> None:
    from gradcheck_cli.report import report as report_module
    from gradcheck_cli.report import schema as schema_module

    @dataclasses.dataclass(frozen=True)
    class PathSummary(report_module.PathSummary):
        spread: float = 0.0
        """How far the per-layer factors spread."""

    monkeypatch.setattr(schema_module.typing, "get_type_hints", _hints_with({"path": PathSummary}))
    path = schema_module.report_schema()["$defs"]["PathSummary"]
    assert path["properties"]["spread"]["description"] == "How far the per-layer factors spread."
    assert "spread" in path["required"]
    assert schema_text() != SCHEMA_FILE.read_text(encoding="utf-8")


def _hints_with(replaced: dict[str, type]) -> Any:
    import typing

    original = typing.get_type_hints

    def hints(cls: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        found = original(cls, *args, **kwargs)
        return {**found, **replaced} if cls is Report else found

    return hints


def test_unknown_types_are_refused() -> None:
    from gradcheck_cli.report.schema import _value

    with pytest.raises(TypeError, match="no JSON Schema"):
        _value(torch.Tensor, {})
