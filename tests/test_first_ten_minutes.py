"""A newcomer's first checkpoints, made the way a training script makes them, through the real CLI.

The script below trains at top level without an ``if __name__ == "__main__":`` guard and saves with
``torch.save(model)``: its classes live in ``__main__``. Running it (as the user did) writes the files;
gradcheck must then load them without running the script again (a marker file proves it) and without
changing a byte of what the user owns.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cli_support import assert_one_line_error, hashes, json_report, run_cli, show

TRAIN_SCRIPT = '''"""Train a small classifier (top-level code, no __main__ guard)."""
from pathlib import Path

import torch
from torch import nn

HIDDEN = 32
Activation = nn.ReLU


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, HIDDEN), Activation(), nn.Linear(HIDDEN, 3))

    def forward(self, x):
        return self.body(x)


def build():
    return Net()


torch.manual_seed(0)
model = Net()
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
for _ in range(3):
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
torch.save(model, "model.pt")
torch.save(model.state_dict(), "weights.pt")
torch.save({"step": 3, "model_state": model.state_dict(), "optimizer_state": optimizer.state_dict()}, "ckpt.pt")
torch.save((x, y), "batch.pt")
Path("trained.marker").write_text("the script ran")
'''


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A directory where ``python train.py`` ran once, as the user did; the marker removed afterwards."""
    (tmp_path / "train.py").write_text(TRAIN_SCRIPT)
    subprocess.run([sys.executable, "train.py"], cwd=tmp_path, check=True, timeout=120)
    (tmp_path / "trained.marker").unlink()
    return tmp_path


def _untouched(project: Path, before: dict[str, str]) -> None:
    assert hashes(project) == before, "gradcheck changed a file the user owns"
    assert not (project / "trained.marker").exists(), "gradcheck ran the training script's top-level code"


def test_a_whole_model_saved_from_a_script_is_refused_with_the_exact_command(project: Path) -> None:
    before = hashes(project)
    line = assert_one_line_error(run_cli(["inspect", "model.pt", "--input", "batch.pt"], cwd=project))
    assert "__main__.Net" in line
    assert "gradcheck inspect model.pt --trust --model train.py" in line  # the script found by reading it
    trusted = run_cli(["inspect", "model.pt", "--input", "batch.pt", "--trust"], cwd=project)
    assert_one_line_error(
        trusted, "live in that script's __main__", "gradcheck inspect model.pt --trust --model train.py"
    )
    _untouched(project, before)


def test_trust_and_the_script_load_the_pickled_model_without_running_the_script(project: Path) -> None:
    before = hashes(project)
    args = ["inspect", "model.pt", "--input", "batch.pt", "--trust", "--model", "train.py", "--format", "json"]
    report = json_report(run_cli(args, cwd=project))
    notes = " | ".join(report["notes"])
    assert "__main__ classes read from train.py" in notes
    assert "without running its top-level work" in notes
    saved = torch.load(project / "weights.pt")
    assert [layer["name"] for layer in report["layers"]][:1] == ["body.0"]
    trained = torch.cat([saved["body.0.weight"].flatten(), saved["body.0.bias"]]).norm().item()
    assert report["layers"][0]["weight_norm"] == pytest.approx(trained, rel=1e-5)  # the trained weights, not Net()
    _untouched(project, before)


@pytest.mark.parametrize("spec", ["train.py", "train.py:Net", "train.py:build"])
def test_weights_load_into_a_script_without_running_it(project: Path, spec: str) -> None:
    before = hashes(project)
    report = json_report(run_cli(["inspect", "weights.pt", "-i", "batch.pt", "-m", spec, "-f", "json"], cwd=project))
    assert report["status"] == "healthy"
    _untouched(project, before)


def test_weights_without_an_architecture_name_the_exact_model_form(project: Path) -> None:
    assert_one_line_error(
        run_cli(["inspect", "weights.pt", "--input", "batch.pt"], cwd=project),
        "holds weights only (4 tensors)",
        "gradcheck inspect weights.pt --model train.py:Net",
    )


def test_a_factory_that_needs_top_level_work_is_refused_naming_why(project: Path) -> None:
    script = project / "train.py"
    script.write_text(
        script.read_text() + "\nDEVICE = torch.device('cpu')\n\ndef on_device():\n    return Net().to(DEVICE)\n"
    )
    before = hashes(project)
    assert_one_line_error(
        run_cli(["inspect", "weights.pt", "--input", "batch.pt", "--model", "train.py:on_device"], cwd=project),
        "NameError",
        "DEVICE",
        "top-level code gradcheck does not run",
    )
    _untouched(project, before)


def test_a_script_with_two_models_asks_which(project: Path) -> None:
    script = project / "train.py"
    script.write_text(script.read_text().replace("def build():", "class Other(Net):\n    pass\n\n\ndef build():"))
    assert_one_line_error(
        run_cli(["inspect", "weights.pt", "--input", "batch.pt", "--model", "train.py"], cwd=project),
        "name the class or function that builds the model",
        "Net, Other",
    )


def test_training_checkpoint_weights_are_found_by_content(project: Path) -> None:
    before = hashes(project)
    proc = run_cli(["inspect", "ckpt.pt", "-i", "batch.pt", "-m", "train.py:Net", "-f", "json"], cwd=project)
    report = json_report(proc)
    assert "weights from 'model_state'" in report["notes"], show(proc)
    _untouched(project, before)


def test_of_two_weight_dicts_the_one_that_fits_the_model_is_used(project: Path) -> None:
    weights = torch.load(project / "weights.pt")
    other = {"encoder.weight": torch.zeros(4, 4), "encoder.bias": torch.zeros(4)}
    torch.save({"teacher": other, "student": {"ema": weights}}, project / "two.pt")
    proc = run_cli(["inspect", "two.pt", "-i", "batch.pt", "-m", "train.py:Net", "-f", "json"], cwd=project)
    notes = " | ".join(json_report(proc)["notes"])
    assert "weights from 'student.ema' (also found 'teacher'" in notes, show(proc)


