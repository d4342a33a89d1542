"""What ``watch()`` costs inside a real training loop, against the same loop without it, in one process.

    python bench/watch_overhead.py                                   # GPT-2 small, CPU, the defaults below
    python bench/watch_overhead.py --model mlp --steps 10 --reps 2   # a quick smoke run
    python bench/watch_overhead.py --device cuda --steps 60 --reps 5 --batch 8 --seq 512 --json out.json

The workload is ``GPT2LMHeadModel(GPT2Config())`` (the 124M small config, random init, nothing downloaded)
trained with AdamW on random token batches (``labels=input_ids``). Three configurations run the same
``--steps`` optimizer steps on the same batches from the same weights and optimizer state (both restored
before every run, the RNG re-seeded, so dropout masks match too):

    bare      forward, backward, optimizer.step(), zero_grad
    every50   the same inside ``with watch(model, every=50, log=TMP) as w:``, ``w.step(loss)`` after backward
    every1    the same with ``every=1``: every step recorded, judged and logged

After a warm-up run of each configuration, each repetition runs every configuration once, alternating
the order (forward on even repetitions, reversed on odd ones) so drift cancels. A configuration's time is
its whole loop, watch construction, ``__enter__`` and ``__exit__`` included; ratios are taken per
repetition against that repetition's bare loop and summarised as median (min–max). Per-step times are
kept too. With fewer than 50 steps, ``every=50`` records exactly one step per loop (step 0, armed when
the block is entered), so the measured every50 ratio carries a 1/steps share of a recorded step; the
script also reports the amortised estimate for a long run:

    (recorded step − bare step) / 50 + (unrecorded ``step()`` call) , relative to a bare step

where the recorded step's extra cost comes from ``every1`` and the unrecorded call from a micro-benchmark
(``w.step(loss)`` on steps that are not recorded, against an empty loop, in microseconds).

``--profile N`` additionally runs N recorded (every=1) steps and N bare steps under cProfile and prints
where the recorded steps' extra time goes, by gradcheck function.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import json
import math
import platform
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gradcheck_cli.training.monitor import Watch, watch  # noqa: E402

CONFIGS: dict[str, int | None] = {"bare": None, "every50": 50, "every1": 1}


@dataclass
class Workload:
    """A model, its optimizer, and the loss of batch ``i`` (one forward pass)."""

    label: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss: Callable[[int], torch.Tensor]


def _gpt2(device: torch.device, batch: int, seq: int, n_batches: int, seed: int) -> Workload:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config()
    model = GPT2LMHeadModel(config).to(device).train()  # type: ignore[arg-type]
    generator = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, config.vocab_size, (n_batches, batch, seq), generator=generator).to(device)

    def loss(i: int) -> torch.Tensor:
        x = ids[i % n_batches]
        return model(input_ids=x, labels=x).loss

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    return Workload(f"HF GPT-2 small (GPT2Config(), 124M), {batch}×{seq} tokens, AdamW", model, optimizer, loss)


def _mlp(device: torch.device, batch: int, seq: int, n_batches: int, seed: int) -> Workload:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for _ in range(8):
        layers += [nn.Linear(256, 256), nn.Tanh()]
    model = nn.Sequential(*layers, nn.Linear(256, 10)).to(device).train()
    generator = torch.Generator().manual_seed(seed + 1)
    rows = batch * seq
    x = torch.randn(n_batches, rows, 256, generator=generator).to(device)
    y = torch.randint(0, 10, (n_batches, rows), generator=generator).to(device)

    def loss(i: int) -> torch.Tensor:
        return nn.functional.cross_entropy(model(x[i % n_batches]), y[i % n_batches])

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    return Workload(f"MLP 9×256 tanh, {rows} rows, AdamW", model, optimizer, loss)


MODELS = {"gpt2": _gpt2, "mlp": _mlp}


class State:
    """The model's parameters and the optimizer's state, snapshotted once and copied back before each run."""

    def __init__(self, work: Workload) -> None:
        self._params = [p.detach().clone() for p in work.model.parameters()]
        self._optim = [
            {k: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in s.items()}
            for s in (work.optimizer.state[p] for p in work.model.parameters())
        ]
        self._work = work

    def restore(self) -> None:
        work = self._work
        with torch.no_grad():
            for p, saved, state in zip(work.model.parameters(), self._params, self._optim, strict=True):
                p.copy_(saved)
                live = work.optimizer.state[p]
                for k, v in state.items():
                    if isinstance(v, torch.Tensor):
                        live[k].copy_(v)
                    else:
                        live[k] = v
        work.optimizer.zero_grad(set_to_none=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_loop(work: Workload, every: int | None, steps: int, device: torch.device, log: Path | None) -> dict[str, Any]:
    """One configuration's whole loop: wall and CPU seconds, per step too, and the losses (read after timing)."""
    model, optimizer = work.model, work.optimizer
    losses: list[torch.Tensor] = []
    step_s: list[float] = []
    step_cpu_s: list[float] = []
    in_step_s: list[float] = []  # time inside w.step() itself (read, judge, log, arm the next step)
    in_step_cpu_s: list[float] = []
    cuda = device.type == "cuda"
    events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)] if cuda else []
    _sync(device)
    start, start_cpu = time.perf_counter(), time.process_time()
    block: contextlib.AbstractContextManager[Watch | None] = (
        contextlib.nullcontext() if every is None else watch(model, every=every, log=log)
    )
    with block as w:
        if cuda:
            events[0].record()
        for i in range(steps):
            t0, c0 = time.perf_counter(), time.process_time()
            loss = work.loss(i)
            loss.backward()
            if w is not None:
                s0, sc0 = time.perf_counter(), time.process_time()
                w.step(loss)
                in_step_s.append(time.perf_counter() - s0)
                in_step_cpu_s.append(time.process_time() - sc0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach())
            if cuda:
                events[i + 1].record()
            else:
                step_s.append(time.perf_counter() - t0)
                step_cpu_s.append(time.process_time() - c0)
    _sync(device)
    total, total_cpu = time.perf_counter() - start, time.process_time() - start_cpu
    if cuda:
        step_s = [events[i].elapsed_time(events[i + 1]) / 1000 for i in range(steps)]
    records = None if w is None else len(w.records)
    return {
        "total_s": total,
        "total_cpu_s": total_cpu,
        "step_s": step_s,
        "step_cpu_s": step_cpu_s,
        "in_step_s": in_step_s,
        "in_step_cpu_s": in_step_cpu_s,
        "losses": torch.stack(losses).tolist(),
        "records": records,
    }


