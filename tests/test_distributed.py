"""gradcheck inside torch.distributed: 2 gloo ranks on CPU give the numbers of one process on the same batch.

Each test starts the ranks as torchrun does (one process per rank with RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT set), so every rank's exit code and stderr are visible; a test that hangs fails by timeout.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from cli_support import CLI_ENV, TESTS_DIR

WORLD = 2
RANK_TIMEOUT_S = 120
WORKER = TESTS_DIR / "dist_worker.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(command: Sequence[Any], cwd: Path, world: int = WORLD) -> list[subprocess.CompletedProcess[str]]:
    """Run ``python COMMAND`` once per rank, as torchrun would, and wait for all of them."""
    port = str(_free_port())
    procs = []
    for rank in range(world):
        env = {
            **CLI_ENV,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "OMP_NUM_THREADS": "1",
        }
        command_line = [sys.executable, *map(str, command)]
        pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
        procs.append(subprocess.Popen(command_line, cwd=cwd, env=env, text=True, **pipes))
    done = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=RANK_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            pytest.fail(f"a rank hung for more than {RANK_TIMEOUT_S} s")
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return done


def single(task: str, tmp_path: Path) -> Any:
    out = tmp_path / f"single-{task}.json"
    proc = subprocess.run(
        [sys.executable, WORKER, "single", task, out], env=CLI_ENV, text=True, capture_output=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(out.read_text())


def sharded(mode: str, task: str, tmp_path: Path) -> Any:
    out = tmp_path / f"{mode}-{task}.json"
    procs = launch([WORKER, mode, task, out], tmp_path)
    for proc in procs:
        assert proc.returncode == 0, proc.stderr
    return json.loads(out.read_text())


def assert_same_layers(reference: list[list[Any]], measured: list[list[Any]], rel: float = 1e-5) -> None:
    assert [row[0] for row in measured] == [row[0] for row in reference], "names without module./FSDP prefixes"
    for ref, got in zip(reference, measured, strict=True):
        for a, b in zip(ref[1:], got[1:], strict=True):
            assert (a is None) == (b is None), (ref, got)
            if a is not None:
                assert b == pytest.approx(a, rel=rel, abs=1e-12), (ref, got)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
@pytest.mark.parametrize("task", ["check-mlp", "check-gpt2", "check-gpt2-short", "check-lstm"])
def test_check_on_a_wrapped_model_equals_one_process(tmp_path: Path, mode: str, task: str) -> None:
    reference = single(task, tmp_path)
    measured = sharded(mode, task, tmp_path)
    assert_same_layers(reference["layers"], measured["layers"])
    assert measured["loss"] == pytest.approx(reference["loss"], rel=1e-5)
    assert measured["status"] == reference["status"]
    assert any(f"distributed ({mode}, 2 ranks)" in note for note in measured["notes"])


@pytest.mark.parametrize(
    ("mode", "task"),
    [
        ("ddp", "watch-mlp"),
        ("fsdp", "watch-mlp"),
        ("ddp", "watch-scaler"),
        ("ddp", "watch-clip"),
        ("fsdp", "watch-clip"),
    ],
)
@pytest.mark.slow
def test_watch_on_a_wrapped_model_equals_one_process(tmp_path: Path, mode: str, task: str) -> None:
    reference = single(task, tmp_path)
    measured = sharded(mode, task, tmp_path)
    assert len(measured) == len(reference) == 3
    for ref, got in zip(reference, measured, strict=True):
        assert got["total"] == pytest.approx(ref["total"], rel=1e-5)
        assert_same_layers(ref["layers"], got["layers"])
    logs = sorted(p.name for p in tmp_path.glob("*.jsonl"))
    assert logs == sorted([f"{mode}-{task}.json.jsonl", f"single-{task}.json.jsonl"]), "rank 0 alone writes"


@pytest.mark.slow
def test_a_nan_float_loss_on_one_rank_is_seen_by_all_without_a_hang(tmp_path: Path) -> None:
    from gradcheck_cli.training.history import history_report

    sharded("ddp", "watch-nan", tmp_path)
    report = history_report(tmp_path / "ddp-watch-nan.json.jsonl")
    assert report.history is not None
    onset = next(o for o in report.history.onsets if o.problem == "non_finite")
    assert onset.step == 1 and "GC017" in onset.codes


# ------------------------------------------------------------------ the CLI under torchrun


def _checkpoint(tmp_path: Path) -> None:
    (tmp_path / "nets.py").write_text(
        "import torch\nfrom torch import nn\n\n"
        "def build():\n"
        "    torch.manual_seed(0)\n"
        "    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))\n\n"
        "class FailsOnRank1(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.net = build()\n"
        "    def forward(self, x):\n"
        "        if torch.distributed.is_initialized() and torch.distributed.get_rank() == 1:\n"
        "            raise ValueError('rank 1 data is broken')\n"
        "        return self.net(x)\n"
    )
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    torch.save(net.state_dict(), tmp_path / "w.pt")
    torch.save({f"net.{k}": v for k, v in net.state_dict().items()}, tmp_path / "wrapped.pt")
    g = torch.Generator().manual_seed(1)
    torch.save((torch.randn(8, 8, generator=g), torch.randint(0, 3, (8,), generator=g)), tmp_path / "b.pt")
    torch.save((torch.randn(7, 8, generator=g), torch.randint(0, 3, (7,), generator=g)), tmp_path / "odd.pt")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_cli_under_torchrun_matches_one_process_and_only_rank_0_writes(tmp_path: Path, mode: str) -> None:
    _checkpoint(tmp_path)
    args = ["w.pt", "--model", "nets.py:build", "--input", "b.pt", "--format", "json"]
    one = subprocess.run(
        [sys.executable, "-m", "gradcheck_cli", "inspect", *args, "--no-verify"],
        cwd=tmp_path, env=CLI_ENV, text=True, capture_output=True, timeout=120,
    )  # fmt: skip
    assert one.returncode == 0, one.stderr
    ranks = launch(["-m", "gradcheck_cli", "inspect", *args, "--distributed", mode, "--timeout", "60"], tmp_path)
    assert [r.returncode for r in ranks] == [0, 0], [r.stderr for r in ranks]
    assert ranks[1].stdout == "", "rank 1 writes nothing"
    reference, measured = json.loads(one.stdout), json.loads(ranks[0].stdout)
    rows = [[la["name"], la["grad_norm"], la["act_grad_norm"], la["weight_norm"]] for la in reference["layers"]]
    got = [[la["name"], la["grad_norm"], la["act_grad_norm"], la["weight_norm"]] for la in measured["layers"]]
    assert_same_layers(rows, got)
    assert measured["status"] == reference["status"]


@pytest.mark.slow
def test_a_rank_whose_forward_raises_stops_every_rank_with_exit_2(tmp_path: Path) -> None:
    _checkpoint(tmp_path)
    ranks = launch(
        ["-m", "gradcheck_cli", "inspect", "wrapped.pt", "--model", "nets.py:FailsOnRank1", "--input", "b.pt",
         "--distributed", "ddp", "--timeout", "30"],
        tmp_path,
    )  # fmt: skip
    assert [r.returncode for r in ranks] == [2, 2]
    assert "error (rank 1): the forward pass raised" in ranks[1].stderr and "rank 1 data is broken" in ranks[1].stderr
    assert "error (rank 0): the forward pass failed on another rank" in ranks[0].stderr
    for rank in ranks:
        assert "Traceback" not in rank.stderr
        assert rank.stdout == ""


@pytest.mark.slow
def test_a_batch_that_does_not_split_evenly_is_refused_on_every_rank(tmp_path: Path) -> None:
    _checkpoint(tmp_path)
    ranks = launch(
        ["-m", "gradcheck_cli", "inspect", "w.pt", "--model", "nets.py:build", "--input", "odd.pt",
         "--distributed", "fsdp", "--timeout", "30"],
        tmp_path,
    )  # fmt: skip
    assert [r.returncode for r in ranks] == [2, 2]
    assert all("7 samples, which do not split evenly over 2 ranks" in r.stderr for r in ranks)


def test_distributed_outside_torchrun_says_how_to_launch(tmp_path: Path) -> None:
    _checkpoint(tmp_path)
    env = {k: v for k, v in CLI_ENV.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run(
        [sys.executable, "-m", "gradcheck_cli", "inspect", "w.pt", "--model", "nets.py:build", "--input", "b.pt",
         "--distributed", "ddp"],
        cwd=tmp_path, env=env, text=True, capture_output=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "torchrun --nproc-per-node N" in proc.stderr and "Traceback" not in proc.stderr


def test_single_process_check_is_unchanged_without_a_process_group() -> None:
    from gradcheck_cli.distributed.reduce import current, detect

    model = nn.Linear(4, 2)
    assert detect(model) is None and current() is None
    assert not torch.distributed.is_initialized()


@pytest.mark.slow
def test_fsdp_reads_a_dcp_checkpoint_shard_by_shard_and_matches_one_process(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    _checkpoint(tmp_path)
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "assuming the intent is to save in a single process"
        dcp.save(net.state_dict(), checkpoint_id=str(tmp_path / "ckpt"))
    args = ["ckpt", "--model", "nets.py:build", "--input", "b.pt", "--format", "json"]
    one = subprocess.run(
        [sys.executable, "-m", "gradcheck_cli", "inspect", *args, "--no-verify"],
        cwd=tmp_path, env=CLI_ENV, text=True, capture_output=True, timeout=120,
    )  # fmt: skip
    assert one.returncode == 0, one.stderr
    ranks = launch(["-m", "gradcheck_cli", "inspect", *args, "--distributed", "fsdp", "--timeout", "60"], tmp_path)
    assert [r.returncode for r in ranks] == [0, 0], [r.stderr for r in ranks]
    reference, measured = json.loads(one.stdout), json.loads(ranks[0].stdout)
    rows = [[la["name"], la["grad_norm"], la["act_grad_norm"], la["weight_norm"]] for la in reference["layers"]]
    got = [[la["name"], la["grad_norm"], la["act_grad_norm"], la["weight_norm"]] for la in measured["layers"]]
    assert_same_layers(rows, got)
    torch.manual_seed(0)
    fresh = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    with torch.no_grad():
        saved, built = (float(m[0].weight.norm().hypot(m[0].bias.norm())) for m in (net, fresh))
    assert got[0][3] == pytest.approx(saved, rel=1e-5), "the checkpoint's weights, not the factory's"
    assert got[0][3] != pytest.approx(built, rel=1e-3)
    assert "each rank read only its own shards of the checkpoint" in measured["notes"]


@pytest.mark.slow
def test_under_the_real_torchrun_launcher(tmp_path: Path) -> None:
    _checkpoint(tmp_path)
    port = str(_free_port())
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", port,
         "-m", "gradcheck_cli", "inspect", "w.pt", "--model", "nets.py:build", "--input", "b.pt",
         "--distributed", "fsdp", "--format", "json", "--timeout", "60"],
        cwd=tmp_path, env=CLI_ENV, text=True, capture_output=True, timeout=RANK_TIMEOUT_S,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)  # one JSON object: rank 1 printed nothing
    assert report["status"] == "healthy" and len(report["layers"]) == 3


@pytest.mark.slow
def test_hf_trainer_under_ddp_records_the_unclipped_reduced_norm(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from gradcheck_cli.training.log import read_history

    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
         TESTS_DIR / "hf_ddp_worker.py", out],
        env=CLI_ENV, text=True, capture_output=True, timeout=RANK_TIMEOUT_S,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    logged = {int(k): v for k, v in json.loads((out / "logged.json").read_text()).items()}
    history = read_history(out / "grads.jsonl")
    assert [r.step for r in history.records] == [1, 2, 3]
    for record in history.records:  # the Trainer clips at 1e-6 and logs the norm clip_grad_norm_ returned
        assert record.total_norm == pytest.approx(logged[record.step], rel=1e-4)
        assert record.total_norm > 0.1
