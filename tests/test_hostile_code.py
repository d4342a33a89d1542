"""Code that a checkpoint or a configuration file brings runs only with ``--trust`` (issue 16, section 1).

Every hostile input is built here, at test time: a TorchScript module whose ``__setstate__`` maps a file
with ``torch.from_file(path, shared=True)`` and ``copy_``s into it (it writes the file while loading), a
TorchScript module calling a library's operator, TorchScript sources and pickles rewritten the way an
attacker would, a ``.pt2`` whose graph maps and writes a file, and a ``pyproject.toml`` naming a model
file that creates a marker when imported. Hostile payloads that could run go through a real subprocess
(``real=True``); every refusal is proven by the target file being unchanged or absent. Healthy scripted,
traced and exported models (Linear, Conv, BatchNorm, LSTM/GRU, Transformer layers, hooks, ``no_grad``,
``fork``, a traced Hugging Face BERT) must still load without ``--trust``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
from torch import nn

from cli_support import assert_one_line_error, run_cli, show
from gradcheck_cli.load.exported_scan import scan_archive as scan_pt2
from gradcheck_cli.load.exported_scan import target_problem
from gradcheck_cli.load.op_policy import operator_problem
from gradcheck_cli.load.script_scan import loaded_problems
from gradcheck_cli.load.script_scan import scan_archive as scan_script

ORIGINAL = b"original"
"""What the file a hostile checkpoint targets holds before the run (8 bytes: the size it maps)."""
WRITTEN = b"AAAAAAAA"


# --------------------------------------------------------------------------- models


class Evil(nn.Module):
    """A linear layer whose ``__setstate__`` writes ``AAAAAAAA`` into the file named in its state."""

    def __init__(self, target: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.weight = nn.Parameter(torch.randn(2, 4))
        self.target = target
        self.marker = torch.zeros(8, dtype=torch.uint8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight)

    @torch.jit.export
    def __getstate__(self) -> tuple[torch.Tensor, bool, str]:
        return (self.weight, self.training, self.target)

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, bool, str]) -> None:
        mapped = torch.from_file(state[2], shared=True, size=8, dtype=torch.uint8)
        self.marker = mapped.copy_(torch.full([8], 65, dtype=torch.uint8))
        self.weight = state[0]
        self.training = state[1]
        self.target = state[2]


class StatefulLinear(nn.Module):
    """A benign ``__getstate__``/``__setstate__`` pair that only moves tensors and flags."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.weight = nn.Parameter(torch.randn(2, 4))
        self.bias = nn.Parameter(torch.zeros(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(torch.tanh(x), self.weight, self.bias)

    @torch.jit.export
    def __getstate__(self) -> tuple[torch.Tensor, torch.Tensor, bool]:
        return (self.weight, self.bias, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, torch.Tensor, bool]) -> None:
        self.weight = state[0]
        self.bias = state[1]
        self.training = state[2]


class CallsLibraryOp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.ops.gradcheck_hostile.touch(x))


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(torch.relu(self.bn(self.conv(x))).mean((2, 3))))


class Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(4, 6, batch_first=True)
        self.gru = nn.GRU(6, 5, batch_first=True)
        self.head = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        out, _ = self.gru(out)
        return self.head(out[:, -1])


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.1, batch_first=True)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(x).mean(1))


class Output(NamedTuple):
    y: torch.Tensor
    n: int