def micro_step(work: Workload, device: torch.device, calls: int, reps: int, log: Path) -> dict[str, Any]:
    """Microseconds per unrecorded ``w.step(loss)`` / ``w.step()`` call, against an empty loop, alternating.

    ``every`` is 10⁹ and ``start=1`` so no call in the run is recorded or arms hooks (the steady state
    between two records: one device-side NaN/Inf flag update per call when given a loss tensor).
    """
    with torch.no_grad():
        value = work.loss(0).detach()
    loss = value.clone().requires_grad_(True)  # a scalar loss on the device, as the loop hands it over
    results: dict[str, list[float]] = {"empty": [], "step(loss)": [], "step()": []}
    cpu: dict[str, list[float]] = {"empty": [], "step(loss)": [], "step()": []}
    with watch(work.model, every=10**9, start=1, log=log) as w:
        w.step(loss)  # first call allocates the flag

        def empty() -> None:
            for _ in range(calls):
                pass

        def with_loss() -> None:
            for _ in range(calls):
                w.step(loss)

        def without() -> None:
            for _ in range(calls):
                w.step()

        kinds = {"empty": empty, "step(loss)": with_loss, "step()": without}
        for fn in kinds.values():
            fn()  # warm-up
        for rep in range(reps):
            order = list(kinds) if rep % 2 == 0 else list(reversed(kinds))
            for name in order:
                _sync(device)
                t0, c0 = time.perf_counter(), time.process_time()
                kinds[name]()
                _sync(device)
                results[name].append((time.perf_counter() - t0) / calls)
                cpu[name].append((time.process_time() - c0) / calls)
        assert not w.records and not w.armed, "the micro-benchmark must not record"
    summary: dict[str, Any] = {"calls": calls, "reps": reps}
    for clock, times in (("wall", results), ("cpu", cpu)):
        summary[clock] = {
            name: _summary([(t - e) * 1e6 for t, e in zip(times[name], times["empty"], strict=True)])
            for name in ("step(loss)", "step()")
        }
    return summary


