"""``torch.export`` programs (``.pt2``): loading, measuring, and refusing archives that would run code.

Archives are real ``torch.export.save`` files; the malicious ones are made from a real archive by
rewriting members the way an attacker would (a config entry switched to ``use_pickle``, a payload
replaced by a pickle whose ``__reduce__`` creates a marker file). The command line runs as a
subprocess (``python -m gradcheck_cli``), several at a time; the other cases call the loader
in-process, which is what the command line calls.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import shlex
import subprocess
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import cli_support
from gradcheck_cli.errors import CheckpointError, UntrustedCheckpointError
from gradcheck_cli.load import load_checkpoint
from gradcheck_cli.load.exported import load_exported
from gradcheck_cli.load.exported_scan import is_plain_shape_expression, scan_archive
from gradcheck_cli.probe.modules import supports_module_hooks

ROOT = "model"
"""Top-level folder of the archives written here (torch names it after the file)."""
STORED_INPUTS = "the example inputs stored in the checkpoint"


# --------------------------------------------------------------------------- helpers


class CreatesFileWhenUnpickled:
    """Unpickling this object opens ``path`` for writing: it creates the marker file."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


def torch_bytes(value: Any, *, protocol: int = 2) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer, pickle_protocol=protocol)
    return buffer.getvalue()


def export(model: nn.Module, path: Path, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None) -> Path:
    torch.manual_seed(0)
    torch.export.save(torch.export.export(model, args, kwargs), path)
    return path


