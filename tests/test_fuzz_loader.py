"""Property-based: random and mutated bytes never crash gradcheck (issue 3).

Each example runs the real command-line entry point in-process (``cli.main`` with patched argv):
the exit code is 2 with exactly one line on stderr and no traceback — or, when a mutation still
leaves a valid checkpoint, 0 or 1 — and nothing is created or changed next to the file.
"""

from __future__ import annotations

import io
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from gradcheck_cli.cli import app as cli


def _valid_checkpoint() -> bytes:
    torch.manual_seed(0)
    buffer = io.BytesIO()
    torch.save(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)).state_dict(), buffer)
    return buffer.getvalue()


VALID = _valid_checkpoint()
MODEL = Path(__file__).parent / "cli_models.py"


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    old = sys.argv
    sys.argv = ["gradcheck", *argv]
    try:
        with pytest.raises(SystemExit) as stopped:
            cli.main()
    finally:
        sys.argv = old
    return int(stopped.value.code or 0), capsys.readouterr().err


def check_bytes(data: bytes, capsys: pytest.CaptureFixture[str], extra: list[str]) -> int:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "checkpoint.pt"
        path.write_bytes(data)
        before = sorted(p.name for p in Path(folder).iterdir())
        code, err = run_main(["inspect", str(path), "--input-shape", "4,8", *extra], capsys)
        assert sorted(p.name for p in Path(folder).iterdir()) == before
        assert path.read_bytes() == data
    assert code in (0, 1, 2), err
    assert "Traceback" not in err
    if code == 2:
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1, err
        assert lines[0].startswith("error: ")
    return code


FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.mark.slow
@FAST
@given(data=st.binary(min_size=0, max_size=2048))
def test_random_bytes_exit_2_in_one_line(data: bytes, capsys: pytest.CaptureFixture[str]) -> None:
    assert check_bytes(data, capsys, []) == 2


@pytest.mark.slow
@FAST
@given(data=st.data())
def test_mutated_checkpoint_never_crashes(data: st.DataObject, capsys: pytest.CaptureFixture[str]) -> None:
    blob = bytearray(VALID)
    for _ in range(data.draw(st.integers(1, 8))):
        index = data.draw(st.integers(0, len(blob) - 1))
        blob[index] = data.draw(st.integers(0, 255))
    check_bytes(bytes(blob), capsys, ["--model", f"{MODEL}:make_fuzz_target"])


@pytest.mark.slow
@FAST
@given(cut=st.integers(min_value=0, max_value=len(VALID) - 1))
def test_truncated_checkpoint_exits_2(cut: int, capsys: pytest.CaptureFixture[str]) -> None:
    assert check_bytes(VALID[:cut], capsys, ["--model", f"{MODEL}:make_fuzz_target"]) == 2


def test_the_unmutated_checkpoint_is_valid(capsys: pytest.CaptureFixture[str]) -> None:
    """The control: without mutation the same bytes load and are measured."""
    assert check_bytes(VALID, capsys, ["--model", f"{MODEL}:make_fuzz_target"]) == 0
    assert zipfile.is_zipfile(io.BytesIO(VALID))