def test_a_dict_without_weights_says_what_to_save(project: Path) -> None:
    torch.save({"step": 3, "lr": 0.1}, project / "empty.pt")
    assert_one_line_error(
        run_cli(["inspect", "empty.pt", "--input", "batch.pt", "--model", "train.py:Net"], cwd=project),
        "no entry holds a module or a dict of named tensors",
    )


def test_an_extra_tensor_fails_strict_loading_and_no_strict_lists_it(project: Path) -> None:
    weights = torch.load(project / "weights.pt")
    torch.save({**weights, "head.extra": torch.zeros(3)}, project / "extra.pt")
    args = ["inspect", "extra.pt", "--input", "batch.pt", "--model", "train.py:Net"]
    assert_one_line_error(run_cli(args, cwd=project), "1 unexpected key(s) (first: head.extra)", "--no-strict")
    report = json_report(run_cli([*args, "--no-strict", "--format", "json"], cwd=project))
    assert any("ignored 1 tensor(s) (head.extra)" in note for note in report["notes"]), report["notes"]
    del weights["body.2.bias"]
    torch.save(weights, project / "short.pt")
    proc = run_cli(
        ["inspect", "short.pt", "-i", "batch.pt", "-m", "train.py:Net", "--no-strict", "-f", "json"], cwd=project
    )
    assert any("body.2.bias" in note and "kept initial values" in note for note in json_report(proc)["notes"])
    shapes = {**torch.load(project / "weights.pt"), "body.2.bias": torch.zeros(5)}
    torch.save(shapes, project / "shape.pt")
    proc = run_cli(["inspect", "shape.pt", "-i", "batch.pt", "-m", "train.py:Net", "--no-strict"], cwd=project)
    assert_one_line_error(proc, "shape mismatch at body.2.bias")  # --no-strict never loads a wrong shape


def test_a_checkpoint_with_its_hugging_face_config_needs_no_model(tmp_path: Path) -> None:
    """``{"config": model.config.to_dict(), "state_dict": ...}`` names its architecture; built from the dict, no
    code from the file, and the saved weights (not fresh ones) are the ones measured."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(3.0)  # tied to wte: a norm a fresh model would not have
    torch.save({"config": config.to_dict(), "state_dict": model.state_dict(), "epoch": 2}, tmp_path / "gpt.pt")
    torch.save(torch.randint(0, 100, (2, 16)), tmp_path / "ids.pt")
    proc = run_cli(["inspect", "gpt.pt", "--input", "ids.pt", "--no-verify", "--format", "json"], cwd=tmp_path)
    report = json_report(proc, exit_code=None)
    assert "architecture GPT2LMHeadModel built from the checkpoint's Hugging Face config ('config')" in report["notes"]
    embedding = next(layer for layer in report["layers"] if layer["name"] == "transformer.wte")
    assert embedding["weight_norm"] == pytest.approx(model.transformer.wte.weight.norm().item(), rel=1e-5)
    custom = {**config.to_dict(), "auto_map": {"AutoModel": "modeling.Net"}}
    torch.save({"config": custom, "state_dict": model.state_dict()}, tmp_path / "custom.pt")
    assert_one_line_error(
        run_cli(["inspect", "custom.pt", "--input", "ids.pt"], cwd=tmp_path), "custom code (auto_map)"
    )


LIGHTNING_MODULE = """
import lightning
import torch
from torch import nn


class Classifier(lightning.LightningModule):
    def __init__(self, width: int = 4, classes: int = 2):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(8, width), nn.Tanh(), nn.Linear(width, classes))

    def forward(self, x):
        return self.net(x)
"""


def test_a_lightning_checkpoint_is_built_with_its_hyper_parameters(tmp_path: Path) -> None:
    """The constructor arguments Lightning saved (width=16, not the default 4) build the architecture, and a
    LightningCLI checkpoint that names its class is built from that name with --trust (refused without)."""
    (tmp_path / "litmodel.py").write_text(LIGHTNING_MODULE)
    make = (
        "import torch, litmodel\n"
        "m = litmodel.Classifier(width=16, classes=3)\n"
        "torch.save({'state_dict': m.state_dict(), 'hyper_parameters': dict(m.hparams), 'epoch': 4}, 'lit.ckpt')\n"
        "hp = {**dict(m.hparams), '_class_path': 'litmodel.Classifier', '_instantiator': 'x'}\n"
        "torch.save({'state_dict': m.state_dict(), 'hyper_parameters': hp}, 'cli.ckpt')\n"
        "torch.save(torch.randn(4, 8), 'x.pt')\n"
    )
    subprocess.run([sys.executable, "-c", make], cwd=tmp_path, check=True, timeout=120)
    args = ["inspect", "lit.ckpt", "--input", "x.pt", "--model", "litmodel:Classifier", "--format", "json"]
    notes = json_report(run_cli(args, cwd=tmp_path))["notes"]
    assert "built with the checkpoint's hyper_parameters (classes, width)" in notes
    line = assert_one_line_error(run_cli(["inspect", "cli.ckpt", "--input", "x.pt"], cwd=tmp_path), "--trust")
    assert "names its model class litmodel.Classifier" in line and "--model litmodel:Classifier" in line
    trusted = run_cli(["inspect", "cli.ckpt", "--input", "x.pt", "--trust", "--format", "json"], cwd=tmp_path)
    assert any("named by the checkpoint's hyper_parameters" in note for note in json_report(trusted)["notes"])
