"""End-to-end tests of ``gradcheck inspect`` on real checkpoint and batch files.

Every test writes real files (``torch.save``, ``torch.jit.script(...).save``) and runs the real
command line as ``python -m gradcheck_cli`` in a subprocess, then checks the exit code and what the
command printed (or its ``--format json`` report). Pickled checkpoints refer to classes in
``tests/cli_models.py`` as ``cli_models.<Name>``, so the subprocess gets ``tests/`` on PYTHONPATH.

Runs that several tests look at are made once by module-scoped fixtures; the runs of one fixture
go in parallel (one per CPU) because each subprocess spends most of its time importing torch.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import random
import shlex
import textwrap
from typing import Any

import pytest
import torch

import cli_models
import gradcheck_cli
from cli_support import (
    REPORT_KEYS,
    Proc,
    assert_healthy_tiny_net,
    assert_one_line_error,
    assert_weights_from,
    batch_generator,
    checkpoint_model,
    checkpoint_state,
    hashes,
    json_report,
    layer_weight_norms,
    run_cli,
    run_many,
    save_inputs,
    show,
)

# --------------------------------------------------------------------------- 1. whole pickled module


@pytest.fixture(scope="module")
def pickled_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("pickled")
    torch.save(checkpoint_model(), work / "tiny_module.pt")
    save_inputs(work)
    before = hashes(work)
    runs = run_many(
        {
            "refused": ["inspect", "tiny_module.pt", "--input", "x.pt"],
            "trusted": ["inspect", "tiny_module.pt", "--input", "x.pt", "--trust", "--format", "json"],
        },
        cwd=work,
        real=True,  # the headline use through the console script, in a process of its own
    )
    return {"dir": work, "before": before, **runs}


def test_pickled_module_refused_without_trust_lists_classes(pickled_runs: dict[str, Any]) -> None:
    line = assert_one_line_error(pickled_runs["refused"], "tiny_module.pt", "cli_models.TinyNet", "--trust")
    assert "would import and run code" in line


def test_pickled_module_loads_with_trust(pickled_runs: dict[str, Any]) -> None:
    report = json_report(pickled_runs["trusted"], exit_code=0)
    assert report["run"]["checkpoint_kind"] == "pickled_module"
    assert report["run"]["model_type"] == "TinyNet"
    assert report["run"]["loss_kind"] == "random_projection"
    assert_healthy_tiny_net(report)
    assert_weights_from(report, checkpoint_state())


# --------------------------------------------------------------------------- 2. malicious pickle


@pytest.fixture(scope="module")
def malicious_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The same payload saved as a zip checkpoint and in the legacy format; a trusted run as control."""
    work = tmp_path_factory.mktemp("malicious")
    save_inputs(work)
    markers = {}
    for name, zip_format in (("zip", True), ("legacy", False), ("control", True)):
        markers[name] = work / f"pwned_{name}"
        payload = cli_models.MaliciousPayload(f"touch {shlex.quote(str(markers[name]))}")
        torch.save(payload, work / f"evil_{name}.pt", _use_new_zipfile_serialization=zip_format)
    runs = run_many(
        {
            "zip": ["inspect", "evil_zip.pt", "--input", "x.pt"],
            "legacy": ["inspect", "evil_legacy.pt", "--input", "x.pt"],
            "control": ["inspect", "evil_control.pt", "--input", "x.pt", "--trust"],
        },
        cwd=work,
        real=True,  # a payload that runs must not run inside the test process
    )
    return {"markers": markers, **runs}


@pytest.mark.parametrize("file_format", ["zip", "legacy"])
def test_malicious_pickle_refused_without_trust_and_not_executed(
    malicious_runs: dict[str, Any], file_format: str
) -> None:
    proc = malicious_runs[file_format]
    line = assert_one_line_error(proc, f"evil_{file_format}.pt", "would import and run code", "--trust")
    if file_format == "zip":  # zip checkpoints can be scanned: the offending global is named
        assert "system" in line
    assert not malicious_runs["markers"][file_format].exists(), "the pickle's payload ran without --trust"


def test_malicious_pickle_payload_is_live_with_trust(malicious_runs: dict[str, Any]) -> None:
    """Control: the payload does run once the user trusts the file, so the refusal above is what saved us."""
    assert malicious_runs["markers"]["control"].exists()
    assert_one_line_error(malicious_runs["control"], "evil_control.pt", "not a model or a state_dict")


# --------------------------------------------------------------------------- 3. state_dict + --model

ARCH_FILE = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def build():
    return Net()
