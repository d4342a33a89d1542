"""Hostile and careless inputs (issue 16): nothing the user owns is overwritten, user code that exits or
raises anywhere is exit 2 in one line, names from the file cannot drive the terminal, and ``check()`` leaves
the user's tensors as it found them. Every input is built here, at test time.
"""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from cli_support import assert_one_line_error, hashes, run_cli, sha256, show
from gradcheck_cli import check
from gradcheck_cli.errors import GradcheckError
from gradcheck_cli.outputs import write_text, write_with

NETS = """
import sys
import warnings

import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, behaviour="plain"):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 4)
        self.behaviour = behaviour

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        if self.behaviour == "exit":
            sys.exit(0)
        if self.behaviour == "base_exception":
            raise BaseException("a custom BaseException")
        if self.behaviour == "interrupt":
            raise KeyboardInterrupt
        if self.behaviour == "oom":
            torch.empty(1 << 46)  # 256 TiB: the CPU allocator refuses at once
        if self.behaviour == "function":
            h = Raising.apply(h)
        if self.behaviour == "hook":
            h.register_hook(lambda g: 1 / 0)
        return self.fc2(h)


class Raising(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        raise ValueError("the custom backward failed")


def build(behaviour="plain"):
    return Net(behaviour)


def exits():
    return Net("exit")


def base_exception():
    return Net("base_exception")


def interrupt():
    return Net("interrupt")


def oom():
    return Net("oom")


def function():
    return Net("function")


def hook():
    return Net("hook")


def warns():
    warnings.warn("a warning from the factory", UserWarning)
    return Net()


def escapes():
    net = nn.Sequential()
    net.add_module("evil\\x1b[2J\\x1b]0;pwned\\x07name", nn.Linear(8, 8))
    net.add_module("tail", nn.Linear(8, 4))
    return net
"""


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("hostile")
    (folder / "nets.py").write_text(textwrap.dedent(NETS), encoding="utf-8")
    torch.manual_seed(0)
    torch.save({"fc1.weight": torch.randn(16, 8) * 0.3, "fc1.bias": torch.zeros(16),
                "fc2.weight": torch.randn(4, 16) * 0.3, "fc2.bias": torch.zeros(4)}, folder / "w.pt")  # fmt: skip
    torch.save(torch.randn(4, 8), folder / "x.pt")
    return folder


def inspect(work: Path, factory: str, *extra: str, **kwargs: object) -> object:
    return run_cli(["inspect", "w.pt", "--model", f"nets.py:{factory}", "--input", "x.pt", *extra], cwd=work, **kwargs)


# --------------------------------------------------------------------------- 2. user files are never written


def test_output_onto_a_hard_link_of_the_checkpoint_is_refused(work: Path) -> None:
    link = work / "link.pt"
    os.link(work / "w.pt", link)
    before = sha256(work / "w.pt")
    try:
        assert_one_line_error(inspect(work, "build", "-f", "json", "-o", "link.pt"), "link.pt", "input files")
        assert_one_line_error(inspect(work, "build", "--write-baseline", "link.pt"), "--write-baseline")
    finally:
        link.unlink()
    assert sha256(work / "w.pt") == before


def test_output_onto_a_symlink_of_the_batch_is_refused(work: Path) -> None:
    link = work / "batch_link.pt"
    link.symlink_to(work / "x.pt")
    before = sha256(work / "x.pt")
    try:
        assert_one_line_error(inspect(work, "build", "-f", "markdown", "-o", "batch_link.pt"), "input files")
    finally:
        link.unlink()
    assert sha256(work / "x.pt") == before


def test_step_summary_pointing_at_an_input_is_refused(work: Path) -> None:
    before = sha256(work / "x.pt")
    proc = inspect(work, "build", "-f", "github", env={"GITHUB_STEP_SUMMARY": str(work / "x.pt")})
    assert_one_line_error(proc, "$GITHUB_STEP_SUMMARY", "input files")
    assert sha256(work / "x.pt") == before


def test_output_inside_a_checkpoint_directory_is_refused(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=32)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "hf")
    before = hashes(tmp_path / "hf")
    for target in ("hf/model.safetensors", "hf/report.json", "hf/sub/report.json"):
        proc = run_cli(["inspect", "hf", "-f", "json", "-o", target], cwd=tmp_path)
        assert_one_line_error(proc, "inside the input directory")
    assert hashes(tmp_path / "hf") == before