def helper(x: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(x)


class Features(nn.Module):
    """TorchScript features real code uses: no_grad, fork/wait, string formatting, asserts, a named tuple."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.names = ["a", "b"]
        self.register_buffer("ema", torch.zeros(4))

    def forward(self, x: torch.Tensor) -> Output:
        with torch.no_grad():
            self.ema.mul_(0.9).add_(x.mean(0) * 0.1)
        future = torch.jit.fork(helper, x)
        y = self.fc(torch.jit.wait(future))
        words = "n={}".format(x.shape[0]).upper().split("=")  # noqa: UP032 (str.format in TorchScript)
        assert y.dim() == 2, "a batch of vectors"
        for i, _ in enumerate(self.names):
            y = y + float(i)
        return Output(y, len(words))


def hook(module: nn.Module, inputs: tuple[torch.Tensor], output: torch.Tensor) -> torch.Tensor:
    return output * 2


def with_hook() -> nn.Module:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    model.register_forward_hook(hook)
    return model


def scripted(model: nn.Module, path: Path) -> Path:
    torch.jit.script(model).save(str(path))
    return path


def traced(model: nn.Module, example: torch.Tensor, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(model.eval(), example, check_trace=False).save(str(path))
    return path


def rewritten(src: Path, dst: Path, edit: Callable[[str, bytes], bytes]) -> Path:
    """Copy the zip archive ``src`` to ``dst``, passing each member's name and bytes through ``edit``."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, edit(info.filename, zin.read(info)))
    return dst


# --------------------------------------------------------------------------- TorchScript: the setstate attack


@pytest.fixture(scope="module")
def evil_script(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    work = tmp_path_factory.mktemp("evil_script")
    scripted(Evil(str(work / "target.bin")), work / "evil.pt")
    yield work


def test_torchscript_setstate_that_writes_a_file_is_refused_without_trust(evil_script: Path) -> None:
    target = evil_script / "target.bin"
    target.write_bytes(ORIGINAL)
    proc = run_cli(["inspect", "evil.pt", "--input-shape", "3,4"], cwd=evil_script, real=True)
    assert_one_line_error(
        proc, "evil.pt", "calls torch.from_file in __setstate__ of __torch__.test_hostile_code.Evil", "--trust"
    )
    assert target.read_bytes() == ORIGINAL, "the refused archive's code ran"


def test_torchscript_setstate_that_writes_a_file_creates_nothing_without_trust(evil_script: Path) -> None:
    target = evil_script / "target.bin"
    target.unlink(missing_ok=True)
    proc = run_cli(["inspect", "evil.pt", "--input-shape", "3,4"], cwd=evil_script, real=True)
    assert_one_line_error(proc, "evil.pt", "__setstate__", "--trust")
    assert not target.exists(), "the refused archive's code ran"


def test_torchscript_with_trust_loads_as_before_and_its_code_runs(evil_script: Path) -> None:
    target = evil_script / "target.bin"
    target.write_bytes(ORIGINAL)
    proc = run_cli(["inspect", "evil.pt", "--input-shape", "3,4", "--trust", "-f", "json"], cwd=evil_script, real=True)
    assert proc.returncode in (0, 1), show(proc)
    report = json.loads(proc.stdout)
    assert report["run"]["checkpoint_kind"] == "torchscript"
    assert any("--trust" in note and "torch.from_file" in note for note in report["notes"]), report["notes"]
    assert target.read_bytes() == WRITTEN, "the hostile input is real: trusted, it writes the file"


# --------------------------------------------------------------------------- TorchScript: other code


@pytest.fixture(scope="module")
def library_op() -> Iterator[None]:
    """A custom operator ``gradcheck_hostile::touch``, registered in this process as a library would."""
    library = torch.library.Library("gradcheck_hostile", "DEF")
    library.define("touch(Tensor x) -> Tensor")
    library.impl("touch", lambda x: x.clone(), "CompositeExplicitAutograd")
    yield
    library._destroy()


def test_torchscript_calling_a_library_operator_is_refused_even_when_the_library_is_loaded(
    tmp_path: Path, library_op: None
) -> None:
    scripted(CallsLibraryOp(), tmp_path / "custom_op.pt")
    proc = run_cli(["inspect", "custom_op.pt", "--input-shape", "3,4"], cwd=tmp_path)
    assert_one_line_error(
        proc, "custom_op.pt", "calls ops.gradcheck_hostile.touch", "custom or library operator", "--trust"
    )


def test_compiled_graphs_are_checked_after_loading_too(tmp_path: Path, library_op: None) -> None:
    # what runs is the compiled graph: it is checked with the same allow-list, whatever the source said
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = torch.jit.load(str(scripted(CallsLibraryOp(), tmp_path / "custom_op.pt")))
    found = [f.what for f in loaded_problems(module)]
    assert found == [
        "calls gradcheck_hostile::touch (a custom or library operator, namespace gradcheck_hostile) "
        "in forward of __torch__.test_hostile_code.CallsLibraryOp"
    ]


@pytest.fixture(scope="module")
def linear_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """nn.Linear scripted in a fresh interpreter: in this one, an earlier test may have compiled a Linear of
    another shape, and TorchScript would then mangle the class name (``___torch_mangle_N``) that the edits
    below and their expected messages spell out."""
    path = tmp_path_factory.mktemp("linear") / "linear.pt"
    code = f"import torch; torch.jit.script(torch.nn.Linear(4, 2)).save({str(path)!r})"
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=120)
    return path


FORWARD = "    return torch.linear(input, weight, bias)"
SETSTATE = (
    "\n  def __setstate__(self: __torch__.torch.nn.modules.linear.Linear,\n"
    "    state: Tuple[Tensor, Tensor, bool]) -> NoneType:\n"
)
SOURCE_EDITS = {
    "print": ("    print(input)\n" + FORWARD, "calls print in forward of __torch__.torch.nn.modules.linear.Linear"),
    "prim_print": ("    ops.prim.Print(input)\n" + FORWARD, "calls ops.prim.Print (not a pure prim operator)"),
    "library_op": (
        "    _0 = ops.mylib.touch(input)\n" + FORWARD,
        "calls ops.mylib.touch (a custom or library operator",
    ),
    "from_file": (
        '    _0 = torch.from_file("x", True, 8)\n' + FORWARD,
        "calls torch.from_file (its schema takes filename",
    ),
    "save": ('    torch.save(input, "x")\n' + FORWARD, "calls torch.save (its schema takes filename"),
    "method": ("    _0 = (input).set_(weight)\n" + FORWARD, "calls the method set_ (its schema"),
    "getattr": ('    _0 = getattr(input, "set_")\n' + FORWARD, "calls the method set_"),
    "computed_getattr": ("    _0 = getattr(input, input)\n" + FORWARD, "reads an attribute whose name is computed"),
    "alias_ops": ("    _0 = ops\n    _1 = _0.mylib.touch(input)\n" + FORWARD, "refers to ops in forward"),
    "torch_ops": ("    _0 = torch.ops.mylib.touch(input)\n" + FORWARD, "refers to torch.ops.mylib.touch"),
    "os": ('    _0 = os.system("x")\n' + FORWARD, "refers to os.system"),
    "import": ("    import os\n" + FORWARD, "uses Python's Import"),
    "setstate_call": (
        FORWARD + SETSTATE + "    _0 = (self).forward((state)[0], )\n    return None",
        "calls self.forward",
    ),
    "setstate_op": (FORWARD + SETSTATE + "    self.weight = torch.neg((state)[0])\n    return None", "calls torch.neg"),
    "setstate_in_text": ('    _0 = "__setstate__"\n' + FORWARD, "mentions __setstate__"),
    "custom_class": (
        FORWARD + "\n  def f(self, x: __torch__.torch.classes.c10d.Store) -> int:\n    return 0",
        "custom C++",
    ),
    "unreadable": (FORWARD + "\n  def broken(:\n", "has code gradcheck cannot read"),
    "deep": ("    _0 = " + " + ".join(["input"] * 600) + "\n" + FORWARD, "has code nested too deeply"),
}


@pytest.mark.parametrize("case", sorted(SOURCE_EDITS))
def test_torchscript_source_beyond_tensor_operations_is_found_before_loading(
    linear_archive: Path, tmp_path: Path, case: str
) -> None:
    replacement, needle = SOURCE_EDITS[case]

    def edit(name: str, data: bytes) -> bytes:
        if not name.endswith("linear.py"):
            return data
        assert FORWARD in data.decode(), data.decode()  # the edit must change the code it means to
        return data.decode().replace(FORWARD, replacement).encode()

    found = scan_script(rewritten(linear_archive, tmp_path / f"{case}.pt", edit))
    assert any(needle in f.what for f in found), [f.what for f in found]


def test_torchscript_setstate_that_only_assigns_from_the_state_passes(linear_archive: Path, tmp_path: Path) -> None:
    body = "    self.weight = (state)[0]\n    _0, _1, _2 = state\n    self.bias = _1\n"
    body += "    self.training = unchecked_cast(bool, _2)\n    return None"

    def edit(name: str, data: bytes) -> bytes:
        return (
            data.decode().replace(FORWARD, FORWARD + SETSTATE + body).encode() if name.endswith("linear.py") else data
        )

    assert scan_script(rewritten(linear_archive, tmp_path / "assigns.pt", edit)) == []


@pytest.mark.parametrize(
    ("pickle_bytes", "needle"),
    [
        (b"cos\nsystem\n(S'echo hi'\ntR.", "names os.system in its pickle"),
        (b"c__torch__.torch.classes.c10d\nFileStore\n(tR.", "names __torch__.torch.classes.c10d.FileStore"),
        (b"ctorch.distributed.rpc\nrref\n(tR.", "names torch.distributed.rpc.rref"),
        (b"\x80\x04\x8c\x02os\x8c\x06system\x93.", "imports through STACK_GLOBAL"),
    ],
)
def test_torchscript_pickles_may_name_only_what_the_torchscript_unpickler_rebuilds(
    linear_archive: Path, tmp_path: Path, pickle_bytes: bytes, needle: str
) -> None:
    def edit(name: str, data: bytes) -> bytes:
        return pickle_bytes if name.endswith("/data.pkl") else data

    found = scan_script(rewritten(linear_archive, tmp_path / "pickle.pt", edit))
    assert any(needle in f.what for f in found), [f.what for f in found]


def test_torchscript_pickle_naming_code_is_refused_on_the_command_line(linear_archive: Path, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    payload = f"cbuiltins\nopen\n(S'{marker}'\nS'w'\ntR.".encode()
    rewritten(
        linear_archive, tmp_path / "pickled.pt", lambda name, data: payload if name.endswith("data.pkl") else data
    )
    proc = run_cli(["inspect", "pickled.pt", "--input-shape", "3,4"], cwd=tmp_path, real=True)
    assert_one_line_error(proc, "pickled.pt", "names builtins.open in its pickle", "--trust")
    assert not marker.exists()


# --------------------------------------------------------------------------- TorchScript: healthy models load


def healthy_archives(work: Path) -> dict[str, Path]:
    """Scripted and traced archives of real layers, written into ``work``."""
    torch.manual_seed(0)
    image, sequence = torch.randn(2, 3, 8, 8), torch.randn(2, 5, 4)
    return {
        "script_mlp": scripted(
            nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.LayerNorm(8), nn.Linear(8, 2)), work / "a.pt"
        ),
        "script_conv": scripted(ConvNet(), work / "b.pt"),
        "script_rnn": scripted(Recurrent(), work / "c.pt"),
        "script_encoder": scripted(Encoder(), work / "d.pt"),
        "script_transformer": scripted(nn.Transformer(8, 2, 1, 1, 16), work / "e.pt"),
        "script_attention": scripted(nn.MultiheadAttention(8, 2), work / "f.pt"),
        "script_embedding": scripted(nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 2)), work / "g.pt"),
        "script_features": scripted(Features(), work / "h.pt"),
        "script_hook": scripted(with_hook(), work / "i.pt"),
        "script_stateful": scripted(StatefulLinear(), work / "j.pt"),
        "trace_conv": traced(ConvNet(), image, work / "k.pt"),
        "trace_rnn": traced(Recurrent(), sequence, work / "l.pt"),
        "trace_encoder": traced(Encoder(), torch.randn(2, 3, 8), work / "m.pt"),
    }


