"""TorchScript and ``torch.export`` programs judged on the backward signal, not on ‖∂L/∂W‖ alone.

In a linear stack with orthogonal weights of gain g the activation gradient grows by g per layer towards the
input while each layer's input shrinks by g, so ‖∂L/∂W‖ stays level: an exploding stack read through parameter
gradients looks healthy. These tests save real stacks both ways (``torch.jit.script``/``trace`` +
``torch.jit.save``, ``torch.export.export`` + ``torch.export.save``), load them the way ``inspect`` does and
compare the verdict with the eager model's. A streaming TorchScript model that keeps its last output in a
tensor attribute runs the optimisation probe without "backward through the graph a second time".
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from gradcheck_cli.api import check
from gradcheck_cli.load import load_checkpoint
from gradcheck_cli.load.batch import Batch
from gradcheck_cli.probe.module_state import SavedTensorAttributes, tensor_attributes

DEPTH, WIDTH = 30, 64


def stack(gain: float, bias: bool = True) -> nn.Sequential:
    torch.manual_seed(0)
    layers = []
    for _ in range(DEPTH):
        layer = nn.Linear(WIDTH, WIDTH, bias=bias)
        nn.init.orthogonal_(layer.weight, gain=gain)
        if bias:
            nn.init.zeros_(layer.bias)
        layers.append(layer)
    return nn.Sequential(*layers)


def batch() -> Batch:
    torch.manual_seed(1)
    return Batch(args=(torch.randn(32, WIDTH),))


def save(model: nn.Module, path: Path, how: str) -> Path:
    x = batch().args[0]
    if how == "script":
        torch.jit.save(torch.jit.script(model), str(path))
    elif how == "trace":
        torch.jit.save(torch.jit.trace(model, (x,)), str(path))
    else:
        torch.export.save(torch.export.export(model, (x,)), str(path))
    return path


def load(path: Path) -> nn.Module:
    """The file as ``inspect`` loads it (no --trust)."""
    return load_checkpoint(path, model_spec=None, trust=False).module


def judged(path: Path) -> tuple[tuple[str, ...], str, float | None]:
    report = check(load(path), batch())
    return tuple(p.value for p in report.problems), report.path.measured_with, report.path.attenuation


FORMATS = ["script", "trace", "export"]


@pytest.mark.parametrize("how", FORMATS)
def test_an_exploding_stack_saved_as_a_program_is_flagged_like_the_eager_model(tmp_path: Path, how: str) -> None:
    eager = check(stack(1.3), batch())
    assert [p.value for p in eager.problems] == ["exploding"]
    problems, measured_with, attenuation = judged(save(stack(1.3), tmp_path / "m.pt", how))
    assert problems == ("exploding",)
    assert measured_with == ("activation_gradients" if how == "export" else "bias_gradients")
    assert attenuation == pytest.approx(eager.path.attenuation, rel=1e-3)  # 1.3²⁹ ≈ 2015 in every format


@pytest.mark.parametrize("how", FORMATS)
def test_a_healthy_stack_saved_as_a_program_stays_healthy(tmp_path: Path, how: str) -> None:
    problems, _, attenuation = judged(save(stack(1.0), tmp_path / "m.pt", how))
    assert problems == ()
    assert attenuation == pytest.approx(1.0, rel=1e-2)


def test_an_exported_program_without_biases_is_still_measured(tmp_path: Path) -> None:
    problems, measured_with, _ = judged(save(stack(1.3, bias=False), tmp_path / "m.pt2", "export"))
    assert (problems, measured_with) == (("exploding",), "activation_gradients")


def test_torchscript_without_biases_says_the_path_was_not_measured(tmp_path: Path) -> None:
    report = check(load(save(stack(1.3, bias=False), tmp_path / "m.pt", "script")), batch())
    assert report.path.measured_with == "not_measured"
    assert report.path.attenuation is None
    gc006 = [f for f in report.findings if f.code == "GC006"]
    assert [f.severity.value for f in gc006] == ["warning"]
    assert "could not be measured" in gc006[0].message


def test_a_program_whose_path_is_not_measured_is_never_called_healthy(tmp_path: Path) -> None:
    """The status is ``not_measured`` (exit 0: no finding at --fail-on error; 1 with --fail-on warning) in the
    JSON, the text verdict, SARIF and JUnit, and the report validates against the schema."""
    import json
    import xml.etree.ElementTree as ET

    from cli_support import run_cli
    from gradcheck_cli.report.schema import report_schema

    jsonschema = pytest.importorskip("jsonschema")
    model = save(stack(1.3, bias=False), tmp_path / "m.pt", "script")
    torch.save(batch().args[0], tmp_path / "x.pt")
    common = ["inspect", model, "--input", tmp_path / "x.pt", "--no-verify"]
    as_json = run_cli([*common, "--format", "json"], cwd=tmp_path)
    assert as_json.returncode == 0, as_json.stderr
    document = json.loads(as_json.stdout)
    assert (document["status"], document["problems"]) == ("not_measured", [])
    jsonschema.validate(document, report_schema())
    text = run_cli(common, cwd=tmp_path)
    assert "? not measured: the gradient path could not be measured" in text.stdout
    assert "healthy" not in text.stdout.split("\n", 3)[0] + text.stdout.split("not measured:", 1)[1][:80]
    sarif = json.loads(run_cli([*common, "--format", "sarif"], cwd=tmp_path).stdout)
    assert sarif["runs"][0]["properties"]["status"] == "not_measured"
    junit = ET.fromstring(run_cli([*common, "--format", "junit"], cwd=tmp_path).stdout)
    assert {p.get("name"): p.get("value") for p in junit.iter("property")}["status"] == "not_measured"
    assert run_cli([*common, "--fail-on", "warning"], cwd=tmp_path).returncode == 1


def test_an_exported_program_keeps_its_module_names_and_cannot_switch_mode(tmp_path: Path) -> None:
    module = load(save(stack(1.0), tmp_path / "m.pt2", "export"))
    assert [n for n, m in module.named_modules() if next(m.parameters(recurse=False), None) is not None][:2] == [
        "0",
        "1",
    ]
    with pytest.raises(NotImplementedError):
        module.train()


class Streaming(nn.Module):
    """A streaming cell that keeps its last output in a tensor attribute and reads it on the next call."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(16, 32)
        self.cell = nn.Linear(64, 32)
        self.out = nn.Linear(32, 1)
        self.state = torch.zeros(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        if self.state.numel() == 0 or self.state.shape[0] != x.shape[0]:
            self.state = torch.zeros_like(h)
        h = torch.tanh(self.cell(torch.cat([h, self.state], 1)))
        self.state = h
        return self.out(h)


@pytest.mark.parametrize("scripted", [True, False], ids=["torchscript", "eager"])
def test_a_model_with_internal_state_runs_the_optimisation_probe(tmp_path: Path, scripted: bool) -> None:
    torch.manual_seed(0)
    model: nn.Module = Streaming()
    if scripted:
        torch.jit.save(torch.jit.script(model), str(tmp_path / "vad.pt"))
        model = load(tmp_path / "vad.pt")
    x = Batch(args=(torch.randn(8, 16),))
    report = check(model, x, steps=20)  # raised "Trying to backward through the graph a second time"
    assert report.optimisation is not None
    assert len(report.optimisation.steps) == 21
    assert tensor_attributes(model)[0][2].numel() == 0  # the caller's model keeps the state it was given


def test_saved_tensor_attributes_put_back_a_detached_copy() -> None:
    model = torch.jit.script(Streaming())
    saved = SavedTensorAttributes(model)
    model(torch.randn(4, 16, requires_grad=True)).sum().backward()
    assert model.state.grad_fn is not None
    saved.restore()
    assert model.state.numel() == 0 and model.state.grad_fn is None


def test_a_traced_cnn_with_batchnorm_stays_healthy() -> None:
    """A conv bias right before BatchNorm gets no gradient (≈1e-7 of the others): read as a path step it made
    the zoo's healthy CNN 'vanishing' (1.06e-07); it is left out, and the BatchNorm's own bias reads the path."""
    from zoo import small_cnn

    model, data = small_cnn()
    report = check(torch.jit.trace(model, data.args, check_trace=False), data)
    assert report.problems == ()
    assert report.path.measured_with == "bias_gradients"
    assert report.path.attenuation is not None and 10**-2 < report.path.attenuation < 10**2


class _TwoRates(torch.nn.Module):
    """A wrapper like Silero VAD's: one sub-model per sample rate, only one of them runs."""

    def __init__(self) -> None:
        super().__init__()
        self.fast = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        self.slow = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fast(x)


def test_a_scripted_branch_that_never_ran_is_not_called_a_cut_graph() -> None:
    """Without module hooks an empty bias slot cannot tell 'never ran' from 'cut': no GC005 (a real false alarm
    on Silero VAD's wrapper, whose 8 kHz model does not run on 16 kHz audio)."""
    from gradcheck_cli import check

    torch.manual_seed(0)
    report = check(torch.jit.script(_TwoRates()), torch.randn(16, 4), verify=False)
    assert "GC005" not in [f.code for f in report.findings]
    assert report.healthy
