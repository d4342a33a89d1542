"""gradcheck's cost against a bare forward+backward of the same model, in one process, alternating.

    python bench/run.py                      # every workload, 7 repetitions, CPU
    python bench/run.py --only gpt2 --reps 9 --device cuda
    python bench/run.py --reps 9 --rounds 3    # each workload in 3 fresh processes, repetitions pooled

For each workload: after warm-up, each repetition times, in turn and alternating the order, (1) a bare
forward+backward with the same loss gradcheck differentiates, (2) ``gradcheck_cli.check(model, batch,
verify=False)`` (one probe and the diagnosis), and what users run instead: (3) the naive per-parameter
approach (forward+backward, then ``p.grad.norm().item()`` for every parameter, the forum ``plot_grad_flow``
snippet), (4) forward+backward under ``torch.autograd.detect_anomaly()``, and (5) when wandb is installed,
``wandb.watch(model, log="gradients", log_freq=1)`` in an offline run with one ``wandb.log`` per step (on a
second instance of the model, so its hooks never fire in the other modes). Ratios are taken per
repetition against that repetition's bare pass; the table gives their median and min–max. Peak memory is
measured in fresh subprocesses (one per workload and mode), after one warm-up pass: the bytes the pass's
tensors hold at their peak above what they held before it, so the model's weights cancel out (on a CPU from
the allocator's events under ``torch.profiler(profile_memory=True)``, on CUDA ``torch.cuda.max_memory_allocated``).
With ``--device cuda`` times are CUDA-synchronised.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gradcheck_cli import check  # noqa: E402
from gradcheck_cli.load.batch import Batch  # noqa: E402


@dataclass
class Workload:
    """A model, its batch for gradcheck, and the bare forward+backward with the same loss."""

    model: nn.Module
    batch: Batch
    bare: Callable[[], None]


def _mlp(device: torch.device) -> Workload:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(49):
        layers += [nn.Linear(512, 512), nn.Tanh()]
    model = nn.Sequential(*layers, nn.Linear(512, 10)).to(device)
    x, y = torch.randn(128, 512, device=device), torch.randint(0, 10, (128,), device=device)

    def bare() -> None:
        nn.functional.cross_entropy(model(x), y).backward()

    return Workload(model, Batch(args=(x,), target=y), bare)


class LSTMClassifier(nn.Module):
    """A 2-layer nn.LSTM of width 256 and a linear head on the last step."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(64, 256, num_layers=2)
        self.head = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.head(out[-1])


def _lstm(device: torch.device) -> Workload:
    torch.manual_seed(0)
    model = LSTMClassifier().to(device)
    x, y = torch.randn(200, 16, 64, device=device), torch.randint(0, 10, (16,), device=device)

    def bare() -> None:
        nn.functional.cross_entropy(model(x), y).backward()

    return Workload(model, Batch(args=(x,), target=y), bare)


def _gpt2(device: torch.device) -> Workload:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config()).to(device)
    ids = torch.randint(0, 50257, (2, 128), device=device)

    def bare() -> None:
        model(input_ids=ids, labels=ids).loss.backward()

    return Workload(model, Batch(kwargs={"input_ids": ids, "labels": ids}), bare)


def _resnet50(device: torch.device) -> Workload:
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    model = ResNetForImageClassification(ResNetConfig()).to(device)
    pixels = torch.randn(4, 3, 224, 224, device=device)
    labels = torch.randint(0, model.config.num_labels, (4,), device=device)

    def bare() -> None:
        model(pixel_values=pixels, labels=labels).loss.backward()

    return Workload(model, Batch(kwargs={"pixel_values": pixels, "labels": labels}), bare)


WORKLOADS: dict[str, tuple[str, Callable[[torch.device], Workload]]] = {
    "mlp": ("MLP 50×512 tanh, batch 128", _mlp),
    "gpt2": ("HF GPT-2 small (124M, GPT2Config()), 2×128 tokens", _gpt2),
    "resnet50": ("HF ResNet-50 (ResNetConfig()), 4×3×224×224", _resnet50),
    "lstm": ("nn.LSTM 2×256, 200 steps, batch 16", _lstm),
}
MODES = ("bare", "gradcheck", "naive", "anomaly", "wandb")
PEERS = MODES[1:]


