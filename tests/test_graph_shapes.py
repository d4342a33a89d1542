"""Model shapes whose verdict must follow the autograd graph, not the order modules are called in (issue 18):
heads called in another order, one sick head beside healthy ones, parallel heads on pooled features, a model
with two outputs and a target, a graph cut by ``.detach()``, and an output that does not depend on anything."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradcheck_cli.diagnose.rules import NO_GRADIENT, UNUSED_LAYER, VANISHING, diagnose
from gradcheck_cli.load.batch import Batch
from gradcheck_cli.probe.loss import choose_loss
from gradcheck_cli.probe.measure import probe
from gradcheck_cli.report.report import Severity


class Detector(nn.Module):
    """A trunk and three heads; ``order`` decides only the order the heads are called in."""

    def __init__(self, order: tuple[int, ...], head_depth: tuple[int, ...] = (2, 2, 2), sick: int | None = None):
        super().__init__()
        self.order = order
        self.trunk = nn.Sequential(*[m for _ in range(4) for m in (nn.Linear(32, 32), nn.ReLU())])
        for m in self.trunk:
            if isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        heads = []
        for i, depth in enumerate(head_depth):
            act: type[nn.Module] = nn.Sigmoid if i == sick else nn.ReLU
            layers: list[nn.Module] = []
            for _ in range(depth - 1):
                layers += [nn.Linear(32, 32), act()]
            layers.append(nn.Linear(32, 4))
            heads.append(nn.Sequential(*layers))
        self.heads = nn.ModuleList(heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.trunk(x)
        outs: list[torch.Tensor | None] = [None] * len(self.heads)
        for i in self.order:
            outs[i] = self.heads[i](h)
        return torch.cat([o for o in outs if o is not None], dim=1)


def _batch(classes: int, width: int = 32) -> Batch:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(64, width, generator=generator)
    return Batch(args=(x,), target=torch.randint(0, classes, (64,), generator=generator))


def _detector(order: tuple[int, ...], **kwargs: object) -> Detector:
    torch.manual_seed(0)
    return Detector(order, **kwargs)  # type: ignore[arg-type]


def test_heads_called_in_another_order_give_the_same_path_and_verdict():
    batch = _batch(12)
    a = diagnose(probe(_detector((0, 1, 2)), batch))
    b = diagnose(probe(_detector((2, 1, 0)), batch))
    assert a.path.attenuation == pytest.approx(b.path.attenuation, rel=1e-5)
    assert a.path.gain == pytest.approx(b.path.gain, rel=1e-5)
    assert (a.path.first_layer, a.path.last_layer, a.path.length) == (b.path.first_layer, b.path.last_layer, 6)
    assert set(a.path.output_ends) == {"heads.0.2", "heads.1.2", "heads.2.2"}
    assert [f.code for f in a.findings] == [f.code for f in b.findings]
    assert {s.name: s.depth for s in a.layers} == {s.name: s.depth for s in b.layers}
    assert {s.name: s.depth for s in a.layers}["trunk.0"] == 6


@pytest.mark.parametrize("order", [(0, 1, 2), (2, 1, 0)])
def test_a_sick_head_beside_healthy_ones_is_named_whatever_the_call_order(order):
    """Head 0 is 24 sigmoid layers deep (vanishing inside it); heads 1 and 2 are healthy and short."""
    model = _detector(order, head_depth=(24, 2, 2), sick=0)
    diagnosis = diagnose(probe(model, _batch(12)))
    vanishing = [f for f in diagnosis.findings if f.code == VANISHING.code]
    assert vanishing and vanishing[0].severity is Severity.ERROR
    assert vanishing[0].layer is not None and vanishing[0].layer.startswith("heads.0.")
    assert diagnosis.path.first_layer == "heads.0.0" and diagnosis.path.output_ends == ("heads.0.46",)
    flagged = {s.name for s in diagnosis.layers if "vanishing" in s.flags}
    assert flagged and all(name.startswith("heads.0.") for name in flagged)


class Pyramid(nn.Module):
    """A backbone of four stages and one head on each stage's output, pooled to a vector (FPN-like)."""

    def __init__(self) -> None:
        super().__init__()
        self.stages = nn.ModuleList(nn.Conv2d(3 if i == 0 else 8, 8, 3, padding=1, stride=2) for i in range(4))
        self.heads = nn.ModuleList(nn.Linear(8, 2) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = []
        for stage, head in zip(self.stages, self.heads, strict=True):
            x = F.relu(stage(x))
            outs.append(head(x.mean(dim=(2, 3))))
        return torch.cat(outs, dim=1)


def test_parallel_heads_on_pooled_features_are_output_ends_not_steps_of_the_path():
    torch.manual_seed(0)
    diagnosis = diagnose(probe(Pyramid(), Batch(args=(torch.randn(8, 3, 32, 32),))))
    assert diagnosis.path.first_layer == "stages.0"
    assert diagnosis.path.last_layer == "heads.3" and diagnosis.path.length == 5  # 4 stages, then one head
    assert set(diagnosis.path.output_ends) == {f"heads.{i}" for i in range(4)}
    assert {s.name: s.depth for s in diagnosis.layers}["stages.0"] == 5


class TwoOutputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU())
        self.cls = nn.Linear(32, 5)
        self.aux = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(x)
        return self.cls(h), self.aux(h)


