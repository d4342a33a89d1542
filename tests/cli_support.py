"""Helpers for end-to-end tests that run the real ``gradcheck`` command line in subprocesses."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

import cli_models

TESTS_DIR = Path(__file__).resolve().parent
CLI_TIMEOUT_S = 120
REPORT_KEYS = {"schema_version", "status", "problems", "layers", "findings", "recommendations", "run", "notes"}
CHECKPOINT_SEED = 1234
"""Seed of the weights written to checkpoints; the --model factories use seed 0, so loaded weights are visible."""

Proc = subprocess.CompletedProcess  # a finished CLI run (stdout/stderr as text)


# --------------------------------------------------------------------------- helpers


def _cli_env() -> dict[str, str]:
    env = dict(os.environ)
    for name in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        env.pop(name, None)  # rich would colour the output a pipe gets
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS_DIR), os.environ.get("PYTHONPATH", "")) if p)
    return env


CLI_ENV = _cli_env()


def run_cli(args: Sequence[Any], *, cwd: Path, python_flags: Sequence[str] = ()) -> Proc:
    """``python [flags] -m gradcheck_cli ARGS`` in ``cwd``, the way a user runs it."""
    return subprocess.run(
        [sys.executable, *python_flags, "-m", "gradcheck_cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=CLI_ENV,
        timeout=CLI_TIMEOUT_S,
    )


def run_many(commands: Mapping[str, Sequence[Any]], *, cwd: Path, python_flags: Sequence[str] = ()) -> dict[str, Proc]:
    """Run several CLI commands, one per CPU at a time; results by name."""
    workers = max(1, min(len(commands), os.cpu_count() or 2))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {
            name: pool.submit(run_cli, args, cwd=cwd, python_flags=python_flags) for name, args in commands.items()
        }
        return {name: future.result() for name, future in futures.items()}


def show(proc: Proc) -> str:
    """What a failed assertion should print about a run."""
    return f"\n$ {shlex.join(proc.args)}\nexit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"


def assert_one_line_error(proc: Proc, *needles: str) -> str:
    """Exit 2, nothing on stdout, and one ``error: ...`` line on stderr holding every needle; no traceback."""
    assert proc.returncode == 2, show(proc)
    assert "Traceback" not in proc.stderr, show(proc)
    assert proc.stdout == "", show(proc)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, show(proc)
    assert lines[0].startswith("error: "), show(proc)
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in the error line{show(proc)}"
    return lines[0]


def json_report(proc: Proc, *, exit_code: int | None = 0) -> dict[str, Any]:
    """The ``--format json`` report a run printed, after checking its exit code and top-level shape.

    ``exit_code=None``: the exit code must be the one the report warrants under the default gate.
    """
    assert proc.returncode in (0, 1), show(proc)
    if exit_code is not None:
        assert proc.returncode == exit_code, show(proc)
    assert "Traceback" not in proc.stderr, show(proc)
    report = json.loads(proc.stdout)
    assert report.keys() >= REPORT_KEYS, show(proc)
    assert report["schema_version"] == 1
    assert report["status"] == ("unhealthy" if report["problems"] else "healthy")
    assert isinstance(report["layers"], list)
    assert isinstance(report["findings"], list)
    assert isinstance(report["recommendations"], list)
    if exit_code is None:
        has_error = any(f["severity"] == "error" for f in report["findings"])
        assert proc.returncode == (1 if has_error else 0), show(proc)
    return report


def assert_healthy_tiny_net(report: dict[str, Any]) -> None:
    """The report of a healthy two-layer ``TinyNet``: both layers measured, nothing wrong, no advice."""
    assert report["status"] == "healthy"
    assert report["problems"] == []
    assert [layer["name"] for layer in report["layers"]] == ["fc1", "fc2"]
    assert all(layer["grad_norm"] and layer["grad_norm"] > 0 for layer in report["layers"])
    assert not [f for f in report["findings"] if f["severity"] == "error"]
    assert report["recommendations"] == []


def layer_weight_norms(state: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """L2 norm of each layer's own parameters, the way the report's ``weight_norm`` measures it."""
    squares: dict[str, float] = {}
    for key, tensor in state.items():
        layer = key.rsplit(".", 1)[0]
        squares[layer] = squares.get(layer, 0.0) + float(tensor.double().pow(2).sum())
    return {layer: math.sqrt(total) for layer, total in squares.items()}


def assert_weights_from(report: dict[str, Any], state: Mapping[str, torch.Tensor]) -> None:
    """The probed model carried the checkpoint's weights, not the factory's fresh ones."""
    measured = {layer["name"]: layer["weight_norm"] for layer in report["layers"]}
    assert measured == pytest.approx(layer_weight_norms(state), rel=1e-5)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def hashes(root: Path) -> dict[str, str]:
    """SHA-256 of every file under ``root``, by relative path (a new file shows up as a new key)."""
    return {str(p.relative_to(root)): sha256(p) for p in sorted(root.rglob("*")) if p.is_file()}


def checkpoint_model(width: int = cli_models.WIDTH) -> cli_models.TinyNet:
    """The TinyNet whose weights the checkpoints hold (seeded apart from the factories)."""
    torch.manual_seed(CHECKPOINT_SEED)
    return cli_models.TinyNet(width)


def checkpoint_state() -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in checkpoint_model().state_dict().items()}


def batch_generator() -> torch.Generator:
    return torch.Generator().manual_seed(7)


def save_inputs(directory: Path) -> None:
    """The batch files: inputs only, (x, class indices), (x, float target), keyword dicts, a misfit."""
    g = batch_generator()
    x = torch.randn(4, cli_models.IN_FEATURES, generator=g)
    torch.save(x, directory / "x.pt")
    torch.save((x, torch.tensor([0, 1, 2, 3])), directory / "xy_index.pt")
    torch.save((x, torch.randn(4, cli_models.OUT_FEATURES, generator=g)), directory / "xy_float.pt")
    torch.save({"x": x, "mask": torch.ones_like(x)}, directory / "kwargs.pt")
    torch.save({"x": x, "mask": torch.ones_like(x), "y": torch.tensor([3, 2, 1, 0])}, directory / "kwargs_y.pt")
    torch.save(torch.randn(4, cli_models.IN_FEATURES - 3, generator=g), directory / "x_wrong_width.pt")