def _summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Random init can trip a rule (a GradientWarning): the benchmark measures cost, not the verdicts."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@contextlib.contextmanager
def _timed_reductions(spent: list[float], clock: Callable[[], float]) -> Iterator[None]:
    """Time every ``norm_and_max_abs`` the hooks call (the per-tensor reductions of a recorded step)."""
    import gradcheck_cli.probe.recorder as recorder_module
    import gradcheck_cli.training.hooks as hooks_module

    original = recorder_module.norm_and_max_abs

    def timed(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start = clock()
        result = original(tensor)
        spent.append(clock() - start)
        return result

    recorder_module.norm_and_max_abs = timed  # type: ignore[assignment]
    hooks_module.norm_and_max_abs = timed  # type: ignore[assignment,attr-defined]
    try:
        yield
    finally:
        recorder_module.norm_and_max_abs = original  # type: ignore[assignment]
        hooks_module.norm_and_max_abs = original  # type: ignore[assignment,attr-defined]


def attribution(work: Workload, steps: int, device: torch.device, log: Path) -> dict[str, Any]:
    """Where a recorded step's extra time goes, from one ``every=2`` loop: adjacent steps alternate recorded
    (even) and unrecorded (odd), so each pair runs under the same machine load.

    Per pair (the first is skipped as a cold start): ``extra = step[2k] − step[2k+1] + call[2k+1]``, the
    recorded step against its unrecorded neighbour with that neighbour's own ``step()`` call (the loss
    flag and arming the next recorded step's hooks) taken out and charged to the recorded step;
    ``call[2k]`` (read, judge, log) and ``hooks = (step[2k] − call[2k]) − (step[2k+1] − call[2k+1])``
    (the hooks' work inside forward and backward), of which ``reductions`` is the time inside
    ``norm_and_max_abs``; ``unrecorded_step`` is the neighbour's own time without its call (a bare step's
    reference). On a CPU the clock is process CPU time; on CUDA every step is synchronised.
    """
    cuda = device.type == "cuda"

    def clock() -> float:
        if cuda:
            torch.cuda.synchronize(device)
            return time.perf_counter()
        return time.process_time()

    step_t: list[float] = []
    call_t: list[float] = []
    reduce_t: list[float] = []
    spent: list[float] = []
    with _timed_reductions(spent, clock), watch(work.model, every=2, log=log) as w:
        for i in range(steps):
            spent.clear()
            t0 = clock()
            loss = work.loss(i)
            loss.backward()
            c0 = clock()
            w.step(loss)
            call_t.append(clock() - c0)
            work.optimizer.step()
            work.optimizer.zero_grad(set_to_none=True)
            step_t.append(clock() - t0)
            reduce_t.append(sum(spent))
    pairs = range(1, steps // 2)
    per_pair = {
        "extra": [step_t[2 * k] - step_t[2 * k + 1] + call_t[2 * k + 1] for k in pairs],
        "read_judge_log": [call_t[2 * k] for k in pairs],
        "arm_next_and_loss_flag": [call_t[2 * k + 1] for k in pairs],
        "hooks": [(step_t[2 * k] - call_t[2 * k]) - (step_t[2 * k + 1] - call_t[2 * k + 1]) for k in pairs],
        "reductions": [reduce_t[2 * k] for k in pairs],
        "unrecorded_step": [step_t[2 * k + 1] - call_t[2 * k + 1] for k in pairs],
    }
    return {
        "clock": "wall, synchronised" if cuda else "cpu",
        "steps": steps,
        "pairs": len(pairs),
        "ms": {name: _summary([v * 1000 for v in values]) for name, values in per_pair.items()} if pairs else {},
        "step_s": step_t,
        "call_s": call_t,
        "reductions_s": reduce_t,
    }


def profile(work: Workload, steps: int, device: torch.device, log: Path, state: State) -> str:
    """cProfile of ``steps`` bare and ``steps`` every=1 steps: the gradcheck functions' share, ms per step."""
    out = []
    stats = {}
    for name, every in (("bare", None), ("every1", 1)):
        state.restore()
        torch.manual_seed(0)
        profiler = cProfile.Profile(time.process_time)  # CPU time: other jobs on the box do not count
        profiler.enable()
        result = run_loop(work, every, steps, device, log if every else None)
        profiler.disable()
        stats[name] = (pstats.Stats(profiler), result["total_cpu_s"])
    (bare_stats, bare_s), (rec_stats, rec_s) = stats["bare"], stats["every1"]
    out.append(
        f"cProfile (CPU-time timer), {steps} steps each (profiling inflates Python-heavy code): "
        f"bare {bare_s / steps * 1000:.0f} ms/step, every=1 {rec_s / steps * 1000:.0f} ms/step, "
        f"difference {(rec_s - bare_s) / steps * 1000:.1f} ms/step"
    )
    rec_raw: dict[Any, Any] = rec_stats.stats  # type: ignore[attr-defined]
    bare_raw: dict[Any, Any] = bare_stats.stats  # type: ignore[attr-defined]
    rows = [
        (cumtime, tottime, ncalls, f"{Path(file).name}:{line}({func})")
        for (file, line, func), (_, ncalls, tottime, cumtime, _) in rec_raw.items()
        if "gradcheck_cli" in file
    ]
    rows.sort(reverse=True)
    out.append(f"{'cum ms/step':>12} {'self ms/step':>13} {'calls/step':>11}  gradcheck function")
    for cumtime, tottime, ncalls, where in rows[:30]:
        out.append(f"{cumtime / steps * 1000:12.2f} {tottime / steps * 1000:13.2f} {ncalls / steps:11.1f}  {where}")
    builtin = {func: (calls, self_s) for (file, _, func), (_, calls, self_s, _, _) in bare_raw.items() if file == "~"}
    torch_rows = sorted(
        (
            (self_s - builtin.get(func, (0, 0.0))[1], self_s, calls, func)
            for (file, _, func), (_, calls, self_s, _, _) in rec_raw.items()
            if file == "~" and any(key in func for key in ("torch", "Tensor", "aminmax", "norm"))
        ),
        reverse=True,
    )
    out.append(
        f"\n{'every1 − bare':>14} {'every1 ms':>10} {'every1 calls':>13} {'bare calls':>11}  "
        "torch built-ins, self CPU ms/step"
    )
    for extra, self_s, calls, func in torch_rows[:15]:
        out.append(
            f"{extra / steps * 1000:14.2f} {self_s / steps * 1000:10.2f} {calls / steps:13.1f} "
            f"{builtin.get(func, (0, 0.0))[0] / steps:11.1f}  {func}"
        )
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="gpt2")
    parser.add_argument("--steps", type=int, default=16, help="optimizer steps per configuration run")
    parser.add_argument("--reps", type=int, default=3, help="alternating repetitions of the three configurations")
    parser.add_argument("--warmup", type=int, default=2, help="steps per configuration in the warm-up run")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    parser.add_argument(
        "--pair-steps", type=int, default=14, help="steps of the every=2 loop that attributes a recorded step's cost"
    )
    parser.add_argument("--micro-calls", type=int, default=2000)
    parser.add_argument("--micro-reps", type=int, default=9)
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="also cProfile N bare and N every=1 steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    wall = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    work = MODELS[args.model](device, args.batch, args.seq, max(args.steps, args.warmup), args.seed)
    n_params = sum(p.numel() for p in work.model.parameters())
    out: dict[str, Any] = {
        "workload": work.label,
        "parameters": n_params,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "machine": (
            torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"
        ),
    }
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        git = ["git", "-C", str(ROOT)]
        head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run([*git, "status", "--porcelain", "gradcheck_cli"], capture_output=True, text=True, check=True)
        out["commit"] = head.stdout.strip() + (" (gradcheck_cli/ modified)" if dirty.stdout.strip() else "")
    with contextlib.suppress(ImportError):
        import transformers

        out["transformers"] = transformers.__version__
    print(
        f"{work.label}: {n_params / 1e6:.1f}M parameters; {out['machine']}; torch {torch.__version__}", file=sys.stderr
    )

    with tempfile.TemporaryDirectory() as tmp, _quiet():
        logs = Path(tmp)
        # warm-up: the first optimizer step creates AdamW's state; every configuration runs once untimed
        t0 = time.perf_counter()
        for name, every in CONFIGS.items():
            run_loop(work, every, args.warmup, device, logs / f"warmup-{name}.jsonl" if every else None)
        print(f"warm-up {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        state = State(work)

        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in CONFIGS}
        for rep in range(args.reps):
            order = list(CONFIGS) if rep % 2 == 0 else list(reversed(CONFIGS))
            for name in order:
                state.restore()
                torch.manual_seed(args.seed + 2)  # the same dropout masks in every configuration
                gc.collect()
                log = logs / f"{name}-{rep}.jsonl" if CONFIGS[name] else None
                result = run_loop(work, CONFIGS[name], args.steps, device, log)
                if log is not None:
                    result["log_bytes"] = log.stat().st_size
                runs[name].append(result)
                print(
                    f"rep {rep} {name:8s} wall {result['total_s'] / args.steps:.4f} s/step, "
                    f"cpu {result['total_cpu_s'] / args.steps:.4f} s/step (records {result['records']})",
                    file=sys.stderr,
                    flush=True,
                )
        micro = (
            None if not args.reps else micro_step(work, device, args.micro_calls, args.micro_reps, logs / "micro.jsonl")
        )
        attributed = None
        if args.pair_steps:
            state.restore()
            torch.manual_seed(args.seed + 2)
            gc.collect()
            attributed = attribution(work, args.pair_steps, device, logs / "pairs.jsonl")
        profile_text = profile(work, args.profile, device, logs / "profile.jsonl", state) if args.profile else None

    if not args.reps:
        out.update(attribution=attributed, profile=profile_text, wall_s=time.perf_counter() - wall)
        if attributed:
            print(attribution_text(attributed))
        print(profile_text or "")
        return
    assert micro is not None
    clocks = ["wall"] if device.type == "cuda" else ["cpu", "wall"]  # CUDA: host CPU time is not the work
    reference = runs["bare"][0]["losses"]
    out.update(
        configs={name: {"every": every} for name, every in CONFIGS.items()},
        runs=runs,
        micro=micro,
        attribution=attributed,
        summary={clock: summarise(runs, args.steps, micro, clock, attributed) for clock in clocks},
        same_losses={
            name: max(abs(a - b) for r in results for a, b in zip(r["losses"], reference, strict=True))
            for name, results in runs.items()
        },
        profile=profile_text,
        wall_s=time.perf_counter() - wall,
    )
    print(report(out, args))
    if profile_text:
        print("\n" + profile_text)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")


CLOCKS = {"wall": ("total_s", "step_s"), "cpu": ("total_cpu_s", "step_cpu_s")}


def summarise(
    runs: dict[str, list[dict[str, Any]]],
    steps: int,
    micro: dict[str, Any],
    clock: str,
    attributed: dict[str, Any] | None,
) -> dict[str, Any]:
    """Per configuration: s/step and the ratio to bare (per repetition); the recorded and unrecorded step costs."""
    total_key, step_key = CLOCKS[clock]
    bare_totals = [r[total_key] for r in runs["bare"]]
    s: dict[str, Any] = {"clock": clock, "per_config": {}}
    for name, results in runs.items():
        totals = [r[total_key] for r in results]
        ratios = [t / b for t, b in zip(totals, bare_totals, strict=True)]
        all_steps = [x for r in results for x in r[step_key]]
        s["per_config"][name] = {
            "s_per_step": _summary([t / steps for t in totals]),
            "ratio_to_bare": _summary(ratios),
            "step_s_median": statistics.median(all_steps) if all_steps else None,
            "step0_s_median": statistics.median(r[step_key][0] for r in results) if all_steps else None,
            "later_steps_s_median": (
                statistics.median(x for r in results for x in r[step_key][1:]) if all_steps and steps > 1 else None
            ),
        }
    if runs["bare"][0][step_key]:  # per-step medians: robust to a slow moment hitting one loop
        per_step = {name: statistics.median(x for r in results for x in r[step_key]) for name, results in runs.items()}
        first = {name: statistics.median(r[step_key][0] for r in results) for name, results in runs.items()}
        later = {
            name: statistics.median(x for r in results for x in r[step_key][1:]) if steps > 1 else math.nan
            for name, results in runs.items()
        }
        inside = "in_step_cpu_s" if clock == "cpu" else "in_step_s"
        s["per_step_medians"] = {
            "every1_step_over_bare_step": per_step["every1"] / per_step["bare"],
            "every50_step0_over_bare_step0": first["every50"] / first["bare"],
            "every50_later_steps_over_bare_later_steps": later["every50"] / later["bare"],
            "every1_inside_step_call_ms": 1000 * statistics.median(x for r in runs["every1"] for x in r[inside]),
            "every50_inside_step_call_step0_ms": 1000 * statistics.median(r[inside][0] for r in runs["every50"]),
            "every50_inside_step_call_later_us": (
                1e6 * statistics.median(x for r in runs["every50"] for x in r[inside][1:]) if steps > 1 else math.nan
            ),
            "bare_step_s": per_step["bare"],
        }
    bare_step = s["per_config"]["bare"]["s_per_step"]["median"]
    recorded_extra = [r - 1 for r in s_ratios(runs, "every1", total_key)]
    s["recorded_step_extra"] = {
        "relative": _summary(recorded_extra),
        "ms": statistics.median(recorded_extra) * bare_step * 1000,
    }
    unrecorded_us = micro[clock]["step(loss)"]["median"]
    s["unrecorded_step_us"] = unrecorded_us
    s["unrecorded_relative"] = unrecorded_us * 1e-6 / bare_step
    s["amortised_every50"] = statistics.median(recorded_extra) / 50 + unrecorded_us * 1e-6 / bare_step
    paired = attributed is not None and attributed["ms"] and attributed["clock"] == "cpu" and clock == "cpu"
    if paired and "per_step_medians" in s:
        # the paired (every=2) recorded-step cost, and the unrecorded call as measured inside the loop
        in_loop_us = s["per_step_medians"]["every50_inside_step_call_later_us"]
        bare_ms = 1000 * s["per_step_medians"]["bare_step_s"]
        extra_ms = attributed["ms"]["extra"]["median"]  # type: ignore[index]
        s["amortised_every50_paired"] = {
            "recorded_extra_ms": extra_ms,
            "recorded_extra_relative": extra_ms / bare_ms,
            "unrecorded_in_loop_us": in_loop_us,
            "relative": extra_ms / 50 / bare_ms + in_loop_us / 1000 / bare_ms,
        }
    return s


def s_ratios(runs: dict[str, list[dict[str, Any]]], name: str, key: str) -> list[float]:
    return [t[key] / b[key] for t, b in zip(runs[name], runs["bare"], strict=True)]


def attribution_text(a: dict[str, Any]) -> str:
    rows = [f"every=2 attribution, {a['pairs']} pairs ({a['clock']} clock), ms per recorded step, median (min–max):"]
    for name, v in a["ms"].items():
        rows.append(f"  {name:24s} {v['median']:8.1f} ({v['min']:.1f}–{v['max']:.1f})")
    return "\n".join(rows)


def report(out: dict[str, Any], args: argparse.Namespace) -> str:
    lines = [
        f"{out['workload']}; {out['machine']}; torch {out['torch']}; {args.steps} steps × {args.reps} alternating "
        f"repetitions after a {args.warmup}-step warm-up per configuration",
    ]
    labels = {"bare": "bare loop", "every50": "`watch(every=50)`", "every1": "`watch(every=1)`"}
    for clock, s in out["summary"].items():
        lines += [
            "",
            f"{clock} clock:",
            "| configuration | s/step, median (min–max) | ÷ bare, median (min–max) | records per loop |",
            "|---|---|---|---|",
        ]
        for name, c in s["per_config"].items():
            t, r = c["s_per_step"], c["ratio_to_bare"]
            records = out["runs"][name][0]["records"]
            lines.append(
                f"| {labels[name]} | {t['median']:.3f} ({t['min']:.3f}–{t['max']:.3f}) | "
                f"{r['median']:.4f} ({r['min']:.4f}–{r['max']:.4f}) | {'–' if records is None else records} |"
            )
        m = out["micro"][clock]
        rec = s["recorded_step_extra"]
        lines += [
            f"unrecorded step(loss): {m['step(loss)']['median']:.1f} µs "
            f"({m['step(loss)']['min']:.1f}–{m['step(loss)']['max']:.1f}); step(): {m['step()']['median']:.1f} µs; "
            f"step(loss) = {s['unrecorded_relative'] * 100:.4f} % of a bare step",
            f"recorded step extra (every=1 ÷ bare − 1): {rec['relative']['median'] * 100:.2f} % "
            f"({rec['relative']['min'] * 100:.2f}–{rec['relative']['max'] * 100:.2f}), "
            f"≈ {rec['ms']:.0f} ms per recorded step",
            f"amortised every=50 estimate: {s['amortised_every50'] * 100:.3f} % of a bare step",
        ]
        if "per_step_medians" in s:
            lines.append("per-step medians: " + json.dumps({k: round(v, 4) for k, v in s["per_step_medians"].items()}))
        if "amortised_every50_paired" in s:
            a = s["amortised_every50_paired"]
            lines.append(
                f"paired (every=2) recorded step extra {a['recorded_extra_ms']:.0f} ms = "
                f"{a['recorded_extra_relative'] * 100:.2f} % of a bare step; unrecorded call in the loop "
                f"{a['unrecorded_in_loop_us']:.0f} µs; amortised every=50: {a['relative'] * 100:.3f} %"
            )
    if out.get("attribution"):
        lines += ["", attribution_text(out["attribution"])]
    lines += [
        "",
        f"max |loss difference| against the first bare run: {out['same_losses']}",
        f"total wall time {out['wall_s']:.0f} s",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