"""


@pytest.fixture(scope="module")
def state_dict_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("state_dict")
    torch.save(checkpoint_model().state_dict(), work / "tiny_sd.pt")
    save_inputs(work)
    (work / "arch").mkdir()
    (work / "arch" / "net.py").write_text(textwrap.dedent(ARCH_FILE), encoding="utf-8")
    before = hashes(work)
    runs = run_many(
        {
            "module_form": ["inspect", "tiny_sd.pt", "-i", "x.pt", "--model", "cli_models:make_tiny", "-f", "json"],
            "file_form": ["inspect", "tiny_sd.pt", "-i", "x.pt", "--model", "arch/net.py:build", "-f", "json"],
            "no_model": ["inspect", "tiny_sd.pt", "-i", "x.pt"],
        },
        cwd=work,
    )
    return {"dir": work, "before": before, **runs}


def test_state_dict_with_module_factory_loads_checkpoint_weights(state_dict_runs: dict[str, Any]) -> None:
    report = json_report(state_dict_runs["module_form"], exit_code=0)
    assert report["run"]["checkpoint_kind"] == "state_dict"
    assert report["run"]["model_type"] == "TinyNet"
    assert_healthy_tiny_net(report)
    assert_weights_from(report, checkpoint_state())
    fresh = layer_weight_norms(cli_models.make_tiny().state_dict())
    assert layer_weight_norms(checkpoint_state()) != pytest.approx(fresh, rel=1e-3), "weights must be told apart"


def test_tensor_batch_uses_random_projection_loss(state_dict_runs: dict[str, Any]) -> None:
    run = json_report(state_dict_runs["module_form"])["run"]
    assert run["loss_kind"] == "random_projection"
    assert run["batch"] == "float32[4, 8]"


def test_state_dict_with_file_factory_loads_checkpoint_weights(state_dict_runs: dict[str, Any]) -> None:
    report = json_report(state_dict_runs["file_form"], exit_code=0)
    assert report["run"]["checkpoint_kind"] == "state_dict"
    assert report["run"]["model_type"] == "Net"
    assert_healthy_tiny_net(report)
    assert_weights_from(report, checkpoint_state())


def test_state_dict_without_model_flag_asks_for_it(state_dict_runs: dict[str, Any]) -> None:
    assert_one_line_error(state_dict_runs["no_model"], "tiny_sd.pt", "weights only", "--model")


# --------------------------------------------------------------------------- 4. training-checkpoint layouts

TRAINING_LAYOUTS = {
    # name: (checkpoint_kind, notes the loader must report)
    "training_dict": ("training_checkpoint", ["weights from 'model_state_dict'"]),
    "lightning": ("training_checkpoint", ["weights from 'state_dict'", "stripped key prefix 'model.'"]),
    "ddp": ("state_dict", ["stripped key prefix 'module.'"]),
    "compile": ("state_dict", ["stripped key prefix '_orig_mod.'"]),
}


def _trained_checkpoint() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Weights and Adam state after one real optimiser step."""
    model = checkpoint_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = batch_generator()
    loss = torch.nn.functional.cross_entropy(
        model(torch.randn(4, cli_models.IN_FEATURES, generator=g)), torch.tensor([0, 1, 2, 3])
    )
    loss.backward()
    optimizer.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, optimizer.state_dict()


@pytest.fixture(scope="module")
def training_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("training")
    save_inputs(work)
    state, optimizer_state = _trained_checkpoint()
    contents = {
        "training_dict": {"model_state_dict": state, "epoch": 3, "optimizer_state_dict": optimizer_state},
        "lightning": {"state_dict": {"model." + k: v for k, v in state.items()}, "epoch": 3, "global_step": 30},
        "ddp": {"module." + k: v for k, v in state.items()},
        "compile": {"_orig_mod." + k: v for k, v in state.items()},
    }
    for name, content in contents.items():
        torch.save(content, work / f"{name}.pt")
    before = hashes(work)
    runs = run_many(
        {
            name: ["inspect", f"{name}.pt", "-i", "xy_index.pt", "-m", "cli_models:make_tiny", "-f", "json"]
            for name in contents
        },
        cwd=work,
    )
    return {"dir": work, "before": before, "state": state, **runs}


@pytest.mark.parametrize("layout", list(TRAINING_LAYOUTS))
def test_training_checkpoint_layout_loads_model_weights(training_runs: dict[str, Any], layout: str) -> None:
    kind, notes = TRAINING_LAYOUTS[layout]
    report = json_report(training_runs[layout], exit_code=0)
    assert report["run"]["checkpoint_kind"] == kind
    assert report["run"]["loss_kind"] == "cross_entropy"
    for note in notes:
        assert any(note in n for n in report["notes"]), report["notes"]
    assert_healthy_tiny_net(report)
    assert_weights_from(report, training_runs["state"])


