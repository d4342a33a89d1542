"""Trainability of gated RNNs against the gradient through time: the calibration of GC008's error boundary.

    python bench/rnn_trainability.py                 # the whole sweep, ~25 min on the 2-core CI box (1 thread)
    python bench/rnn_trainability.py --quick         # T 20 and 100 only, one seed (~2 min)

Task: recall the first token. Inputs (B, T, 3): channel 0 is the label bit as ±1 at step 0 only, channel 1 a
start marker at step 0, channel 2 N(0, 1) noise at every step (a distractor). Label: the bit. Model: nn.LSTM or
nn.GRU (1 layer, default init, batch_first) and a linear head on the last step; fresh batches of 64, Adam lr
3e-3, held-out accuracy on 512 samples every 25 steps, stopped after three checks in a row at ≥ 0.98. For each
run: gradcheck's through-time ratio at init (GC008's ``attenuation``, ‖∂L/∂x_0‖/‖∂L/∂x_T‖) and whether the
model learned. The table goes to bench/results/rnn_trainability.md (docs/calibration.md, "Gated cells").
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gradcheck_cli.api import check  # noqa: E402
from gradcheck_cli.load.batch import Batch  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "rnn_trainability.md"
SWEEP = [  # (cells, hidden sizes, lengths, seeds, max Adam steps)
    (("LSTM", "GRU"), (32,), (10, 20, 30, 50), (0, 1, 2), 3000),
    (("LSTM", "GRU"), (64,), (20, 30), (0, 1), 3000),
    (("LSTM",), (32,), (25,), (0, 1), 3000),
    (("GRU",), (32,), (40,), (0, 1), 3000),
    (("LSTM", "GRU"), (32,), (100, 200), (0, 1), 1500),
    (("LSTM", "GRU"), (32,), (400,), (0, 1), 1000),
]
QUICK = [(("LSTM", "GRU"), (32,), (20, 100), (0,), 1500)]


class Recall(nn.Module):
    def __init__(self, cell: str, hidden: int) -> None:
        super().__init__()
        self.rnn = getattr(nn, cell)(3, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def task(batch: int, steps: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    bit = torch.randint(0, 2, (batch,), generator=generator)
    x = torch.zeros(batch, steps, 3)
    x[:, 0, 0] = bit.float() * 2 - 1
    x[:, 0, 1] = 1.0
    x[:, :, 2] = torch.randn(batch, steps, generator=generator)
    return x, bit


def ratio_at_init(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float | None, str]:
    """GC008's attenuation and severity ("none" when the ratio is above the vanishing threshold)."""
    report = check(model, Batch(args=(x,), target=y), verify=False)
    found = next((f for f in report.findings if f.code == "GC008"), None)
    if found is None:
        profile = next(layer.time_grad_norms for layer in report.layers if layer.time_grad_norms)
        return profile[0] / profile[-1], "none"
    return float(found.evidence["attenuation"]), found.severity.value  # type: ignore[arg-type]


def run(cell: str, hidden: int, steps: int, seed: int, max_steps: int) -> dict[str, object]:
    torch.manual_seed(seed)
    model = Recall(cell, hidden)
    generator = torch.Generator().manual_seed(1000 + seed)
    ratio, severity = ratio_at_init(model, *task(64, steps, generator))
    held_x, held_y = task(512, steps, torch.Generator().manual_seed(999))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    started, in_a_row, reached, accuracy, step = time.perf_counter(), 0, None, 0.5, 0
    for step in range(1, max_steps + 1):
        x, y = task(64, steps, generator)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if step % 25:
            continue
        with torch.no_grad():
            accuracy = (model(held_x).argmax(1) == held_y).float().mean().item()
        in_a_row = in_a_row + 1 if accuracy >= 0.98 else 0
        reached = (reached or step) if accuracy >= 0.98 else None
        if in_a_row >= 3:
            break
    return {
        "cell": cell, "hidden": hidden, "steps": steps, "seed": seed, "ratio": ratio, "severity": severity,
        "accuracy": round(accuracy, 3), "steps_to_098": reached, "steps_run": step,
        "seconds": round(time.perf_counter() - started, 1),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="T 20 and 100, one seed")
    parser.add_argument("--write", type=Path, default=None, help=f"write the table here (e.g. {RESULTS})")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for cells, hiddens, lengths, seeds, max_steps in QUICK if args.quick else SWEEP:
        for steps in lengths:
            for cell in cells:
                for hidden in hiddens:
                    for seed in seeds:
                        rows.append(run(cell, hidden, steps, seed, max_steps))
                        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    lines = [
        "| cell | hidden | T | seed | ratio at init | GC008 | accuracy | steps to 0.98 | steps run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['cell']} | {r['hidden']} | {r['steps']} | {r['seed']} | {r['ratio']:.2g} | {r['severity']} | "
            f"{r['accuracy']:.3f} | {r['steps_to_098'] or '–'} | {r['steps_run']} |"
        )
    table = "\n".join(lines) + "\n"
    print(table)
    if args.write:
        args.write.write_text(table, encoding="utf-8")


if __name__ == "__main__":
    main()
