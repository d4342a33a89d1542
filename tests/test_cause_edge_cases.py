"""Edge cases of the cause signals and verified fixes found in review: each was a real defect first."""

from __future__ import annotations

import torch
from torch import nn

from gradcheck_cli import check
from gradcheck_cli.advise.fix_targets import following_activations
from gradcheck_cli.load.batch import Batch
from gradcheck_cli.load.examples import get_example, mlp
from gradcheck_cli.load.torch_file import training_evidence


def test_scripted_model_gets_no_gradient_from_the_verification_copies():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    with torch.no_grad():
        model[2].weight[0, 0] = float("inf")
    scripted = torch.jit.script(model)
    report = check(scripted, torch.randn(16, 8))
    assert report.verifications  # the copies were made and probed...
    assert all(p.grad is None for p in scripted.parameters())  # ...without touching the user's parameters
    clip = next(v for v in report.verifications if v.id == "gradient_clipping")
    assert clip.verified, clip.reason


def test_lower_lr_leads_for_unstable_training_and_is_verified_by_training_again():
    torch.manual_seed(0)
    model = mlp(4, 32, nn.Tanh, None, in_features=16, out_features=1)
    g = torch.Generator().manual_seed(1)
    batch = Batch(args=(torch.randn(64, 16, generator=g),), target=torch.randn(64, 1, generator=g))
    report = check(model, batch, steps=8, lr=2.0)
    assert any(f.code == "GC015" for f in report.findings)
    first = report.verifications[0]
    assert first.id == "lower_lr" and first.verified and first.fixed
    assert "re-ran the optimisation probe on a copy at lr 0.2" in first.applied
    flow_fixes = [v for v in report.verifications if v.id not in ("lower_lr", "gradient_clipping") and v.verified]
    assert all(not v.fixed and "only during training" in v.applied for v in flow_fixes)


def test_hugging_face_activations_are_recognised_and_unseen_ones_never_borrowed():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    bert = BertForSequenceClassification(
        BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64, vocab_size=50)
    )
    follows = following_activations(bert)
    by_name = {name: follows[id(m)] for name, m in bert.named_modules() if id(m) in follows}
    assert by_name["bert.encoder.layer.0.intermediate.dense"][0] == "relu"  # GELUActivation
    assert by_name["bert.encoder.layer.0.attention.self.query"][0] == "linear"  # not the pooler's Tanh
    assert by_name["bert.pooler.dense"][0] == "tanh"


def test_spectral_norm_buffers_are_left_as_found():
    torch.manual_seed(0)
    layer = nn.utils.parametrizations.spectral_norm(nn.Linear(16, 32))
    model = nn.Sequential(layer, nn.ReLU(), nn.Linear(32, 4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    check(model, torch.randn(8, 16), verify=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bf16_model_is_not_told_to_use_a_grad_scaler():
    model, batch = get_example("fp16-underflow").build(0)
    model = model.bfloat16()
    batch = Batch(args=tuple(a.bfloat16() for a in batch.args), target=batch.target)
    report = check(model, batch)
    assert not any(f.code == "GC013" and f.severity.value == "warning" for f in report.findings)
    assert "mixed_precision_scaling" not in [r.id for r in report.recommendations]


def test_float32_vanishing_model_gets_no_grad_scaler_advice():
    model, batch = get_example("deep-sigmoid").build(0)
    plain = check(model, batch, verify=False)
    assert plain.precision is None  # a float32 model: the half-precision forecast only runs when asked for
    assert not any(f.code in ("GC013", "GC014") for f in plain.findings)
    report = check(model, batch, verify=False, autocast="bf16")  # asked: fp16's losses, as information
    assert any(f.code == "GC013" and f.severity.value == "info" for f in report.findings)
    assert "mixed_precision_scaling" not in [r.id for r in report.recommendations]


def test_training_evidence_reads_tensor_counters_and_never_truth_tests_tensors():
    assert training_evidence({"optim": torch.zeros(3)}) == "the checkpoint holds optimizer state ('optim')"
    assert training_evidence({"global_step": torch.tensor(500)}) == "the checkpoint holds global_step 500"
    assert training_evidence({"epoch": 0, "optimizer": {}}) is None


def test_parametrised_and_scripted_models_get_plain_reasons_not_crashes():
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(20):
        layers += [nn.utils.parametrizations.weight_norm(nn.Linear(32, 32)), nn.Sigmoid()]
    model = nn.Sequential(*layers, nn.Linear(32, 10))
    report = check(model, torch.randn(64, 32))
    # every fix was applied to the weight-normed copy and probed (the parametrisation once raised KeyError)
    assert {v.id for v in report.verifications} == {"batch_norm", "residual", "activation_change", "xavier_init"}
    assert all(v.verified and v.reason == "" for v in report.verifications), report.verifications
    scripted = torch.jit.script(mlp(30, 16, nn.Sigmoid, None))
    report = check(scripted, torch.randn(32, 16))
    assert {v.id for v in report.verifications} == {"batch_norm", "residual", "activation_change", "xavier_init"}
    reasons = [v.reason for v in report.verifications if not v.verified]
    assert len(reasons) == len(report.verifications) == 4
    sentence = "TorchScript modules cannot be changed in memory: apply the fix to the Python model and script it again"
    assert all(r.startswith(sentence) for r in reasons), reasons


def test_optimisation_onset_does_not_move_with_the_number_of_steps():
    """A regressor diverging at lr 0.5 (loss 81 → 7.8e4 in 5 steps) is caught at 5 steps, with the same onset
    at 5, 6 and 8 steps."""
    from gradcheck_cli.advise.optimise import trace_optimisation

    def run(steps: int):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
        g = torch.Generator().manual_seed(0)
        batch = Batch(args=(torch.randn(32, 8, generator=g),), target=torch.randn(32, 1, generator=g) * 10)
        return trace_optimisation(model, batch, steps=steps, lr=0.5)

    traces = [run(n) for n in (5, 6, 8)]
    assert all(t.verdict == "exploding" for t in traces), [t.verdict for t in traces]
    assert {t.onset_step for t in traces} == {5}
