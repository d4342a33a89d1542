"""The probe against gradients computed by hand, hook removal, and state restoration."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradcheck_cli.errors import BatchError, OutOfMemory
from gradcheck_cli.load.batch import Batch
from gradcheck_cli.probe.measure import probe

pytestmark = pytest.mark.numeric  # .ci/run repeats these under other CPU kernels


def _hook_count(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) + len(m._backward_pre_hooks)
        for m in model.modules()
    )


class TwoLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def test_parameter_and_activation_gradient_norms_match_manual_autograd():
    torch.manual_seed(0)
    model = TwoLayer()
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    result = probe(model, Batch(args=(x,), target=y))

    h1 = model.fc1(x)
    h1.retain_grad()
    out = model.fc2(torch.relu(h1))
    out.retain_grad()
    nn.functional.cross_entropy(out, y).backward()
    fc1, fc2 = result.layers
    expected_fc1 = torch.sqrt(model.fc1.weight.grad.norm() ** 2 + model.fc1.bias.grad.norm() ** 2)
    assert fc1.grad.l2 == pytest.approx(float(expected_fc1), rel=1e-5)
    assert fc1.calls[0].l2 == pytest.approx(float(h1.grad.norm()), rel=1e-5)
    assert fc2.calls[0].l2 == pytest.approx(float(out.grad.norm()), rel=1e-5)
    assert fc1.calls[0].max_abs == pytest.approx(float(h1.grad.abs().max()), rel=1e-5)
    assert result.loss.kind == "cross_entropy"
    assert result.call_order == ((0, 0), (1, 0))


def test_inplace_relu_after_linear_gives_the_pre_activation_gradient():
    torch.manual_seed(0)
    model = TwoLayer()
    x, target = torch.randn(5, 4), torch.randn(5, 3)
    result = probe(model, Batch(args=(x,), target=target))
    h1 = model.fc1(x)
    h1.retain_grad()
    nn.functional.mse_loss(model.fc2(torch.relu(h1)), target).backward()
    assert (h1.grad[h1 <= 0] == 0).all()  # the gradient w.r.t. fc1's output, before ReLU
    assert result.layers[0].calls[0].l2 == pytest.approx(float(h1.grad.norm()), rel=1e-5)


def test_a_module_called_in_a_loop_records_every_call_in_order():
    cell = nn.RNNCell(3, 8)

    class Loop(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cell = cell
            self.head = nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.zeros(x.shape[1], 8)
            for step in x:
                h = self.cell(step, h)
            return self.head(h)

    result = probe(Loop(), Batch(args=(torch.randn(7, 2, 3),)))
    assert len(result.layers[0].calls) == 7
    assert result.call_order[:7] == tuple((0, k) for k in range(7))
    assert result.call_order[-1] == (1, 0)
    assert all(c is not None and c.l2 > 0 for c in result.layers[0].calls)


def test_no_hook_left_after_success():
    model = TwoLayer()
    probe(model, Batch(args=(torch.randn(2, 4),)))
    assert _hook_count(model) == 0


def test_no_hook_left_after_a_forward_that_raises():
    model = TwoLayer()
    with pytest.raises(BatchError, match=r"forward pass raised in fc1 \(Linear\).*expects in_features=4"):
        probe(model, Batch(args=(torch.randn(2, 5),)))
    assert _hook_count(model) == 0


def test_mode_requires_grad_and_existing_grads_are_restored():
    model = TwoLayer()
    model.eval()
    model.fc1.weight.requires_grad_(False)
    sentinel = torch.full_like(model.fc2.weight, 7.0)
    model.fc2.weight.grad = sentinel
    result = probe(model, Batch(args=(torch.randn(2, 4),)), train=True)
    assert result.mode == "train"
    assert not model.training and not model.fc1.training
    assert model.fc1.weight.requires_grad is False
    assert model.fc2.weight.grad is sentinel
    assert model.fc1.weight.grad is None
    assert result.layers[0].frozen is False  # bias still trainable
    assert result.layers[0].grad is not None  # measured through the temporarily unfrozen weight


def test_probe_is_seeded_so_dropout_gives_the_same_numbers_twice():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5), nn.Linear(8, 2))
    x = torch.randn(4, 8)
    batch = Batch(args=(x,))
    first = probe(model, batch, seed=3)
    second = probe(model, batch, seed=3)
    assert first.layers[0].grad == second.layers[0].grad
    assert first.loss_value == second.loss_value
    # the control: another seed draws another dropout mask (and projection), so the numbers differ
    other = probe(model, batch, seed=4)
    assert other.layers[0].grad != first.layers[0].grad
    assert other.loss_value != first.loss_value
    # with a class target the loss (cross-entropy) draws nothing: only the dropout mask moves with the seed
    labelled = Batch(args=(x,), target=torch.tensor([0, 1, 1, 0]))
    a, b, c = (probe(model, labelled, seed=seed) for seed in (3, 3, 4))
    assert a.loss.kind == c.loss.kind == "cross_entropy"
    assert a.layers[0].grad == b.layers[0].grad and a.loss_value == b.loss_value
    assert c.layers[0].grad != a.layers[0].grad and c.loss_value != a.loss_value


def test_probe_leaves_the_global_rng_alone():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Linear(4, 2))
    batch = Batch(args=(torch.randn(2, 4),))
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    probe(model, batch, seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_random_projection_loss_has_unit_output_gradient_and_no_zero_for_softmax():
    model = nn.Sequential(nn.Linear(6, 5), nn.Softmax(dim=-1))
    result = probe(model, Batch(args=(torch.randn(32, 6),)))
    assert result.loss.kind == "random_projection"
    assert result.layers[0].grad.l2 > 1e-4  # out.sum() would give exactly zero through softmax


def test_torchscript_module_is_read_through_its_bias_gradients():
    """Module hooks do not fire on TorchScript: each layer's one 'call' is its bias gradient (the output
    gradient summed over the batch), a part of the layer's whole parameter gradient."""
    scripted = torch.jit.script(TwoLayer())
    result = probe(scripted, Batch(args=(torch.randn(3, 4),)))
    assert result.activation_hooks is False
    assert all(layer.grad is not None for layer in result.layers)
    assert all(len(layer.calls) == 1 for layer in result.layers)
    assert all(0 < layer.calls[0].l2 <= layer.grad.l2 for layer in result.layers if layer.grad is not None)


