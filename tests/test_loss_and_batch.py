"""Loss choice (DESIGN.md §1) and splitting a batch into inputs and target."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradcheck_cli.errors import BatchError
from gradcheck_cli.load.batch import Batch, make_batch
from gradcheck_cli.probe.loss import choose_loss


def test_model_loss_is_used_when_the_output_has_one():
    pred = torch.randn(3, requires_grad=True)
    loss, choice = choose_loss({"loss": pred.sum(), "logits": pred}, None, 0)
    assert choice.kind == "model"
    assert loss.requires_grad


def test_class_indices_choose_cross_entropy_also_for_sequences():
    pred = torch.randn(2, 5, 7, requires_grad=True)  # (N, C, L)
    _, choice = choose_loss(pred, torch.randint(0, 5, (2, 7)), 0)
    assert choice.kind == "cross_entropy"


def test_same_shape_float_target_chooses_mse():
    pred = torch.randn(4, 3, requires_grad=True)
    _, choice = choose_loss(pred, torch.randn(4, 3), 0)
    assert choice.kind == "mse"


def test_target_that_fits_no_loss_is_a_batch_error_naming_both_shapes():
    pred = torch.randn(4, 3, requires_grad=True)
    with pytest.raises(BatchError, match=r"float32\[4, 3\]"):
        choose_loss(pred, torch.randn(5), 0)


def test_projection_is_seeded_and_not_a_plain_sum():
    pred = torch.randn(4, 3, requires_grad=True)
    a, choice = choose_loss(pred, None, 1)
    b, _ = choose_loss(pred, None, 1)
    c, _ = choose_loss(pred, None, 2)
    assert choice.kind == "random_projection"
    assert a.item() == b.item() != c.item()
    assert a.item() != pytest.approx(pred.sum().item())


def test_tuple_is_inputs_plus_target_when_forward_takes_one_argument_fewer():
    model = nn.Linear(3, 2)
    x, y = torch.randn(4, 3), torch.randint(0, 2, (4,))
    batch = make_batch((x, y), model)
    assert batch.args == (x,) and batch.target is y


def test_tuple_is_all_inputs_when_forward_takes_them_all():
    model = nn.Bilinear(3, 3, 2)
    a, b = torch.randn(4, 3), torch.randn(4, 3)
    batch = make_batch((a, b), model)
    assert len(batch.args) == 2 and batch.target is None


def test_dict_becomes_keywords_and_a_target_key_the_forward_does_not_take_is_the_target():
    class Keywords(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, features: torch.Tensor) -> torch.Tensor:
            return self.fc(features)

    x, y = torch.randn(4, 3), torch.randint(0, 2, (4,))
    batch = make_batch({"features": x, "target": y}, Keywords())
    assert set(batch.kwargs) == {"features"} and batch.target is y
    assert batch.describe() == "features=float32[4, 3], target int64[4]"


def test_unsupported_batch_type_is_refused():
    with pytest.raises(BatchError, match="save a tensor"):
        make_batch(3.0, nn.Linear(1, 1))


def test_batch_moves_to_a_device():
    """Every input moves, nested in lists, tuples and dicts; the target stays on the host (Batch.to's docstring).

    The "meta" device stands in for an accelerator: everything starts on the CPU, so a move is visible."""
    target = torch.zeros(2, dtype=torch.long)
    batch = Batch(
        args=(torch.randn(2), (torch.ones(3), 7)),
        kwargs={"m": [torch.ones(1), torch.ones(2)], "d": {"inner": torch.ones(4)}, "flag": True},
        target=target,
    )
    moved = batch.to("meta")
    tensors = [moved.args[0], moved.args[1][0], *moved.kwargs["m"], moved.kwargs["d"]["inner"]]
    assert [t.device.type for t in tensors] == ["meta"] * 5
    assert [tuple(t.shape) for t in tensors] == [(2,), (3,), (1,), (2,), (4,)]
    assert isinstance(moved.args[1], tuple) and moved.args[1][1] == 7  # containers and non-tensors kept
    assert isinstance(moved.kwargs["m"], list) and moved.kwargs["flag"] is True
    assert moved.target is target and target.device.type == "cpu"
    assert batch.args[0].device.type == "cpu" and batch.kwargs["m"][0].device.type == "cpu"  # the original stays


# ----------------------------------------------------------------- issue 18: inputs that do not fit the first layer


class _ViewMLP(nn.Module):
    """The MNIST MLP as often written: ``x.view(-1, 784)`` folds whatever comes in into rows of 784."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(784, 64), nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x.view(-1, 784))))


def _misfit(model: nn.Module, *batch: torch.Tensor) -> str | None:
    from gradcheck_cli.load.batch import batch_misfit, make_batch

    ready = make_batch(batch, model)
    with torch.no_grad():
        output = model(*ready.args)
    return batch_misfit(model, ready, output)


def test_images_folded_into_rows_blame_the_inputs() -> None:
    """3-channel 28×28 images into view(-1, 784): 24 rows for 8 samples, and the inputs are named, not the target."""
    images, labels = torch.randn(8, 3, 28, 28), torch.randint(0, 10, (8,))
    message = _misfit(_ViewMLP(), images, labels)
    assert message is not None
    assert "float32[8, 3, 28, 28] do not fit the model's first layer" in message
    assert "fc1 (Linear) expects in_features=784" in message and "24 rows for the batch's 8" in message
    assert _misfit(_ViewMLP(), torch.randn(8, 1, 28, 28), labels) is None  # fits: a wrong target stays the target's


def test_linear_over_image_dimensions_blames_the_inputs() -> None:
    """[8, 3, 32, 32] into Linear(32, …): it runs over the last dimension and the output keeps [8, 3, 32]."""
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
    message = _misfit(model, torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,)))
    assert message is not None and "keeps the inputs' dimensions [8, 3, 32]" in message
    assert "the first layer 0 (Linear) expects in_features=32" in message
    assert _misfit(model, torch.randn(8, 32), torch.randint(0, 10, (8,))) is None