def rewrite(src: Path, dst: Path, replace: Mapping[str, bytes] = {}, add: Mapping[str, bytes] = {}) -> Path:
    """Copy the archive ``src`` to ``dst`` with members (named below the top folder) replaced or added."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        root = zin.namelist()[0].split("/")[0]
        for info in zin.infolist():
            relative = info.filename.split("/", 1)[1]
            zout.writestr(info.filename, replace.get(relative, zin.read(info)))
        for relative, data in add.items():
            zout.writestr(f"{root}/{relative}", data)
    return dst


def member(archive: Path, relative: str) -> bytes:
    with zipfile.ZipFile(archive) as handle:
        root = handle.namelist()[0].split("/")[0]
        return handle.read(f"{root}/{relative}")


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))


class KeywordNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.embed(x)) * mask)


def deep_sigmoid_mlp(depth: int = 50, width: int = 16) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.Sigmoid()]
    return nn.Sequential(*layers, nn.Linear(width, 4))


def run_cli(args: Sequence[Any], cwd: Path) -> subprocess.CompletedProcess[str]:
    return cli_support.run_cli(args, cwd=cwd)


def show(proc: subprocess.CompletedProcess[str]) -> str:
    return f"\n$ {shlex.join(proc.args)}\nexit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"


def report_of(proc: subprocess.CompletedProcess[str], exit_code: int) -> dict[str, Any]:
    assert proc.returncode == exit_code, show(proc)
    assert "Traceback" not in proc.stderr, show(proc)
    report: dict[str, Any] = json.loads(proc.stdout)
    return report


def one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert proc.returncode == 2, show(proc)
    assert "Traceback" not in proc.stdout + proc.stderr, show(proc)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, show(proc)
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in the error line{show(proc)}"
    return lines[0]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def refused_in_process(archive: Path, *needles: str) -> UntrustedCheckpointError:
    with pytest.raises(UntrustedCheckpointError) as caught:
        load_exported(archive, trust=False)
    message = str(caught.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message
    return caught.value


# --------------------------------------------------------------------------- the command line


@pytest.fixture(scope="module")
def cli(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Archives and batches in one folder, and every command-line run made on them (in parallel)."""
    work = tmp_path_factory.mktemp("exported")
    healthy = export(mlp(), work / "model.pt2", (torch.randn(3, 4),))
    torch.save(torch.randn(3, 4) * 5, work / "batch.pt")
    export(deep_sigmoid_mlp(), work / "sigmoid.pt2", (torch.randn(8, 16),))
    export(KeywordNet(), work / "keywords.pt2", (), {"x": torch.randn(4, 6), "mask": torch.ones(4, 8)})
    torch.save({"x": torch.randn(4, 6), "mask": torch.full((4, 8), 0.5)}, work / "kw_batch.pt")

    config = json.loads(member(healthy, "data/weights/model_weights_config.json"))
    config["config"]["0.weight"]["use_pickle"] = True
    rewrite(
        healthy,
        work / "evil_weight.pt2",
        {
            "data/weights/model_weights_config.json": json.dumps(config).encode(),
            "data/weights/weight_0": torch_bytes(CreatesFileWhenUnpickled(work / "MARKER_weight")),
        },
    )
    # protocol 4 pickles name globals with STACK_GLOBAL, which torch's own scanner does not see
    evil_inputs: tuple[tuple[Any, ...], dict[str, Any]] = ((CreatesFileWhenUnpickled(work / "MARKER_inputs"),), {})
    rewrite(healthy, work / "evil_inputs.pt2", {"data/sample_inputs/model.pt": torch_bytes(evil_inputs, protocol=4)})
    trusted_inputs: tuple[tuple[Any, ...], dict[str, Any]] = ((CreatesFileWhenUnpickled(work / "MARKER_trusted"),), {})
    rewrite(healthy, work / "trusted.pt2", {"data/sample_inputs/model.pt": torch_bytes(trusted_inputs)})
    data = healthy.read_bytes()
    (work / "truncated.pt2").write_bytes(data[: len(data) // 2])

    archives = sorted(work.glob("*.pt2"))
    before = {p.name: digest(p) for p in archives}
    commands = {
        "healthy": ["inspect", "model.pt2", "--format", "json"],
        "with_input": ["inspect", "model.pt2", "--input", "batch.pt", "--format", "json"],
        "sigmoid": ["inspect", "sigmoid.pt2", "--format", "json"],
        "keywords": ["inspect", "keywords.pt2", "--format", "json"],
        "keywords_input": ["inspect", "keywords.pt2", "--input", "kw_batch.pt", "--format", "json"],
        "evil_weight": ["inspect", "evil_weight.pt2", "--format", "json"],
        "evil_inputs": ["inspect", "evil_inputs.pt2", "--format", "json"],
        "truncated": ["inspect", "truncated.pt2", "--format", "json"],
    }
    runs = cli_support.run_many(commands, cwd=work)
    # run after the refusals, so that its marker cannot be mistaken for theirs
    runs["trusted"] = run_cli(["inspect", "trusted.pt2", "--trust", "--input", "batch.pt", "--format", "json"], work)
    after = {p.name: digest(p) for p in archives}
    return {"dir": work, "runs": runs, "before": before, "after": after}


def test_healthy_program_is_measured_on_its_stored_example_inputs(cli: dict[str, Any]) -> None:
    report = report_of(cli["runs"]["healthy"], 0)
    assert report["status"] == "healthy"
    assert report["run"]["checkpoint_kind"] == "exported_program"
    assert report["run"]["batch_source"] == STORED_INPUTS
    assert report["run"]["batch"] == "float32[3, 4]"
    # the loader restores the module hierarchy (torch.export.unflatten): module hooks fire as on the eager model
    assert report["path"]["measured_with"] == "activation_gradients"
    assert [layer["name"] for layer in report["layers"]] == ["0", "2"]
    assert all(layer["grad_norm"] > 0 and layer["act_grad_norm"] > 0 for layer in report["layers"])
    notes = " ".join(report["notes"])
    assert "cannot switch train/eval mode" in notes
    assert "module hooks do not fire" not in notes
    assert not [f for f in report["findings"] if f["code"] == "GC006"]


def test_input_file_replaces_the_stored_example_inputs(cli: dict[str, Any]) -> None:
    stored = report_of(cli["runs"]["healthy"], 0)
    given = report_of(cli["runs"]["with_input"], 0)
    assert given["run"]["batch_source"] == "--input batch.pt"
    assert given["run"]["loss_value"] != stored["run"]["loss_value"]


def test_deep_sigmoid_program_is_flagged_vanishing_from_activation_gradients(cli: dict[str, Any]) -> None:
    report = report_of(cli["runs"]["sigmoid"], 1)
    assert report["problems"] == ["vanishing"]
    assert report["path"]["measured_with"] == "activation_gradients"
    assert report["path"]["length"] == 51


def test_keyword_input_program_runs_on_its_stored_keyword_examples(cli: dict[str, Any]) -> None:
    report = report_of(cli["runs"]["keywords"], 0)
    assert report["run"]["batch_source"] == STORED_INPUTS
    assert report["run"]["batch"] == "x=float32[4, 6], mask=float32[4, 8]"
    assert {layer["name"] for layer in report["layers"]} == {"embed", "head"}
    assert all(layer["grad_norm"] > 0 for layer in report["layers"])


def test_keyword_input_program_takes_a_dict_batch_file(cli: dict[str, Any]) -> None:
    stored = report_of(cli["runs"]["keywords"], 0)
    given = report_of(cli["runs"]["keywords_input"], 0)
    assert given["run"]["batch_source"] == "--input kw_batch.pt"
    assert given["run"]["batch"] == "x=float32[4, 6], mask=float32[4, 8]"
    assert given["run"]["loss_value"] != stored["run"]["loss_value"]


def test_pickled_weight_payload_is_refused_without_running_it(cli: dict[str, Any]) -> None:
    line = one_line_error(cli["runs"]["evil_weight"], "evil_weight.pt2", "io.open", "'0.weight'", "--trust")
    assert "would import and run code" in line
    assert not (cli["dir"] / "MARKER_weight").exists()


def test_malicious_sample_inputs_are_refused_without_running_them(cli: dict[str, Any]) -> None:
    one_line_error(cli["runs"]["evil_inputs"], "evil_inputs.pt2", "io.open", "data/sample_inputs/model.pt", "--trust")
    assert not (cli["dir"] / "MARKER_inputs").exists()


def test_truncated_archive_is_a_one_line_error(cli: dict[str, Any]) -> None:
    one_line_error(cli["runs"]["truncated"], "truncated.pt2", "damaged")


def test_trusted_archive_loads_and_says_that_its_code_ran(cli: dict[str, Any]) -> None:
    # the stored inputs need code, so with --trust they are unpickled in full (creating the marker)
    report = report_of(cli["runs"]["trusted"], 0)
    assert report["run"]["checkpoint_kind"] == "exported_program"
    assert report["run"]["batch_source"] == "--input batch.pt"
    assert any(note.startswith("--trust") and "io.open" in note for note in report["notes"])
    assert (cli["dir"] / "MARKER_trusted").exists()


def test_archives_are_byte_identical_after_every_run(cli: dict[str, Any]) -> None:
    assert cli["after"] == cli["before"]


# --------------------------------------------------------------------------- the loader, in-process


@pytest.fixture(scope="module")
def healthy_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export(mlp(), tmp_path_factory.mktemp("healthy") / "model.pt2", (torch.randn(3, 4),))


def test_loaded_program_parameters_are_leaves_that_receive_gradients(healthy_archive: Path) -> None:
    loaded = load_checkpoint(healthy_archive, model_spec=None, trust=False)
    assert loaded.kind == "exported_program"
    assert loaded.example_batch is not None
    params = dict(loaded.module.named_parameters())
    assert set(params) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert all(isinstance(p, nn.Parameter) and p.is_leaf for p in params.values())
    for p in params.values():
        p.requires_grad_(True)
    loaded.module(*loaded.example_batch.args).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params.values())
    # the module hierarchy is restored (torch.export.unflatten), so module hooks fire on each layer
    assert supports_module_hooks(loaded.module)
    assert not isinstance(loaded.module, torch.fx.GraphModule)


def test_dynamic_shape_program_is_safe_and_runs_on_other_batch_sizes(tmp_path: Path) -> None:
    batch = torch.export.Dim("batch", min=2, max=64)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Flatten(0), nn.Unflatten(0, (-1, 6)), nn.Linear(6, 2))
    archive = tmp_path / "dynamic.pt2"
    torch.export.save(torch.export.export(model, (torch.randn(5, 4),), dynamic_shapes=({0: batch},)), archive)
    assert "expr_str" in member(archive, "models/model.json").decode()
    assert scan_archive(archive) == []
    loaded = load_exported(archive, trust=False)
    assert loaded.module(torch.randn(9, 4)).shape == (9, 2)