def test_model_without_parameters_is_refused():
    with pytest.raises(BatchError, match="no floating-point parameters"):
        probe(nn.ReLU(), Batch(args=(torch.randn(2),)))


class EmbedLSTM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.lstm = nn.LSTM(8, 16, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embed(ids))
        return self.head(out[:, -1])


def test_fused_lstm_time_profile_leaves_upstream_gradients_and_no_hooks():
    model = EmbedLSTM()
    ids = torch.randint(0, 20, (4, 12))
    result = probe(model, Batch(args=(ids,)))
    embed, lstm, _ = result.layers
    assert len(lstm.time_profile) == 12
    assert embed.grad is not None and embed.grad.l2 > 0  # the embedding still gets its gradient
    # the profile is ‖∂L/∂x_t‖ of the LSTM's input, which is the embedding's output
    assert embed.calls[0].l2 == pytest.approx(sum(v * v for v in lstm.time_profile) ** 0.5, rel=1e-5)
    assert _hook_count(model) == 0


def test_raw_sequence_input_is_not_modified_by_the_time_hook():
    model = nn.RNN(3, 5, batch_first=True)
    x = torch.randn(2, 6, 3)
    result = probe(model, Batch(args=(x,)))
    assert x.requires_grad is False and x.grad is None
    assert len(result.layers[0].time_profile) == 6


def test_frozen_model_is_refused_unless_unfreeze_and_then_measured_with_a_note():
    from gradcheck_cli.api import check

    model = TwoLayer()
    model.requires_grad_(False)
    with pytest.raises(BatchError, match=r"no trainable parameters.*--unfreeze"):
        check(model, torch.randn(3, 4))
    report = check(model, torch.randn(3, 4), unfreeze=True)
    assert all(layer.frozen for layer in report.layers)
    assert all(layer.grad_norm and layer.grad_norm > 0 for layer in report.layers)
    assert any("all parameters had requires_grad=False" in note for note in report.notes)
    assert not any(p.requires_grad for p in model.parameters())


def test_out_of_memory_in_the_forward_is_an_input_error():
    class Hungry(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(2, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")

    with pytest.raises(OutOfMemory, match="ran out of memory; try a smaller batch"):
        probe(Hungry(), Batch(args=(torch.randn(1, 2),)))


def test_train_mode_probe_leaves_batchnorm_running_statistics_as_they_were():
    from gradcheck_cli.api import check

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    check(model, torch.randn(32, 8) * 5 + 3, steps=2, lr=0.1)  # train mode: BatchNorm updates its statistics
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


HOST_READS = ("item", "tolist", "__float__", "__int__", "__bool__", "numpy", "__index__")


def _count_host_reads(monkeypatch, run):
    """Every read of a tensor's value on the host during ``run()``, with the function that did it."""
    import traceback

    reads: list[str] = []
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            frames = traceback.extract_stack(limit=8)[:-1]
            reads.append(" < ".join(f"{f.name}" for f in reversed(frames)))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    run()
    monkeypatch.undo()
    return reads


def test_a_probe_reads_device_values_once(monkeypatch):
    """One synchronisation per probe: every norm, maximum, histogram and activation statistic comes back in a
    single copy; the only other reads are of the target's class indices, which stay on the host."""
    from gradcheck_cli.load.examples import get_example

    model, batch = get_example("relu-kaiming").build(0)
    reads = _count_host_reads(monkeypatch, lambda: probe(model, batch))
    device_reads = [r for r in reads if "_check_class_indices" not in r]
    assert len(device_reads) == 1 and device_reads[0].startswith("to_host")
    no_target = Batch(args=batch.args)
    assert len(_count_host_reads(monkeypatch, lambda: probe(model, no_target))) == 1


def test_the_target_stays_on_the_host_when_the_batch_moves():
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    moved = Batch(args=(x,), target=y).to("meta")
    assert moved.args[0].device.type == "meta" and moved.target is y
