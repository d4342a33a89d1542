"""Helpers for end-to-end tests that run the real ``gradcheck`` command line.

``run_cli`` runs ``gradcheck_cli.cli.app.main`` in this process by default, with the argv, working directory,
environment, standard streams and warning filters a subprocess would have, and puts back afterwards every
module, import path, RNG state and environment variable the run touched: a subprocess would only add the 2 s
of interpreter and torch start-up. ``real=True`` (and any run that needs interpreter flags or ``--distributed``,
which ends the process) starts the console script as a user does; the tests that prove the entry point use it.
``GRADCHECK_TEST_SUBPROCESS=1`` runs every CLI test in subprocesses.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import random
import shlex
import subprocess
import sys
import warnings
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


def run_cli(
    args: Sequence[Any],
    *,
    cwd: Path,
    python_flags: Sequence[str] = (),
    real: bool = False,
    env: Mapping[str, str] | None = None,
) -> Proc:
    """``python [flags] -m gradcheck_cli ARGS`` in ``cwd``, the way a user runs it (see the module docstring);
    ``env`` adds environment variables to the test environment."""
    argv = [str(arg) for arg in args]
    environment = {**CLI_ENV, **(env or {})}
    needs_process = python_flags or any(a == "--distributed" or a.startswith("--distributed=") for a in argv)
    if real or needs_process or os.environ.get("GRADCHECK_TEST_SUBPROCESS") == "1":
        return subprocess.run(
            [sys.executable, *python_flags, "-m", "gradcheck_cli", *argv],
            capture_output=True,
            text=True,
            cwd=cwd,
            env=environment,
            timeout=CLI_TIMEOUT_S,
        )
    return _run_in_process(argv, cwd, environment)


def _run_in_process(argv: list[str], cwd: Path, environment: Mapping[str, str]) -> Proc:
    from gradcheck_cli.cli.app import main

    stdout, stderr = _stream(), _stream()
    code = 0
    with (
        _process_state_restored(cwd, environment),
        contextlib.redirect_stdout(stdout),
        contextlib.redirect_stderr(stderr),
    ):
        sys.argv = [str(Path(sys.executable).parent / "gradcheck"), *argv]
        try:
            main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    args = [sys.executable, "-m", "gradcheck_cli", *argv]
    return subprocess.CompletedProcess(args, code, _text(stdout), _text(stderr))


def _stream() -> io.TextIOWrapper:
    """A text stream with a binary buffer underneath, as a pipe's ``sys.stdout`` has."""
    return io.TextIOWrapper(io.BytesIO(), encoding="utf-8", write_through=True)


def _text(stream: io.TextIOWrapper) -> str:
    stream.flush()
    buffer = stream.buffer
    assert isinstance(buffer, io.BytesIO)
    return buffer.getvalue().decode("utf-8").replace("\r\n", "\n")


@contextlib.contextmanager
def _process_state_restored(cwd: Path, environment: Mapping[str, str]) -> Any:
    """The process a fresh ``gradcheck`` would start in, and this test process as it was afterwards."""
    saved_argv, saved_path, saved_modules = sys.argv, list(sys.path), dict(sys.modules)
    saved_environ, saved_cwd = dict(os.environ), os.getcwd()
    saved_rng = (torch.get_rng_state(), random.getstate())
    os.environ.clear()
    os.environ.update({k: v for k, v in environment.items() if k != "PYTHONPATH"})
    os.chdir(cwd)
    try:
        with warnings.catch_warnings():
            warnings.resetwarnings()  # the interpreter's own defaults, not pytest's
            for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.simplefilter("ignore", category)
            warnings.showwarning = warnings._showwarning_orig  # type: ignore[attr-defined]
            warnings._showwarnmsg_impl = _show_on_stderr  # type: ignore[attr-defined]  # not pytest's recorder
            yield
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_environ)
        sys.argv, sys.path[:] = saved_argv, saved_path
        for name in set(sys.modules) - set(saved_modules):
            if _user_module(sys.modules[name]):
                del sys.modules[name]  # a user's nets.py of one test must not answer for another's
        torch.set_rng_state(saved_rng[0])
        random.setstate(saved_rng[1])


def _show_on_stderr(message: warnings.WarningMessage) -> None:
    """What the interpreter does with a warning: its formatted text on (the redirected) standard error."""
    sys.stderr.write(warnings._formatwarnmsg(message))  # type: ignore[attr-defined]


_INSTALLED = tuple({str(Path(p).resolve()) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)})
_PACKAGE = str(Path(__import__("gradcheck_cli").__file__).resolve().parent)


def _user_module(module: Any) -> bool:
    """A module the run imported from the user's files (not the interpreter, site-packages or gradcheck)."""
    file = getattr(module, "__file__", None)
    if not file:
        return False
    where = str(Path(file).resolve())
    return not where.startswith((*_INSTALLED, _PACKAGE))


def run_many(
    commands: Mapping[str, Sequence[Any]], *, cwd: Path, python_flags: Sequence[str] = (), real: bool = False
) -> dict[str, Proc]:
    """Run several CLI commands, results by name; subprocesses run one per CPU at a time."""
    if not (real or python_flags or os.environ.get("GRADCHECK_TEST_SUBPROCESS") == "1"):
        return {name: run_cli(args, cwd=cwd) for name, args in commands.items()}
    workers = max(1, min(len(commands), os.cpu_count() or 2))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {
            name: pool.submit(run_cli, args, cwd=cwd, python_flags=python_flags, real=real)
            for name, args in commands.items()
        }
        return {name: future.result() for name, future in futures.items()}


def show(proc: Proc) -> str:
    """What a failed assertion should print about a run."""
    return f"\n$ {shlex.join(proc.args)}\nexit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"


def assert_one_line_error(proc: Proc, *needles: str) -> str:
    """Exit 2, one ``error: ...`` line on stderr holding every needle, no traceback; stdout empty, or (``--format
    json``) the error document with the same message."""
    assert proc.returncode == 2, show(proc)
    assert "Traceback" not in proc.stderr, show(proc)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, show(proc)
    assert lines[0].startswith("error: "), show(proc)
    message = lines[0].removeprefix("error: ")
    if proc.stdout.startswith("{"):  # --format json: the error document (tests/test_ci_errors.py has the rest)
        document = json.loads(proc.stdout)
        assert (document["status"], document["code"], document["message"]) == ("error", 2, message), show(proc)
    elif proc.stdout:  # --format github: one workflow command
        assert proc.stdout.startswith("::error") and proc.stdout.count("\n") == 1, show(proc)
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