def test_an_output_is_replaced_in_one_rename(work: Path) -> None:
    report = work / "report.json"
    report.write_text("old report\n")
    inode = report.stat().st_ino
    proc = inspect(work, "build", "-f", "json", "-o", "report.json")
    assert proc.returncode == 0, show(proc)
    assert json.loads(report.read_text())["status"] == "healthy"
    assert report.stat().st_ino != inode  # a new file renamed over the old one, not rewritten in place
    assert not [p.name for p in work.iterdir() if p.name.startswith(".report.json")]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "chart.svg"
    target.write_text("the old chart")

    def half_then_fail(path: Path) -> None:
        path.write_text("<svg half")
        raise OSError(28, "No space left on device")

    with pytest.raises(GradcheckError, match="No space left on device"):
        write_with(target, half_then_fail, "--plot")
    assert target.read_text() == "the old chart"
    assert [p.name for p in tmp_path.iterdir()] == ["chart.svg"]
    write_text(tmp_path / "new.md", "# report\n")
    assert (tmp_path / "new.md").read_text() == "# report\n"
    assert (tmp_path / "new.md").stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# --------------------------------------------------------------------------- 4. exit 2, not 0 or 3


@pytest.mark.parametrize(
    ("factory", "needles"),
    [
        ("exits", ("sys.exit(0)",)),
        ("base_exception", ("BaseException", "a custom BaseException")),
        ("oom", ("ran out of memory",)),
        ("function", ("backward pass raised ValueError", "the custom backward failed", "autograd Function")),
        ("hook", ("backward pass raised ZeroDivisionError", "tensor hook")),
    ],
)
def test_user_code_that_exits_raises_or_runs_out_of_memory_is_exit_2(
    work: Path, factory: str, needles: tuple[str, ...]
) -> None:
    line = assert_one_line_error(inspect(work, factory), *needles)
    assert "the batch is" not in line  # not blamed on the batch's shape


def test_ctrl_c_in_the_model_stays_130(work: Path) -> None:
    proc = inspect(work, "interrupt")
    assert proc.returncode == 130, show(proc)
    assert "Traceback" not in proc.stderr


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize(
    "content",
    [_nested(100_000).encode(), b'{"findings": [], "layers": [], "x": ' + b"9" * 5000 + b"}", b"\xff\xfe{"],
    ids=["deep", "huge-int", "not-utf8"],
)
def test_a_hostile_baseline_is_one_line(work: Path, content: bytes) -> None:
    (work / "base.json").write_bytes(content)
    assert_one_line_error(inspect(work, "build", "--baseline", "base.json"), "--baseline", "base.json")


def test_a_hostile_history_log_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "log.jsonl").write_text(_nested(100_000) + "\n" + "9" * 5000 + "\n")
    assert_one_line_error(run_cli(["history", "log.jsonl"], cwd=tmp_path), "log.jsonl")
    os.mkfifo(tmp_path / "fifo.jsonl")
    assert_one_line_error(run_cli(["history", "fifo.jsonl"], cwd=tmp_path), "not a regular file")


# --------------------------------------------------------------------------- 5. one clear line


def test_warnings_do_not_precede_the_error_line(work: Path) -> None:
    torch.save(torch.randn(4, 3), work / "narrow.pt")
    proc = run_cli(["inspect", "w.pt", "--model", "nets.py:warns", "--input", "narrow.pt"], cwd=work)
    assert_one_line_error(proc, "forward pass raised")


def test_warnings_of_a_run_that_finished_are_still_shown(work: Path) -> None:
    proc = inspect(work, "warns", "-f", "json")
    assert proc.returncode == 0, show(proc)
    assert "a warning from the factory" in proc.stderr


@pytest.mark.parametrize("fmt", ["text", "markdown", "github", "junit", "sarif", "html"])
def test_names_from_the_file_cannot_drive_the_terminal(tmp_path: Path, fmt: str) -> None:
    (tmp_path / "nets.py").write_text(textwrap.dedent(NETS), encoding="utf-8")
    torch.save(torch.randn(4, 8), tmp_path / "x.pt")
    net = nn.Sequential()
    net.add_module("evil\x1b[2J\x1b]0;pwned\x07name", nn.Linear(8, 8))
    net.add_module("tail", nn.Linear(8, 4))
    torch.save(net.state_dict(), tmp_path / "w.pt")
    proc = run_cli(
        ["inspect", "w.pt", "--model", "nets.py:escapes", "--input", "x.pt", "-f", fmt, "--vanishing-below", "0.9"],
        cwd=tmp_path,
    )
    assert proc.returncode in (0, 1), show(proc)
    shown = proc.stdout + proc.stderr
    assert "\x1b" not in shown and "\x07" not in shown
    escaped = "evil\\\\x1b[2J" if fmt == "sarif" else "evil\\x1b[2J"  # SARIF is JSON: its backslash is escaped
    assert escaped in shown  # the name is still there, escaped visibly