def test_pickled_weight_holding_only_a_parameter_loads_without_trust(healthy_archive: Path, tmp_path: Path) -> None:
    # use_pickle alone is not a refusal: a payload torch's tensors-only unpickler reads is safe
    config = json.loads(member(healthy_archive, "data/weights/model_weights_config.json"))
    config["config"]["0.weight"]["use_pickle"] = True
    weight = nn.Parameter(torch.full((8, 4), 0.25))
    archive = rewrite(
        healthy_archive,
        tmp_path / "pickled_parameter.pt2",
        {
            "data/weights/model_weights_config.json": json.dumps(config).encode(),
            "data/weights/weight_0": torch_bytes(weight),
        },
    )
    assert scan_archive(archive) == []
    loaded = load_exported(archive, trust=False)
    assert torch.equal(dict(loaded.module.named_parameters())["0.weight"].detach(), weight.detach())


@pytest.mark.parametrize(
    "expression",
    [
        "Symbol('s31', positive=True, integer=True)",
        "Mul(Integer(6), Symbol('s31', positive=True, integer=True))",
        "FloorDiv(Symbol('s77', positive=True, integer=True), Integer(3))",
        "Eq(Mod(s0, 2), 0)",
        "Float('1.5', precision=53)",
        "2*u0 + 1 >= -int_oo",
        "OpaqueUnaryFn_sqrt(s0)",
    ],
)
def test_shape_expressions_torch_writes_are_accepted(expression: str) -> None:
    assert is_plain_shape_expression(expression)