def _wandb_runner(name: str, device: torch.device) -> Callable[[], None] | None:
    """``wandb.watch`` as its docs show it, offline, on its own copy of the workload; None without wandb."""
    try:
        import wandb
    except ImportError:
        return None
    import os
    import tempfile

    os.environ.setdefault("WANDB_SILENT", "true")
    work = WORKLOADS[name][1](device)
    work.model.train()
    run = wandb.init(mode="offline", dir=tempfile.mkdtemp(prefix="gradcheck-bench-wandb-"), reinit="finish_previous")
    run.watch(work.model, log="gradients", log_freq=1)

    def watched() -> None:
        work.bare()
        run.log({})
        work.model.zero_grad(set_to_none=True)

    return watched


def _runner(work: Workload, mode: str) -> Callable[[], None]:
    params = [p for p in work.model.parameters() if p.requires_grad]

    def bare() -> None:
        work.bare()
        work.model.zero_grad(set_to_none=True)

    def gradcheck() -> None:
        check(work.model, work.batch, verify=False)

    def naive() -> None:
        work.bare()
        _ = [p.grad.norm().item() for p in params if p.grad is not None]
        work.model.zero_grad(set_to_none=True)

    def anomaly() -> None:
        with torch.autograd.detect_anomaly(check_nan=True):
            work.bare()
        work.model.zero_grad(set_to_none=True)

    return {"bare": bare, "gradcheck": gradcheck, "naive": naive, "anomaly": anomaly}[mode]


def _timed(run: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def time_workload(name: str, device: torch.device, reps: int, warmup: int) -> dict[str, Any]:
    """Medians and ranges of gradcheck/bare and naive/bare over ``reps`` alternating repetitions."""
    work = WORKLOADS[name][1](device)
    work.model.train()
    runs = {mode: _runner(work, mode) for mode in MODES if mode != "wandb"}
    watched = _wandb_runner(name, device)
    if watched is not None:
        runs["wandb"] = watched
    modes = tuple(runs)
    for _ in range(warmup):
        for mode in modes:
            runs[mode]()
    seconds: dict[str, list[float]] = {mode: [] for mode in modes}
    for rep in range(reps):
        order = modes if rep % 2 == 0 else tuple(reversed(modes))  # alternate which mode runs first
        for mode in order:
            seconds[mode].append(_timed(runs[mode], device))
    ratios = {mode: [t / b for t, b in zip(seconds[mode], seconds["bare"], strict=True)] for mode in modes[1:]}
    return {
        "workload": name,
        "seconds": {mode: statistics.median(values) for mode, values in seconds.items()},
        "bare_s": statistics.median(seconds["bare"]),
        "ratio": {mode: _summary(values) for mode, values in ratios.items()},
        "ratios": ratios,
        "bare_seconds": seconds["bare"],
        "parameters": sum(p.numel() for p in work.model.parameters()),
    }


def time_in_rounds(name: str, device: str, reps: int, warmup: int, rounds: int) -> dict[str, Any]:
    """:func:`time_workload` in ``rounds`` fresh processes, one after another, every repetition pooled.

    On a shared machine one process's numbers drift together (the same code's ratio moved by ±0.05 between
    processes on the CI box while its repetitions agreed within a process), so a process is one sample and
    the rounds make several; each round's median is kept beside the pooled summary."""
    per_round = []
    for _ in range(rounds):
        out = subprocess.run(
            [sys.executable, __file__, "--time-round", name, "--reps", str(reps), "--warmup", str(warmup),
             "--device", device],
            capture_output=True,
            text=True,
            check=True,
        )  # fmt: skip
        per_round.append(json.loads(out.stdout.strip().splitlines()[-1]))
    pooled = {mode: [v for r in per_round for v in r["ratios"][mode]] for mode in per_round[0]["ratios"]}
    bare = [v for r in per_round for v in r["bare_seconds"]]
    return {
        **per_round[0],
        "seconds": None,
        "bare_s": statistics.median(bare),
        "ratio": {mode: _summary(values) for mode, values in pooled.items()},
        "ratios": pooled,
        "bare_seconds": bare,
        "rounds": [{mode: r["ratio"][mode]["median"] for mode in r["ratio"]} for r in per_round],
    }


def _summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def peak_memory(name: str, mode: str, device: torch.device) -> int:
    """Bytes the pass's tensors hold at its peak above what they held before it (run in a fresh process).

    On CUDA, ``torch.cuda.max_memory_allocated``. On a CPU, the same quantity from the CPU allocator's own
    events (``torch.profiler`` with ``profile_memory``: every allocation and free with its size, in order):
    deterministic, where the resident set (VmHWM, measured here before) counts what glibc keeps and moved by
    more than the 5 % asked for between runs of the same code."""
    work = WORKLOADS[name][1](device)
    work.model.train()
    run = _runner(work, mode)
    run()  # warm-up: lazy imports, allocator pools and one-time caches are not the pass's memory
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        run()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - before)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    held = peak = 0
    for event in events:
        held += event.nbytes()
        peak = max(peak, held)
    return peak


