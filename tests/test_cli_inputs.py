"""End-to-end: more checkpoint kinds, every batch source, and the bad-input catalogue (issue 3).

Real files written by the tests, the real CLI in subprocesses (run in parallel per fixture).
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import cli_models
from cli_support import (
    CHECKPOINT_SEED,
    assert_one_line_error,
    checkpoint_state,
    hashes,
    json_report,
    run_many,
    show,
)

TINY = ["-m", "cli_models:make_tiny"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("inputs")
    state = checkpoint_state()
    torch.save(state, work / "tiny_sd.pt")
    torch.save(state, work / "legacy.pt", _use_new_zipfile_serialization=False)
    save_file(state, str(work / "tiny.safetensors"))
    lightning = {
        "epoch": 3,
        "global_step": 120,
        "pytorch-lightning_version": "2.4.0",
        "state_dict": {f"model.{k}": v for k, v in state.items()},
        "hyper_parameters": {"lr": 0.001, "width": 16},
        "optimizer_states": [],
        "lr_schedulers": [],
    }
    torch.save(lightning, work / "run.ckpt")
    torch.save(cli_models.TokenNet().state_dict(), work / "tokens.pt")
    torch.save(cli_models.Nested().state_dict(), work / "nested.pt")
    for name in ("ArgmaxNet", "DetachedNet", "BufferOnly"):
        torch.save(getattr(cli_models, name)(), work / f"{name}.pt")
    torch.save(cli_models.make_tiny().requires_grad_(False), work / "frozen.pt")

    g = torch.Generator().manual_seed(CHECKPOINT_SEED)
    x = torch.randn(6, 8, generator=g)
    y = torch.randint(0, 4, (6,), generator=g)
    np.save(work / "x.npy", x.numpy())
    np.savez(work / "xy.npz", x.numpy(), y.numpy())
    np.savez(work / "named.npz", x=x.numpy())
    np.save(work / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    torch.save(x, work / "x.pt")
    torch.save(torch.randn(6, 5), work / "x5.pt")
    torch.save((x, torch.tensor([0, 1, 2, 3, 7, 1])), work / "bad_classes.pt")
    torch.save(torch.randn(0, 8), work / "no_samples.pt")
    np.savez(work / "gap.npz", arr_0=x.numpy(), arr_2=y.numpy())
    torch.save(cli_models.SparseBag(), work / "sparse.pt")

    (work / "empty.pt").write_bytes(b"")
    (work / "notes.txt").write_text("these are not weights\n")
    whole = (work / "tiny_sd.pt").read_bytes()
    (work / "truncated.pt").write_bytes(whole[: len(whole) // 2])
    (work / "no_config").mkdir()
    (work / "no_config" / "model.safetensors").write_bytes((work / "tiny.safetensors").read_bytes())
    with zipfile.ZipFile(work / "other.zip", "w") as archive:
        archive.writestr("readme.txt", "hello")

    before = hashes(work)
    commands: dict[str, list[Any]] = {
        "legacy": ["inspect", "legacy.pt", *TINY, "-i", "x.pt", "-f", "json"],
        "safetensors": ["inspect", "tiny.safetensors", *TINY, "-i", "x.pt", "-f", "json"],
        "safetensors_no_model": ["inspect", "tiny.safetensors", "-i", "x.pt"],
        "lightning": ["inspect", "run.ckpt", *TINY, "-i", "x.pt", "-f", "json"],
        "npy": ["inspect", "tiny_sd.pt", *TINY, "-i", "x.npy", "-f", "json"],
        "npz_tuple": ["inspect", "tiny_sd.pt", *TINY, "-i", "xy.npz", "-f", "json"],
        "npz_named": ["inspect", "tiny_sd.pt", *TINY, "-i", "named.npz", "-f", "json"],
        "npy_objects": ["inspect", "tiny_sd.pt", *TINY, "-i", "objects.npy"],
        "shape": ["inspect", "tiny_sd.pt", *TINY, "--input-shape", "3,8", "-f", "json"],
        "shape_int": [
            "inspect",
            "tokens.pt",
            "-m",
            "cli_models:TokenNet",
            "--input-shape",
            "4,7",
            "--input-dtype",
            "int64",
            "-f",
            "json",
        ],
        "inferred_tokens": ["inspect", "tokens.pt", "-m", "cli_models:TokenNet", "-f", "json"],
        "bad_shape": ["inspect", "tiny_sd.pt", *TINY, "--input-shape", "3,x"],
        "bad_dtype": ["inspect", "tiny_sd.pt", *TINY, "--input-shape", "3,8", "--input-dtype", "complex7"],
        "shape_and_input": ["inspect", "tiny_sd.pt", *TINY, "--input-shape", "3,8", "-i", "x.pt"],
        "empty": ["inspect", "empty.pt", *TINY],
        "text": ["inspect", "notes.txt", *TINY],
        "truncated": ["inspect", "truncated.pt", *TINY],
        "dir_without_config": ["inspect", "no_config", *TINY],
        "other_zip": ["inspect", "other.zip", *TINY],
        "npz_as_checkpoint": ["inspect", "xy.npz", *TINY],
        "nested_raises": ["inspect", "nested.pt", "-m", "cli_models:Nested", "-i", "x.pt"],
        "wrong_width": ["inspect", "tiny_sd.pt", *TINY, "-i", "x5.pt"],
        "wrong_width_debug": ["inspect", "tiny_sd.pt", *TINY, "-i", "x5.pt", "--debug"],
        "argmax": ["inspect", "ArgmaxNet.pt", "--trust", "-i", "x.pt"],
        "detached": ["inspect", "DetachedNet.pt", "--trust", "-i", "x.pt"],
        "buffer_only": ["inspect", "BufferOnly.pt", "--trust", "-i", "x.pt"],
        "frozen": ["inspect", "frozen.pt", "--trust", "-i", "x.pt"],
        "frozen_unfreeze": ["inspect", "frozen.pt", "--trust", "-i", "x.pt", "--unfreeze", "-f", "json"],
        "factory_not_module": ["inspect", "tiny_sd.pt", "-m", "cli_models:make_not_a_module", "-i", "x.pt"],
        "factory_missing": ["inspect", "tiny_sd.pt", "-m", "no_such_package.nets:build", "-i", "x.pt"],
        "factory_bad_spec": ["inspect", "tiny_sd.pt", "-m", "just_a_name", "-i", "x.pt"],
        "factory_bad_name": ["inspect", "tiny_sd.pt", "-m", f"{cli_models.__file__}:bad-name", "-i", "x.pt"],
        "factory_exits": ["inspect", "tiny_sd.pt", "-m", "cli_models:make_exiting", "-i", "x.pt"],
        "bad_classes": ["inspect", "tiny_sd.pt", *TINY, "-i", "bad_classes.pt"],
        "no_samples": ["inspect", "tiny_sd.pt", *TINY, "-i", "no_samples.pt"],
        "gap_npz": ["inspect", "tiny_sd.pt", *TINY, "-i", "gap.npz", "-f", "json"],
        "sparse": ["inspect", "sparse.pt", "--trust", "--input-shape", "4,6", "--input-dtype", "int64", "-f", "json"],
        "meta_device": ["inspect", "tiny_sd.pt", *TINY, "-i", "x.pt", "--device", "meta"],
        "huge_seed": ["inspect", "tiny_sd.pt", *TINY, "-i", "x.pt", "--seed", "99999999999999999999"],
        "overwrite": ["inspect", "tiny_sd.pt", *TINY, "-i", "x.pt", "-o", "tiny_sd.pt"],
        "example_with_input": ["inspect", "--example", "residual", "-i", "x.pt"],
    }
    results = run_many(commands, cwd=work)
    return {"dir": work, "before": before, "after": hashes(work), **results}


def test_user_files_are_untouched_and_nothing_is_created(runs: dict[str, Any]) -> None:
    assert runs["after"] == runs["before"]


@pytest.mark.parametrize("name", ["legacy", "safetensors", "lightning"])
def test_other_checkpoint_kinds_load_the_saved_weights(runs: dict[str, Any], name: str) -> None:
    report = json_report(runs[name])
    expected = {"legacy": "state_dict", "safetensors": "safetensors", "lightning": "training_checkpoint"}[name]
    assert report["run"]["checkpoint_kind"] == expected
    state = checkpoint_state()
    assert report["layers"][0]["weight_norm"] == pytest.approx(
        float(torch.cat([state["fc1.weight"].flatten(), state["fc1.bias"]]).norm()), rel=1e-5
    )
    if name == "lightning":
        assert any("Lightning" in note for note in report["notes"])
        assert any("'model.'" in note for note in report["notes"])


def test_safetensors_without_model_asks_for_it(runs: dict[str, Any]) -> None:
    assert_one_line_error(runs["safetensors_no_model"], "--model")


def test_numpy_batches(runs: dict[str, Any]) -> None:
    npy = json_report(runs["npy"])
    assert npy["run"]["batch"] == "float32[6, 8]" and npy["run"]["loss_kind"] == "random_projection"
    assert npy["run"]["batch_source"].startswith("--input")
    npz = json_report(runs["npz_tuple"])
    assert npz["run"]["loss_kind"] == "cross_entropy"
    named = json_report(runs["npz_named"])
    assert named["run"]["batch"] == "x=float32[6, 8]"


def test_numpy_object_array_is_refused_without_unpickling(runs: dict[str, Any]) -> None:
    assert_one_line_error(runs["npy_objects"], "objects.npy", "without pickle")


def test_input_shape_builds_a_random_batch_and_says_so(runs: dict[str, Any]) -> None:
    report = json_report(runs["shape"])
    assert report["run"]["batch"] == "float32[3, 8]"
    assert report["run"]["batch_source"] == "random float32[3, 8] from --input-shape"
    tokens = json_report(runs["shape_int"])
    assert tokens["run"]["batch"] == "int64[4, 7]"


def test_batch_inferred_from_a_first_embedding_layer(runs: dict[str, Any]) -> None:
    report = json_report(runs["inferred_tokens"])
    assert report["run"]["batch"] == "int64[8, 16]"
    assert "first layer embed (Embedding)" in report["run"]["batch_source"]


@pytest.mark.parametrize(
    ("name", "needles"),
    [
        ("bad_shape", ["--input-shape", "comma-separated"]),
        ("bad_dtype", ["--input-dtype", "complex7"]),
        ("shape_and_input", ["--input or --input-shape"]),
        ("empty", ["empty.pt", "empty (0 bytes)"]),
        ("text", ["notes.txt", "not a PyTorch checkpoint"]),
        ("truncated", ["truncated.pt", "damaged zip archive"]),
        ("dir_without_config", ["no_config", "without config.json"]),
        ("other_zip", ["other.zip", "not a PyTorch checkpoint"]),
        ("npz_as_checkpoint", ["NumPy .npz archive", "--input"]),
        ("nested_raises", ["forward pass raised in decoder.0 (Linear)", "the batch is float32[6, 8]"]),
        ("wrong_width", ["expects in_features=8", "float32[6, 5]"]),
        ("argmax", ["no floating-point output depends on its parameters"]),
        ("detached", ["no floating-point output depends on its parameters"]),
        ("buffer_only", ["no floating-point parameters"]),
        ("frozen", ["no trainable parameters", "--unfreeze"]),
        ("factory_bad_name", ["bad-name"]),
        ("factory_exits", ["SystemExit"]),
        ("bad_classes", ["class indices in the target run from 0 to 7", "4 classes"]),
        ("no_samples", ["the batch is empty (float32[0, 8])"]),
        ("meta_device", ["--device meta"]),
        ("overwrite", ["--output tiny_sd.pt is one of the input files"]),
        ("example_with_input", ["--example brings its own model and batch; drop --input"]),
        ("factory_not_module", ["returned a int, not an nn.Module"]),
        ("factory_missing", ["no_such_package"]),
        ("factory_bad_spec", ["package.module:factory"]),
    ],
)
def test_bad_input_is_one_line_exit_2(runs: dict[str, Any], name: str, needles: list[str]) -> None:
    assert_one_line_error(runs[name], *needles)


def test_npz_with_gaps_in_the_positional_names_keeps_their_order(runs: dict[str, Any]) -> None:
    report = json_report(runs["gap_npz"])
    # arr_0 (the float inputs) then arr_2 (the int64 class indices): the target, so cross-entropy
    assert report["run"]["batch"] == "float32[6, 8], target int64[6]"
    assert report["run"]["loss_kind"] == "cross_entropy"


def test_sparse_embedding_gradients_are_measured(runs: dict[str, Any]) -> None:
    report = json_report(runs["sparse"])
    embed = next(layer for layer in report["layers"] if layer["name"] == "embed")
    assert embed["grad_norm"] > 0


def test_out_of_range_seed_is_a_usage_error(runs: dict[str, Any]) -> None:
    proc = runs["huge_seed"]
    assert proc.returncode == 2 and "--seed" in proc.stderr and "Traceback" not in proc.stderr


def test_unfreeze_measures_a_fully_frozen_model(runs: dict[str, Any]) -> None:
    report = json_report(runs["frozen_unfreeze"])
    assert [layer["name"] for layer in report["layers"]] == ["fc1", "fc2"]
    # reported as frozen, yet measured: --unfreeze gave every layer a gradient
    assert all(layer["frozen"] and layer["grad_norm"] > 0 for layer in report["layers"]), report["layers"]
    assert any("requires_grad=False" in note for note in report["notes"])


def test_debug_shows_the_traceback_behind_an_input_error(runs: dict[str, Any]) -> None:
    proc = runs["wrong_width_debug"]
    assert proc.returncode == 2, show(proc)
    assert "Traceback" in proc.stderr
    assert proc.stderr.rstrip().splitlines()[-1].startswith("error: the forward pass raised")


def test_truncated_zip_sniffed_by_content_not_name(tmp_path: Path) -> None:
    from gradcheck_cli.errors import CheckpointError
    from gradcheck_cli.load.sniff import Kind, sniff

    renamed = tmp_path / "weights.bin"
    torch.save(checkpoint_state(), renamed)
    assert sniff(renamed) is Kind.TORCH_ZIP
    scripted = tmp_path / "model.safetensors"
    torch.jit.script(cli_models.make_tiny()).save(str(scripted))
    assert sniff(scripted) is Kind.TORCHSCRIPT
    with pytest.raises(CheckpointError, match="git lfs pull"):
        lfs = tmp_path / "lfs.pt"
        lfs.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 1\n")
        sniff(lfs)