# --------------------------------------------------------------------------- 5. weights that do not fit


@pytest.fixture(scope="module")
def mismatch_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Proc]:
    work = tmp_path_factory.mktemp("mismatch")
    save_inputs(work)
    torch.save(checkpoint_model(width=32).state_dict(), work / "wider.pt")
    missing = checkpoint_model().state_dict()
    del missing["fc2.bias"]
    torch.save(missing, work / "missing_key.pt")
    return run_many(
        {
            name: ["inspect", f"{name}.pt", "-i", "x.pt", "-m", "cli_models:make_tiny"]
            for name in ("wider", "missing_key")
        },
        cwd=work,
    )


def test_weights_of_another_width_refused_naming_shape_mismatch(mismatch_runs: dict[str, Proc]) -> None:
    assert_one_line_error(
        mismatch_runs["wider"],
        "do not fit the --model architecture",
        "shape mismatch at fc1.weight: checkpoint [32, 8], model [16, 8]",
    )


def test_weights_missing_a_key_refused_naming_the_key(mismatch_runs: dict[str, Proc]) -> None:
    assert_one_line_error(
        mismatch_runs["missing_key"], "do not fit the --model architecture", "1 missing key(s) (first: fc2.bias)"
    )


# --------------------------------------------------------------------------- 6. TorchScript


@pytest.fixture(scope="module")
def torchscript_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("torchscript")
    save_inputs(work)
    torch.jit.script(checkpoint_model()).save(str(work / "tiny_script.pt"))
    before = hashes(work)
    proc = run_cli(["inspect", "tiny_script.pt", "-i", "xy_index.pt", "--format", "json"], cwd=work)
    return {"dir": work, "before": before, "run": proc}


def test_torchscript_checkpoint_is_read_through_bias_gradients(torchscript_run: dict[str, Any]) -> None:
    proc = torchscript_run["run"]
    report = json_report(proc, exit_code=None)
    assert proc.returncode == 0, "a two-layer ReLU net is healthy" + show(proc)
    assert report["run"]["checkpoint_kind"] == "torchscript"
    assert report["run"]["model_type"] == "TinyNet"
    assert report["run"]["loss_kind"] == "cross_entropy"
    assert report["path"]["measured_with"] == "bias_gradients"  # module hooks do not fire on TorchScript
    assert any("read through the layers' bias gradients" in note for note in report["notes"]), report["notes"]
    assert_healthy_tiny_net(report)
    assert_weights_from(report, checkpoint_state())


# --------------------------------------------------------------------------- 7. batches


@pytest.fixture(scope="module")
def batch_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("batches")
    save_inputs(work)
    torch.save(checkpoint_model().state_dict(), work / "tiny_sd.pt")
    torch.save(cli_models.make_keyword().state_dict(), work / "keyword_sd.pt")
    tiny = ["tiny_sd.pt", "-m", "cli_models:make_tiny"]
    keyword = ["keyword_sd.pt", "-m", "cli_models:make_keyword"]
    runs = run_many(
        {
            "tuple_index": ["inspect", *tiny, "-i", "xy_index.pt", "-f", "json"],
            "tuple_float": ["inspect", *tiny, "-i", "xy_float.pt", "-f", "json"],
            "kwargs": ["inspect", *keyword, "-i", "kwargs.pt", "-f", "json"],
            "kwargs_target": ["inspect", *keyword, "-i", "kwargs_y.pt", "-f", "json"],
            "wrong_width": ["inspect", *tiny, "-i", "x_wrong_width.pt"],
            "missing_file": ["inspect", *tiny, "-i", "no_such_batch.pt"],
            "no_input": ["inspect", *tiny, "-f", "json"],
        },
        cwd=work,
    )
    return {"dir": work, **runs}


def test_tuple_batch_with_class_indices_uses_cross_entropy(batch_runs: dict[str, Any]) -> None:
    report = json_report(batch_runs["tuple_index"], exit_code=0)
    assert report["run"]["loss_kind"] == "cross_entropy"
    assert report["run"]["batch"] == "float32[4, 8], target int64[4]"
    assert_healthy_tiny_net(report)


def test_tuple_batch_with_same_shape_float_target_uses_mse(batch_runs: dict[str, Any]) -> None:
    report = json_report(batch_runs["tuple_float"], exit_code=0)
    assert report["run"]["loss_kind"] == "mse"
    assert report["run"]["batch"] == "float32[4, 8], target float32[4, 4]"
    assert_healthy_tiny_net(report)