@pytest.mark.parametrize(
    "expression",
    [
        "__import__('os').system('true')",
        "Symbol('s0').__class__",
        "Max('__import__(1)')",
        "getattr(s0, 'x')",
        "s0[0]",
        "lambda: 0",
        "eval('1')",
        "Symbol('s0\\x27)')",
    ],
)
def test_shape_expressions_that_reach_python_are_rejected(expression: str) -> None:
    assert not is_plain_shape_expression(expression)


def test_opaque_constant_read_with_plain_pickle_is_refused(healthy_archive: Path, tmp_path: Path) -> None:
    marker = tmp_path / "MARKER"
    config = {"config": {"evil": {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True}}}
    archive = rewrite(
        healthy_archive,
        tmp_path / "opaque.pt2",
        {"data/constants/model_constants_config.json": json.dumps(config).encode()},
        {"data/constants/opaque_obj_0": pickle.dumps(CreatesFileWhenUnpickled(marker))},
    )
    refused_in_process(archive, "io.open", "constant 'evil'", "pickle.loads")
    assert not marker.exists()


def test_legacy_weights_file_is_refused(healthy_archive: Path, tmp_path: Path) -> None:
    marker = tmp_path / "MARKER"
    payload = torch_bytes({"0.weight": CreatesFileWhenUnpickled(marker)})
    archive = rewrite(healthy_archive, tmp_path / "legacy.pt2", add={"data/weights/model.pt": payload})
    refused_in_process(archive, "io.open", "data/weights/model.pt")
    assert not marker.exists()