@pytest.fixture(scope="module")
def healthy(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return healthy_archives(tmp_path_factory.mktemp("healthy_script"))


def test_healthy_scripted_and_traced_models_pass_both_checks(healthy: dict[str, Path]) -> None:
    for name, path in healthy.items():
        assert scan_script(path) == [], name
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = torch.jit.load(str(path))
        assert loaded_problems(module) == [], name


def test_traced_hugging_face_bert_passes_both_checks(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, torchscript=True,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(model, (torch.randint(0, 50, (2, 8)),), strict=False).save(str(tmp_path / "bert.pt"))
        module = torch.jit.load(str(tmp_path / "bert.pt"))
    assert scan_script(tmp_path / "bert.pt") == []
    assert loaded_problems(module) == []


@pytest.mark.parametrize(
    ("name", "shape"),
    [("script_conv", "2,3,8,8"), ("script_rnn", "2,5,4"), ("script_encoder", "2,3,8"), ("script_stateful", "3,4"),
     ("trace_rnn", "2,5,4")],
)  # fmt: skip
def test_healthy_torchscript_loads_without_trust_on_the_command_line(
    healthy: dict[str, Path], name: str, shape: str
) -> None:
    path = healthy[name]
    proc = run_cli(["inspect", path.name, "--input-shape", shape, "-f", "json"], cwd=path.parent)
    assert proc.returncode in (0, 1), show(proc)
    report = json.loads(proc.stdout)
    assert report["run"]["checkpoint_kind"] == "torchscript"
    assert not any("--trust" in note for note in report["notes"])


# --------------------------------------------------------------------------- torch.export: graph operators


def exported_mlp(path: Path) -> Path:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    torch.export.save(torch.export.export(model, (torch.randn(3, 4),)), path)
    return path


def _argument(name: str, value: Mapping[str, Any], kind: int = 1) -> dict[str, Any]:
    return {"name": name, "arg": value, "kind": kind}


def _node(target: str, inputs: list[dict[str, Any]], output: str) -> dict[str, Any]:
    return {
        "target": target, "inputs": inputs, "outputs": [{"as_tensor": {"name": output}}], "metadata": {},
        "is_hop_single_tensor_return": None, "name": output,
    }  # fmt: skip


def with_nodes(src: Path, dst: Path, nodes: list[dict[str, Any]]) -> Path:
    """``src`` with ``nodes`` put first in its program's graph (an attacker's edit of ``models/model.json``)."""
    uint8 = {
        "dtype": 1, "sizes": [{"as_int": 8}], "requires_grad": False, "device": {"type": "cpu", "index": None},
        "strides": [{"as_int": 1}], "storage_offset": {"as_int": 0}, "layout": 7,
    }  # fmt: skip

    def edit(name: str, data: bytes) -> bytes:
        if not name.endswith("models/model.json"):
            return data
        program = json.loads(data)
        graph = program["graph_module"]["graph"]
        graph["nodes"] = nodes + graph["nodes"]
        graph["tensor_values"].update({n["name"]: uint8 for n in nodes})
        return json.dumps(program).encode()

    return rewritten(src, dst, edit)


def writes_file(target: Path) -> list[dict[str, Any]]:
    """``mapped = aten.from_file(target, shared=True, size=8); aten.copy_(mapped, full([8], 65))``."""
    uint8 = _argument("dtype", {"as_scalar_type": 1}, kind=2)
    mapped = [
        _argument("filename", {"as_string": str(target)}),
        _argument("shared", {"as_bool": True}),
        _argument("size", {"as_int": 8}),
        uint8,
    ]
    payload = [_argument("size", {"as_ints": [8]}), _argument("fill_value", {"as_int": 65}), uint8]
    written = [
        _argument("self", {"as_tensor": {"name": "mapped"}}),
        _argument("src", {"as_tensor": {"name": "payload"}}),
    ]
    return [
        _node("torch.ops.aten.from_file.default", mapped, "mapped"),
        _node("torch.ops.aten.full.default", payload, "payload"),
        _node("torch.ops.aten.copy_.default", written, "written"),
    ]


@pytest.fixture(scope="module")
def hostile_pt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("hostile_pt2")
    with_nodes(exported_mlp(work / "mlp.pt2"), work / "hostile.pt2", writes_file(work / "target.bin"))
    return work


def test_pt2_graph_that_writes_a_file_is_refused_without_trust(hostile_pt2: Path) -> None:
    target = hostile_pt2 / "target.bin"
    target.unlink(missing_ok=True)
    proc = run_cli(["inspect", "hostile.pt2"], cwd=hostile_pt2, real=True)
    assert_one_line_error(
        proc, "hostile.pt2", "node 'mapped'", "calls torch.ops.aten.from_file.default", "filename", "--trust"
    )
    assert not target.exists(), "the refused program ran"


def test_pt2_graph_that_writes_a_file_runs_only_with_trust(hostile_pt2: Path) -> None:
    target = hostile_pt2 / "target.bin"
    target.write_bytes(ORIGINAL)
    proc = run_cli(["inspect", "hostile.pt2", "--trust", "-f", "json"], cwd=hostile_pt2, real=True)
    assert proc.returncode in (0, 1), show(proc)
    notes = json.loads(proc.stdout)["notes"]
    assert any("--trust" in note and "aten.from_file" in note for note in notes), notes
    assert target.read_bytes() == WRITTEN, "the hostile input is real: trusted, it writes the file"


def test_pt2_graph_calling_a_library_operator_is_refused(tmp_path: Path) -> None:
    node = _node("torch.ops.mylib.touch.default", [_argument("x", {"as_tensor": {"name": "input"}})], "touched")
    archive = with_nodes(exported_mlp(tmp_path / "mlp.pt2"), tmp_path / "library.pt2", [node])
    (found,) = scan_pt2(archive)
    assert found.what.startswith("node 'touched' of ")
    assert found.what.endswith("calls torch.ops.mylib.touch.default (a custom or library operator, namespace mylib)")


def test_healthy_pt2_still_loads_without_trust(tmp_path: Path) -> None:
    exported_mlp(tmp_path / "mlp.pt2")
    proc = run_cli(["inspect", "mlp.pt2", "-f", "json"], cwd=tmp_path)
    assert proc.returncode in (0, 1), show(proc)
    assert json.loads(proc.stdout)["run"]["checkpoint_kind"] == "exported_program"


class Branches(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            scale = x.abs().mean() + 1
        return torch.cond(x.sum() > 0, lambda t: self.fc(t).relu(), lambda t: self.fc(t).sigmoid(), (x / scale,))


@pytest.mark.parametrize(
    ("name", "model", "example"),
    [
        ("conv_train", ConvNet().train(), torch.randn(2, 3, 8, 8)),
        ("recurrent", Recurrent(), torch.randn(2, 5, 4)),
        ("encoder", Encoder(), torch.randn(2, 3, 8)),
        ("branches", Branches(), torch.randn(3, 4)),
    ],
)
def test_exported_real_models_use_only_allowed_operators(
    tmp_path: Path, name: str, model: nn.Module, example: torch.Tensor
) -> None:
    program = torch.export.export(model, (example,))
    for suffix, exported in (("", program), ("_core", program.run_decompositions())):
        torch.export.save(exported, tmp_path / f"{name}{suffix}.pt2")
        assert scan_pt2(tmp_path / f"{name}{suffix}.pt2") == [], suffix


@pytest.mark.parametrize(
    ("target", "allowed"),
    [
        ("torch.ops.aten.linear.default", True),
        ("torch.ops.aten.add.Tensor", True),
        ("torch.ops.aten.copy_.default", True),
        ("torch.ops.aten.sym_size.int", True),
        ("torch.ops.higher_order.cond", True),
        ("torch.ops.higher_order.wrap_with_set_grad_enabled", True),
        ("_operator.mul", True),
        ("torch.sym_max", True),
        ("torch.ops.aten.from_file.default", False),
        ("torch.ops.aten.save.default", False),
        ("torch.ops.aten.set_.source_Storage", False),
        ("torch.ops.aten.linear", False),
        ("torch.ops.higher_order.triton_kernel_wrapper_mutation", False),
        ("torch.ops.higher_order.call_torchbind", False),
        ("torch.ops.prims.sin.default", False),
        ("torch.ops.profiler._record_function_enter.default", False),
        ("torch._ops.ops.aten.from_file.default", False),
        ("torch._higher_order_ops.triton_kernel_wrap.triton_kernel_wrapper_mutation", False),
        ("#custom:op", False),
    ],
)
def test_pt2_targets_are_judged_by_an_allow_list(target: str, allowed: bool) -> None:
    assert (target_problem(target) is None) is allowed, target_problem(target)


@pytest.mark.parametrize("target", ["torch.load", "torch.os.system", "builtins.exec", "math.floor"])
def test_pt2_targets_that_name_no_operator_are_left_to_torch_which_refuses_them(target: str) -> None:
    # torch's deserializer raises "Unsupported target type for node" for these before the program exists
    # (tests/test_exported.py::test_graph_node_calling_a_python_function_never_runs runs one)
    assert target_problem(target) is None


def test_aten_operators_are_allowed_by_their_schema_not_their_name() -> None:
    assert operator_problem("aten::from_file") == "its schema takes filename: str"
    assert operator_problem("aten::save") == "its schema takes filename: str"
    assert operator_problem("aten::_print") == "it writes outside the program"
    assert operator_problem("aten::conv2d") is None, "padding='same' is an option, not a path"
    assert operator_problem("aten::gelu") is None
    assert operator_problem("aten::einsum") is None
    assert operator_problem("prim::Print") == "not a pure prim operator"
    assert operator_problem("prim::PythonOp") == "not a pure prim operator"
    assert operator_problem("quantized::linear") == "a custom or library operator, namespace quantized"


# --------------------------------------------------------------------------- configuration that names code


EVIL_FACTORY = """
from pathlib import Path

from torch import nn

Path(__file__).with_name("imported.marker").write_text("the configured model file was imported")


def build():
    Path(__file__).with_name("imported.marker").write_text("the configured model code ran")
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
"""
GOOD_FACTORY = """
from torch import nn


def build():
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
"""


@pytest.fixture()
def cloned_repository(tmp_path: Path) -> Path:
    """A directory as a cloned repository leaves it: a pyproject naming a model file, and weights."""
    (tmp_path / "pyproject.toml").write_text('[tool.gradcheck]\nmodel = "evil.py:build"\n')
    (tmp_path / "evil.py").write_text(EVIL_FACTORY)
    (tmp_path / "mine.py").write_text(GOOD_FACTORY)
    torch.manual_seed(0)
    torch.save(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).state_dict(), tmp_path / "weights.pt")
    return tmp_path


def test_configured_model_is_refused_without_trust_or_model(cloned_repository: Path) -> None:
    proc = run_cli(["inspect", "weights.pt", "--input-shape", "3,4"], cwd=cloned_repository, real=True)
    assert_one_line_error(
        proc, str(cloned_repository / "pyproject.toml"), "model = 'evil.py:build'", "--trust", "--model"
    )
    assert not (cloned_repository / "imported.marker").exists(), "the configured file was imported"


def test_model_named_on_the_command_line_replaces_the_configured_one(cloned_repository: Path) -> None:
    proc = run_cli(
        ["inspect", "weights.pt", "--model", "mine.py:build", "--input-shape", "3,4", "-f", "json"],
        cwd=cloned_repository, real=True,
    )  # fmt: skip
    assert proc.returncode in (0, 1), show(proc)
    assert not (cloned_repository / "imported.marker").exists(), "the configured file was imported"
    assert not any("pyproject.toml" in note for note in json.loads(proc.stdout)["notes"])


def test_configured_model_runs_with_trust_and_the_report_names_its_file(cloned_repository: Path) -> None:
    proc = run_cli(
        ["inspect", "weights.pt", "--trust", "--input-shape", "3,4", "-f", "json"], cwd=cloned_repository, real=True
    )
    assert proc.returncode in (0, 1), show(proc)
    assert (cloned_repository / "imported.marker").exists()
    notes = json.loads(proc.stdout)["notes"]
    assert any(str(cloned_repository / "pyproject.toml") in n and "evil.py:build" in n for n in notes), notes


def test_configured_model_from_a_parent_directory_is_refused_too(cloned_repository: Path) -> None:
    (cloned_repository / "sub").mkdir()
    proc = run_cli(["inspect", "../weights.pt", "--input-shape", "3,4"], cwd=cloned_repository / "sub")
    assert_one_line_error(proc, "pyproject.toml", "evil.py:build", "--trust")
    assert not (cloned_repository / "imported.marker").exists()