def test_dict_batch_passes_keyword_arguments(batch_runs: dict[str, Any]) -> None:
    report = json_report(batch_runs["kwargs"], exit_code=0)
    assert report["run"]["model_type"] == "KeywordNet"
    assert report["run"]["batch"] == "x=float32[4, 8], mask=float32[4, 8]"
    assert report["run"]["loss_kind"] == "random_projection"
    assert_healthy_tiny_net(report)


def test_dict_batch_target_key_the_forward_does_not_take_becomes_the_target(batch_runs: dict[str, Any]) -> None:
    report = json_report(batch_runs["kwargs_target"], exit_code=0)
    assert report["run"]["batch"] == "x=float32[4, 8], mask=float32[4, 8], target int64[4]"
    assert report["run"]["loss_kind"] == "cross_entropy"


def test_batch_of_wrong_feature_size_refused_in_one_line(batch_runs: dict[str, Any]) -> None:
    assert_one_line_error(
        batch_runs["wrong_width"],
        "the forward pass raised in fc1 (Linear)",
        "the first layer fc1 (Linear) expects in_features=8, the batch is float32[4, 5]",
    )


def test_missing_input_file_refused(batch_runs: dict[str, Any]) -> None:
    assert_one_line_error(batch_runs["missing_file"], "batch file not found", "no_such_batch.pt")


def test_checkpoint_without_input_flag_infers_a_batch_from_the_first_layer(batch_runs: dict[str, Any]) -> None:
    report = json_report(batch_runs["no_input"], exit_code=None)
    assert report["run"]["batch"] == "float32[8, 8]"
    assert report["run"]["batch_source"] == "random float32[8, 8] inferred from the first layer fc1 (Linear)"


# --------------------------------------------------------------------------- 8. unusable files

LFS_POINTER = (
    "version https://git-lfs.github.com/spec/v1\n"
    f"oid sha256:{hashlib.sha256(b'the real weights').hexdigest()}\n"
    "size 104857600\n"
)


@pytest.fixture(scope="module")
def unusable_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Proc]:
    work = tmp_path_factory.mktemp("unusable")
    save_inputs(work)
    (work / "random.pt").write_bytes(random.Random(0).randbytes(4096))
    (work / "lfs_pointer.pt").write_text(LFS_POINTER, encoding="utf-8")
    return run_many(
        {
            "missing": ["inspect", "no_such_model.pt", "-i", "x.pt"],
            "random": ["inspect", "random.pt", "-i", "x.pt"],
            "lfs": ["inspect", "lfs_pointer.pt", "-i", "x.pt"],
        },
        cwd=work,
    )


def test_nonexistent_checkpoint_refused(unusable_runs: dict[str, Proc]) -> None:
    assert_one_line_error(unusable_runs["missing"], "checkpoint not found: no_such_model.pt")


def test_random_bytes_checkpoint_refused_in_one_line(unusable_runs: dict[str, Proc]) -> None:
    assert_one_line_error(unusable_runs["random"], "random.pt")


def test_random_bytes_checkpoint_reported_as_unreadable_not_as_code_to_trust(unusable_runs: dict[str, Proc]) -> None:
    line = assert_one_line_error(unusable_runs["random"], "random.pt")
    assert "would import and run code" not in line
    assert "--trust" not in line
    assert "not a PyTorch checkpoint" in line


def test_git_lfs_pointer_refused_with_lfs_pull_hint(unusable_runs: dict[str, Proc]) -> None:
    assert_one_line_error(unusable_runs["lfs"], "lfs_pointer.pt", "git-LFS pointer", "git lfs pull")


# --------------------------------------------------------------------------- 9. files left untouched


@pytest.mark.parametrize("group", ["pickled_runs", "state_dict_runs", "training_runs", "torchscript_run"])
def test_run_leaves_checkpoint_and_batch_files_byte_identical(request: pytest.FixtureRequest, group: str) -> None:
    runs = request.getfixturevalue(group)
    assert runs["before"], "the fixture wrote checkpoint and batch files"
    assert hashes(runs["dir"]) == runs["before"]


# --------------------------------------------------------------------------- 10. the CI gate