# --------------------------------------------------------------------------- 6. the user's objects


def test_check_leaves_the_batch_and_plain_tensor_attributes_untouched() -> None:
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = nn.LSTM(4, 8, batch_first=True)
            self.scale = torch.ones(8, requires_grad=True)  # a plain attribute, not a Parameter

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lstm(x)[0] * self.scale

    model = Scaled()
    x = torch.randn(2, 5, 4, requires_grad=True)
    check(model, x)
    assert x.grad is None and x._backward_hooks is None
    assert model.scale.grad is None and model.scale._backward_hooks is None
    given = torch.zeros(2, 5, 4)
    x.grad = given
    check(model, (x,))
    assert x.grad is given


# --------------------------------------------------------------------------- 5. valid but unusual files


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_a_newer_pickle_protocol_is_read_tensors_only(work: Path, zip_format: bool) -> None:
    state = torch.load(work / "w.pt", weights_only=True)
    torch.save(state, work / "p4.pt", pickle_protocol=4, _use_new_zipfile_serialization=zip_format)
    proc = run_cli(["inspect", "p4.pt", "--model", "nets.py:build", "--input", "x.pt", "-f", "json"], cwd=work)
    assert proc.returncode == 0, show(proc)
    assert json.loads(proc.stdout)["status"] == "healthy"
    assert "Warning" not in proc.stderr


def test_a_newer_protocol_still_needs_trust_for_code(work: Path) -> None:
    marker = work / "ran_p4"
    torch.save({"w": _RunsCode(marker)}, work / "exec4.pt", pickle_protocol=4)
    line = assert_one_line_error(inspect_file(work, "exec4.pt"), "would import and run code", "builtins.exec")
    assert "damaged" not in line and not marker.exists()
    torch.save(nn.Sequential(nn.Linear(8, 4)), work / "module4.pt", pickle_protocol=4)
    assert_one_line_error(run_cli(["inspect", "module4.pt", "--input", "x.pt"], cwd=work), "Sequential", "--trust")
    trusted = run_cli(["inspect", "module4.pt", "--input", "x.pt", "--trust", "-f", "json"], cwd=work)
    assert trusted.returncode == 0, show(trusted)


def test_a_huge_version_record_is_one_line(work: Path) -> None:
    import zipfile

    with zipfile.ZipFile(work / "w.pt") as source, zipfile.ZipFile(work / "bigver.pt", "w") as crafted:
        for info in source.infolist():
            data = source.read(info)
            crafted.writestr(info, b"9" * 400 + b"\n" if info.filename.endswith("/version") else data)
    line = assert_one_line_error(inspect_file(work, "bigver.pt"), "bigver.pt", "version")
    assert "stoull" not in line


def inspect_file(work: Path, name: str) -> object:
    return run_cli(["inspect", name, "--model", "nets.py:build", "--input", "x.pt"], cwd=work)


def test_hostile_json_and_toml_in_every_document_gradcheck_reads_is_one_line(tmp_path: Path) -> None:
    import struct

    deep = _nested(100_000)
    header = ('{"a": ' + deep + "}").encode()
    (tmp_path / "deep.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    assert_one_line_error(
        run_cli(["inspect", "deep.safetensors", "--model", "x.py:f"], cwd=tmp_path), "deep.safetensors"
    )
    for name, text in (
        ("deep", '{"x": ' + deep + "}"),
        ("huge", '{"model_type": "gpt2", "n_layer": ' + "9" * 5000 + "}"),
    ):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(text)
        line = assert_one_line_error(run_cli(["inspect", name], cwd=tmp_path), "config.json")
        assert "set_int_max_str_digits" not in line
    for name, value in (("nested", "[" * 5000 + "]" * 5000), ("digits", "9" * 5000)):
        project = tmp_path / name
        project.mkdir()
        (project / "pyproject.toml").write_text(f"[tool.gradcheck]\nseed = {value}\n")
        assert_one_line_error(run_cli(["inspect", "--example", "relu-kaiming"], cwd=project), "pyproject.toml", "TOML")
