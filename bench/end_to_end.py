"""``gradcheck inspect`` of a saved 124M GPT-2 end to end, against a bare script that only loads and runs
forward+backward, each in a fresh process.

    python bench/end_to_end.py [--reps 3]

Saves ``GPT2LMHeadModel(GPT2Config())`` (random init, no download) with ``save_pretrained`` and a 2×128
token batch into a temporary directory, then alternates: (1) the bare script — import torch and
transformers, ``from_pretrained`` the directory, one forward+backward — and (2) ``gradcheck inspect DIR
--input batch.pt --no-verify --format json --profile``, whose JSON ``timing`` block splits the run into
start-up, import, load, probe, diagnose and render. Wall times are of the whole process.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BARE = """
import time, sys
t0 = time.perf_counter()
import torch
from transformers import GPT2LMHeadModel
t1 = time.perf_counter()
model = GPT2LMHeadModel.from_pretrained(sys.argv[1])
batch = torch.load(sys.argv[2], weights_only=True)
model.train()
t2 = time.perf_counter()
model(**batch).loss.backward()
t3 = time.perf_counter()
print(f"{t1 - t0} {t2 - t1} {t3 - t2}")
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "gpt2"
        torch.manual_seed(0)
        GPT2LMHeadModel(GPT2Config()).save_pretrained(directory)
        ids = torch.randint(0, 50257, (2, 128))
        torch.save({"input_ids": ids, "labels": ids}, Path(tmp) / "batch.pt")
        walls: dict[str, list[float]] = {"bare": [], "gradcheck": []}
        bare_split: list[list[float]] = []
        timing: list[dict[str, float]] = []
        for _ in range(args.reps):
            start = time.perf_counter()
            out = subprocess.run(
                [sys.executable, "-c", BARE, str(directory), str(Path(tmp) / "batch.pt")],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            walls["bare"].append(time.perf_counter() - start)
            bare_split.append([float(v) for v in out.stdout.split()])
            start = time.perf_counter()
            out = subprocess.run(
                [sys.executable, "-m", "gradcheck_cli", "inspect", str(directory), "--input",
                 str(Path(tmp) / "batch.pt"), "--no-verify", "--format", "json", "--profile"],
                capture_output=True, text=True,
            )  # fmt: skip
            walls["gradcheck"].append(time.perf_counter() - start)
            if out.returncode not in (0, 1):
                raise SystemExit(out.stderr)
            phases = dict(json.loads(out.stdout)["timing"])
            line = next(line for line in out.stderr.splitlines() if line.startswith("profile:"))
            phases["render"] = float(line.split("render ")[1].split(" s")[0])  # after the JSON was written
            timing.append(phases)
    median = statistics.median
    bare = [median(column) for column in zip(*bare_split, strict=True)]
    phases = {name: median(t.get(name, 0.0) for t in timing) for name in timing[0]}
    print(f"{args.reps} runs each, medians; torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| | wall | import | load | forward+backward / probe | diagnose | render |")
    print("|---|---|---|---|---|---|---|")
    print(f"| bare script | {median(walls['bare']):.2f} s | {bare[0]:.2f} s | {bare[1]:.2f} s | {bare[2]:.2f} s | – | – |")
    print(
        f"| gradcheck inspect | {median(walls['gradcheck']):.2f} s | {phases.get('startup', 0) + phases['import']:.2f} s "
        f"| {phases['load']:.2f} s | {phases['probe']:.2f} s | {phases['diagnose']:.2f} s | "
        f"{phases.get('render', 0.0):.2f} s |"
    )


if __name__ == "__main__":
    main()