def _memory_in_subprocess(name: str, mode: str, device: str) -> int:
    out = subprocess.run(
        [sys.executable, __file__, "--memory-probe", name, mode, "--device", device],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout.strip().splitlines()[-1])


PEER_TITLES = {
    "gradcheck": "gradcheck `check()`",
    "naive": "naive `.item()`",
    "anomaly": "`detect_anomaly`",
    "wandb": '`wandb.watch(log="gradients")`',
}


def _ratio(summary: dict[str, float] | None) -> str:
    return "–" if summary is None else f"{summary['median']:.3f} ({summary['min']:.3f}–{summary['max']:.3f})"


def _table(results: list[dict[str, Any]]) -> str:
    """One row per workload: each peer ÷ bare as median (min–max), then peak memory."""
    titles = [f"{PEER_TITLES[peer]} ÷ bare" for peer in PEERS]
    rows = [
        "| workload | params | bare fwd+bwd | " + " | ".join(titles) + " | peak memory gradcheck ÷ bare |",
        "|---|---|---|" + "---|" * len(titles) + "---|",
    ]
    for r in results:
        memory = r.get("memory_ratio")
        cells = [_ratio(r["ratio"].get(peer)) for peer in PEERS]
        peak = "–" if memory is None else (
            f"{memory:.3f} ({r['memory_gradcheck'] / 2**20:.0f} / {r['memory_bare'] / 2**20:.0f} MiB)"
        )  # fmt: skip
        head = f"| {WORKLOADS[r['workload']][0]} | {r['parameters'] / 1e6:.1f}M | {r['bare_s'] * 1000:.0f} ms | "
        rows.append(head + " | ".join(cells) + f" | {peak} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(WORKLOADS), help="comma-separated workloads")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--rounds", type=int, default=1, help="fresh processes per workload, repetitions pooled (1: this one)"
    )
    parser.add_argument("--memory-probe", nargs=2, metavar=("WORKLOAD", "MODE"), help=argparse.SUPPRESS)
    parser.add_argument("--time-round", metavar="WORKLOAD", help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.memory_probe:
        print(peak_memory(args.memory_probe[0], args.memory_probe[1], device))
        return
    if args.time_round:
        print(json.dumps(time_workload(args.time_round, device, args.reps, args.warmup)))
        return
    results = []
    for name in args.only.split(","):
        if args.rounds > 1:
            result = time_in_rounds(name, args.device, args.reps, args.warmup, args.rounds)
        else:
            result = time_workload(name, device, args.reps, args.warmup)
        if not args.no_memory:
            bare = _memory_in_subprocess(name, "bare", args.device)
            probed = _memory_in_subprocess(name, "gradcheck", args.device)
            result.update(memory_bare=bare, memory_gradcheck=probed, memory_ratio=probed / bare if bare else None)
        results.append(result)
        print(json.dumps(result), file=sys.stderr, flush=True)
    machine = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    )
    rounds = f" in each of {args.rounds} fresh processes, pooled" if args.rounds > 1 else ""
    print(f"torch {torch.__version__}, {machine}, {args.reps} repetitions after {args.warmup} warm-up{rounds}\n")
    print(_table(results))
    if args.json:
        meta = {"machine": machine, "torch": torch.__version__, "reps": args.reps, "rounds": args.rounds}
        args.json.write_text(json.dumps({**meta, "results": results}, indent=2))


if __name__ == "__main__":
    main()
