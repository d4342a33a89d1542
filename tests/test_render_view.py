"""The one view every renderer draws from (render/view.py): the gradient relative to the output end."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gradcheck_cli import check
from gradcheck_cli.render.markdown import render_markdown
from gradcheck_cli.render.text import render_text
from gradcheck_cli.render.view import forward_order, parameter_relative, relative_gradients


def _scripted_with_a_nan_weight() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    return torch.jit.script(model)


def test_parameter_path_marks_non_finite_gradients_as_nan_in_every_text_format() -> None:
    report = check(_scripted_with_a_nan_weight(), torch.randn(16, 4), verify=False)
    assert report.path.measured_with != "activation_gradients"  # TorchScript: parameter gradients only
    values = relative_gradients(report)
    assert values == parameter_relative(report)
    non_finite = [
        i for i, layer in enumerate(report.layers) if layer.grad_norm is not None and not math.isfinite(layer.grad_norm)
    ]
    assert non_finite and all(math.isnan(values[i]) for i in non_finite)  # type: ignore[arg-type]
    for text in (render_text(report), render_markdown(report)):
        assert "nan" in text.lower()


def test_activation_path_is_the_measured_ratio_and_forward_order_puts_unused_layers_last() -> None:
    class WithSpare(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.unused = nn.Linear(3, 3)  # defined first, never called
            self.first = nn.Linear(4, 8)
            self.last = nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.last(torch.relu(self.first(x)))

    torch.manual_seed(0)
    report = check(WithSpare(), torch.randn(8, 4), verify=False)
    values = relative_gradients(report)
    by_name = {layer.name: values[i] for i, layer in enumerate(report.layers)}
    first = next(layer for layer in report.layers if layer.name == "first")
    assert by_name["last"] == pytest.approx(1.0)  # the output end divided by itself
    assert by_name["first"] == pytest.approx(first.act_grad_rel)
    assert by_name["unused"] is None
    assert report.layers[forward_order(report)[-1]].name == "unused"


@pytest.mark.parametrize("name", ["relu-kaiming", "relu-xavier"])
def test_every_human_format_states_the_one_verdict(name: str) -> None:
    from gradcheck_cli.load.examples import EXAMPLES
    from gradcheck_cli.render.github import render_github
    from gradcheck_cli.render.html import render_html
    from gradcheck_cli.render.view import verdict

    model, batch = EXAMPLES[name].build(0)
    report = check(model, batch, verify=False)
    words = verdict(report)
    assert words.healthy is report.healthy
    assert words.summary == ("gradients flow from the output to the input" if report.healthy else "vanishing")
    for render in (render_text, render_markdown, render_github, render_html):
        assert words.summary in render(report), render.__module__