def test_an_output_the_loss_does_not_use_is_not_a_cut_graph():
    torch.manual_seed(0)
    result = probe(TwoOutputs(), _batch(5, 16))
    diagnosis = diagnose(result)
    codes = {f.code: f for f in diagnosis.findings}
    assert NO_GRADIENT.code not in codes
    assert codes[UNUSED_LAYER.code].severity is Severity.INFO
    assert codes[UNUSED_LAYER.code].evidence["layers"] == ["aux"]
    assert "the loss used output[0] of 2 outputs" in result.loss.description
    assert not any(f.severity is Severity.ERROR for f in diagnosis.findings)


def test_loss_output_chooses_the_output_the_loss_is_computed_from():
    torch.manual_seed(0)
    result = probe(TwoOutputs(), _batch(3, 16), loss_output=1)
    assert "output[1]" in result.loss.description and result.loss.kind == "cross_entropy"
    stats = {s.name: s for s in diagnose(result).layers}
    assert stats["cls"].grad_norm is None and stats["aux"].grad_norm is not None
    with pytest.raises(Exception, match="not among the model's outputs"):
        choose_loss((torch.ones(2, 3, requires_grad=True),), None, 0, 4)
    loss, choice = choose_loss({"a": torch.ones(2, 3, requires_grad=True), "b": torch.ones(2, requires_grad=True)},
                               None, 0, "b")  # fmt: skip
    assert loss.dim() == 0 and "output['b']" in choice.description


class Detached(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU())
        self.cls = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(x)
        return self.cls(h.detach()), x.sum(dim=1)


def test_a_detach_inside_a_path_is_still_a_cut_graph():
    torch.manual_seed(0)
    diagnosis = diagnose(probe(Detached(), _batch(5, 16)))
    cut = [f for f in diagnosis.findings if f.code == NO_GRADIENT.code]
    assert cut and cut[0].severity is Severity.ERROR
    assert cut[0].evidence["layers"] == ["body.0", "body.2"]
    assert UNUSED_LAYER.code not in {f.code for f in diagnosis.findings}


class SingleSoftmax(nn.Module):
    def __init__(self, final: str = "softmax") -> None:
        super().__init__()
        self.final = final
        self.body = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.body(x)
        return F.softmax(z, dim=1) if self.final == "softmax" else torch.round(z)


@pytest.mark.parametrize(("final", "op"), [("softmax", "SoftmaxBackward0"), ("round", "RoundBackward0")])
def test_a_gradient_that_is_zero_everywhere_is_vanishing_with_its_cause(final, op):
    torch.manual_seed(0)
    x = torch.randn(32, 16)
    for batch in (Batch(args=(x,), target=torch.rand(32, 1)), Batch(args=(x,))):
        diagnosis = diagnose(probe(SingleSoftmax(final), batch))
        errors = [f for f in diagnosis.findings if f.severity is Severity.ERROR]
        assert [f.code for f in errors] == [VANISHING.code]
        assert errors[0].evidence["zero_everywhere"] is True and errors[0].layer == "body.2"
        assert op in errors[0].message and "does not depend on its input or its weights" in errors[0].message


def test_the_probe_lets_the_graph_go_and_leaves_no_hook():
    torch.manual_seed(0)
    model = _detector((0, 1, 2))
    probe(model, _batch(12))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