@pytest.fixture(scope="module")
def gate_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("gate")
    sigmoid = ["inspect", "--example", "deep-sigmoid"]
    runs = run_many(
        {
            "sigmoid": [*sigmoid, "--format", "json"],
            "kaiming": ["inspect", "--example", "relu-kaiming", "--format", "json"],
            "never": [*sigmoid, "--fail-on", "never"],
            "exploding": [*sigmoid, "--fail-on", "exploding"],
            "vanishing": [*sigmoid, "--fail-on", "vanishing"],
            "bogus": [*sigmoid, "--fail-on", "bogus"],
            "to_file": [*sigmoid, "--format", "json", "--output", "report.json"],
        },
        cwd=work,
    )
    return {"dir": work, **runs}


def test_vanishing_example_fails_the_gate(gate_runs: dict[str, Any]) -> None:
    report = json_report(gate_runs["sigmoid"], exit_code=1)
    assert report["status"] == "unhealthy"
    assert report["problems"] == ["vanishing"]
    assert report["run"]["checkpoint_kind"] == "example"
    assert any(f["severity"] == "error" and f["problem"] == "vanishing" for f in report["findings"])
    assert report["recommendations"], "an unhealthy report says what to do"


def test_healthy_example_passes_the_gate(gate_runs: dict[str, Any]) -> None:
    report = json_report(gate_runs["kaiming"], exit_code=0)
    assert report["status"] == "healthy"
    assert report["problems"] == []


def test_fail_on_never_passes_an_unhealthy_model_but_still_reports_it(gate_runs: dict[str, Any]) -> None:
    proc = gate_runs["never"]
    assert proc.returncode == 0, show(proc)
    assert "unhealthy: vanishing" in proc.stdout


def test_fail_on_a_problem_gates_only_that_problem(gate_runs: dict[str, Any]) -> None:
    assert gate_runs["exploding"].returncode == 0, show(gate_runs["exploding"])
    assert gate_runs["vanishing"].returncode == 1, show(gate_runs["vanishing"])


def test_fail_on_unknown_value_is_a_usage_error(gate_runs: dict[str, Any]) -> None:
    assert_one_line_error(gate_runs["bogus"], "--fail-on 'bogus' is not one of", "never", "vanishing")


def test_json_output_file_gets_the_report_and_stdout_stays_empty(gate_runs: dict[str, Any]) -> None:
    proc = gate_runs["to_file"]
    assert proc.returncode == 1, show(proc)
    assert proc.stdout == ""
    assert "report written to report.json" in proc.stderr
    report = json.loads((gate_runs["dir"] / "report.json").read_text(encoding="utf-8"))
    assert report.keys() >= REPORT_KEYS
    assert report["problems"] == ["vanishing"]


# --------------------------------------------------------------------------- 11. startup without torch


def imported_modules(importtime_stderr: str) -> list[str]:
    """Module names from ``python -X importtime``'s table (its last column, indentation stripped)."""
    names = []
    for line in importtime_stderr.splitlines():
        if line.startswith("import time:"):
            name = line.rsplit("|", 1)[-1].strip()
            if name != "imported package":
                names.append(name)
    return names


def _torch_modules(names: list[str]) -> list[str]:
    return [n for n in names if n == "torch" or n.startswith("torch.")]


@pytest.fixture(scope="module")
def startup_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Proc]:
    work = tmp_path_factory.mktemp("startup")
    runs = run_many(
        {
            "help": ["--help"],
            "inspect_help": ["inspect", "--help"],
            "control": ["inspect", "--example", "nan-weight", "--fail-on", "never"],
        },
        cwd=work,
        python_flags=["-X", "importtime"],
    )
    runs["version"] = run_cli(["--version"], cwd=work)
    return runs


@pytest.mark.parametrize("command", ["help", "inspect_help"])
def test_help_does_not_import_torch(startup_runs: dict[str, Proc], command: str) -> None:
    proc = startup_runs[command]
    assert proc.returncode == 0, show(proc)
    assert "Usage:" in proc.stdout
    assert "Exit codes:" in proc.stdout
    names = imported_modules(proc.stderr)
    assert "gradcheck_cli.cli.app" in names
    assert _torch_modules(names) == []


def test_importtime_parser_sees_torch_when_a_probe_runs(startup_runs: dict[str, Proc]) -> None:
    """Control for the test above: the same parsing finds torch once inspect really runs."""
    proc = startup_runs["control"]
    assert proc.returncode == 0, show(proc)
    assert "torch" in imported_modules(proc.stderr)


def test_version_prints_the_package_version(startup_runs: dict[str, Proc]) -> None:
    proc = startup_runs["version"]
    assert proc.returncode == 0, show(proc)
    assert proc.stdout == f"gradcheck {gradcheck_cli.__version__}\n"
    assert gradcheck_cli.__version__ == importlib.metadata.version("gradcheck")