def test_torch_2_7_layout_fallback_pickles_are_refused(healthy_archive: Path, tmp_path: Path) -> None:
    # torch.export.load falls back to this layout when the PT2 reader fails (here: a top-level file first)
    marker = tmp_path / "MARKER"
    archive = tmp_path / "old_layout.pt2"
    with zipfile.ZipFile(archive, "w") as handle:
        handle.writestr("version", "8.20")
        handle.writestr("serialized_exported_program.json", member(healthy_archive, "models/model.json"))
        handle.writestr("serialized_state_dict.pt", torch_bytes({}))
        handle.writestr("serialized_constants.pt", torch_bytes({"c": CreatesFileWhenUnpickled(marker)}))
        handle.writestr("serialized_example_inputs.pt", torch_bytes(((torch.randn(3, 4),), {})))
        handle.writestr("x/archive_format", "pt2")
    refused_in_process(archive, "io.open", "serialized_constants.pt")
    assert not marker.exists()


def test_shape_expression_holding_python_code_is_refused(healthy_archive: Path, tmp_path: Path) -> None:
    # the deserializer hands expr_str to sympy.sympify, which evaluates it with eval()
    marker = tmp_path / "MARKER"
    program = json.loads(member(healthy_archive, "models/model.json"))
    code = f"__import__('pathlib').Path({str(marker)!r}).touch() or s0"
    program["graph_module"]["graph"]["tensor_values"]["input"]["sizes"][0] = {
        "as_expr": {"expr_str": code, "hint": {"as_int": 3}}
    }
    archive = rewrite(healthy_archive, tmp_path / "shape.pt2", {"models/model.json": json.dumps(program).encode()})
    refused_in_process(archive, "Python code in a shape expression", "__import__")
    assert not marker.exists()


def test_compiled_aotinductor_code_is_refused(healthy_archive: Path, tmp_path: Path) -> None:
    archive = rewrite(healthy_archive, tmp_path / "aoti.pt2", add={"data/aotinductor/model/model.so": b"\x7fELF"})
    refused_in_process(archive, "AOTInductor compiled code")


def test_tensor_subclass_weight_written_by_torch_needs_trust_and_names_its_class(tmp_path: Path) -> None:
    # torch itself writes a tensor-subclass parameter with use_pickle: true
    from torch.testing._internal.two_tensor import TwoTensor

    layer = nn.Linear(4, 3)
    weight = layer.weight.detach()
    layer.weight = nn.Parameter(TwoTensor(weight.clone(), weight.clone()))  # type: ignore[no-untyped-call]
    model = nn.Sequential(layer)
    archive = export(model, tmp_path / "subclass.pt2", (torch.randn(2, 4),))
    assert json.loads(member(archive, "data/weights/model_weights_config.json"))["config"]["0.weight"]["use_pickle"]
    error = refused_in_process(archive, "torch.testing._internal.two_tensor.TwoTensor", "'0.weight'")
    assert error.unsafe_globals == ["torch.testing._internal.two_tensor.TwoTensor"]


def test_graph_node_calling_a_python_function_never_runs(healthy_archive: Path, tmp_path: Path) -> None:
    # torch's verifier refuses a call_function target that is not an operator, before anything runs
    marker = tmp_path / "MARKER"
    program = json.loads(member(healthy_archive, "models/model.json"))
    command = {"name": "command", "arg": {"as_string": f"touch {shlex.quote(str(marker))}"}, "kind": 1}
    node = {"target": "torch.os.system", "inputs": [command], "outputs": [], "metadata": {}, "name": "call"}
    program["graph_module"]["graph"]["nodes"].insert(0, node)
    archive = rewrite(healthy_archive, tmp_path / "call.pt2", {"models/model.json": json.dumps(program).encode()})
    with pytest.raises(CheckpointError) as caught:
        loaded = load_exported(archive, trust=False)
        loaded.module(torch.randn(3, 4))
    assert "could not load" in str(caught.value) and "\n" not in str(caught.value)
    assert not marker.exists()


def test_unsupported_archive_version_is_a_one_line_error(healthy_archive: Path, tmp_path: Path) -> None:
    archive = rewrite(healthy_archive, tmp_path / "future.pt2", {"archive_version": b"7"})
    with pytest.raises(CheckpointError, match="version '7'") as caught:
        load_exported(archive, trust=False)
    assert not isinstance(caught.value, UntrustedCheckpointError)
    assert "\n" not in str(caught.value)
