"""One rank of a distributed test: ``python dist_worker.py MODE TASK OUT`` with torchrun's environment.

MODE: ``single`` (no process group: the reference on the whole batch), ``ddp`` or ``fsdp``. TASK: ``check-mlp``,
``check-gpt2`` (``check()`` on a wrapped model, each rank on its slice) or ``watch-mlp`` (three training steps
under ``watch``). Rank 0 (or the single process) writes a JSON summary of what it measured to OUT.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import torch
from torch import nn

from gradcheck_cli import check, watch
from gradcheck_cli.distributed.reduce import split_batch


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))


def gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0,
    )  # fmt: skip
    return GPT2LMHeadModel(config)


class LastState(nn.Module):
    """Classifies from an LSTM's final hidden state h_n (layers, B, H): per sample, with a leading size of 1."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(8, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, (h, _) = self.lstm(x.transpose(0, 1))  # (B, T, 8) → time-first
        return self.head(h[-1])


def lstm() -> nn.Module:
    torch.manual_seed(0)
    return LastState()


def lstm_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    return torch.randn(8, 5, 8, generator=g), torch.randint(0, 3, (8,), generator=g)


def mlp_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 8, generator=g), torch.randint(0, 3, (8,), generator=g)


def gpt2_batch(length: int = 16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 100, (8, length), generator=g)
    return {"input_ids": ids, "labels": ids}


def wrapped(model: nn.Module, mode: str) -> nn.Module:
    if mode == "single":
        return model
    if mode == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    from gradcheck_cli.distributed.launch import wrap

    return wrap(model, "fsdp", torch.device("cpu"))


def layers_of(report: Any) -> dict[str, Any]:
    return {
        "layers": [[la.name, la.grad_norm, la.act_grad_norm, la.weight_norm] for la in report.layers],
        "loss": report.run.loss_value,
        "status": "healthy" if report.healthy else "unhealthy",
        "notes": list(report.notes),
    }


def main() -> None:
    mode, task, out = sys.argv[1:4]
    if mode != "single":
        torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank() if mode != "single" else 0
    world = torch.distributed.get_world_size() if mode != "single" else 1
    summary: Any
    if task.startswith("check"):
        if task == "check-mlp":
            model, batch = mlp(), mlp_batch()
        elif task == "check-lstm":
            model, batch = lstm(), lstm_batch()
        else:  # check-gpt2; check-gpt2-short: sequences as long as each rank's slice (4), so shapes alone mislead
            model, batch = gpt2(), gpt2_batch(16 if task == "check-gpt2" else 4)
        report = check(wrapped(model, mode), split_batch(batch, rank, world), verify=False)
        summary = layers_of(report)
    else:
        model = mlp()
        net = wrapped(model, mode)
        x, y = (split_batch(t, rank, world) for t in mlp_batch())
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
        summary = []
        log = out + ".jsonl"
        # watch-scaler: the AMP loop that unscales before step() (to clip), with a CPU GradScaler
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0) if task == "watch-scaler" else None
        with watch(net, every=1, log=log, scaler=scaler) as w:
            for step in range(3):
                loss = nn.functional.cross_entropy(net(x), y)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.unscale_(optimizer)
                else:
                    loss.backward()
                if task == "watch-clip":  # clipping before step() must not hide the norm, distributed or not
                    torch.nn.utils.clip_grad_norm_(net.parameters(), max_norm=1e-6)
                given: torch.Tensor | float = loss
                if task == "watch-nan" and rank == 1 and step == 1:
                    given = float("nan")  # a float loss, NaN on one rank only
                assessment = w.step(given)
                assert assessment is not None
                summary.append(
                    {
                        "total": assessment.total_norm,
                        "layers": [[la.name, la.grad_norm, la.act_grad_norm] for la in assessment.diagnosis.layers],
                    }
                )
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad()
    if rank == 0:
        with open(out, "w") as handle:
            json.dump(summary, handle)
    if mode != "single":
        torch.distributed.barrier()  # no rank tears the group down while another still talks to it
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
    # gloo in torch 2.13 can abort a rank during interpreter teardown after all work is done ("terminate called
    # without an active exception"); the CLI skips that teardown after --distributed runs, and so does this worker
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
