"""``torch.distributed.checkpoint`` (DCP) directories, written by the real ``dcp.save``.

One-process checkpoints are saved without a process group; the sharded one is written by two gloo
processes whose parameters FSDP2 (``fully_shard``) split between them. Loads are compared with the
original weights exactly; the command line runs in subprocesses (``cli_support.run_many``). The
"harmless custom class" planted in metadata and entries writes a marker file when it is unpickled,
so a test can prove its code never ran.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
import random
import shutil
import sys
import textwrap
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch import nn

import cli_models
from cli_support import (
    Proc,
    assert_healthy_tiny_net,
    assert_one_line_error,
    assert_weights_from,
    checkpoint_model,
    checkpoint_state,
    json_report,
    run_many,
    save_inputs,
    sha256,
    show,
)
from gradcheck_cli.errors import CheckpointError, GradcheckError, UntrustedCheckpointError
from gradcheck_cli.load import Kind, load_checkpoint
from gradcheck_cli.load.dcp_metadata import _MetadataUnpickler
from gradcheck_cli.load.sniff import sniff

MARKER_MODULE = "gradcheck_dcp_marker"
MARKER_SOURCE = '''
from pathlib import Path


class Marker:
    """Harmless, except that unpickling it writes a file: the proof that its code ran."""

    def __init__(self, path):
        self.path = path

    def __setstate__(self, state):
        Path(state["path"]).write_text("ran")
        self.__dict__.update(state)
'''

ARCH_SOURCE = '''
import torch
from torch import nn

import cli_models


def tiny():
    return cli_models.make_tiny()


def wide():
    return cli_models.TinyNet(width=32)


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.BatchNorm1d(16), nn.Linear(16, 4))


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=32, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


class Scaled(nn.Module):
    """A module with extra state (a non-tensor state_dict entry)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)
        self.scale = 1.0

    def get_extra_state(self):
        return self.scale  # DCP stores a dict flattened into keys; a plain value stays one entry

    def set_extra_state(self, state):
        self.scale = state

    def forward(self, x):
        return self.fc(x) * self.scale


def scaled():
    return Scaled()
'''


# --------------------------------------------------------------------------- helpers


def save(state: dict[str, Any], directory: Path) -> Path:
    """``dcp.save`` in this process (no process group: DCP warns and saves alone)."""
    directory.mkdir(parents=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=directory)
    return directory


def snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """Hash and mtime of every file under ``root`` and mtime of every folder (a new file changes both)."""
    entries = {".": ("dir", root.stat().st_mtime_ns)}
    for path in sorted(root.rglob("*")):
        kind = sha256(path) if path.is_file() else "dir"
        entries[str(path.relative_to(root))] = (kind, path.stat().st_mtime_ns)
    return entries


def marker_module(directory: Path) -> ModuleType:
    """The module holding ``Marker``, importable here and (from ``directory`` as cwd) by the CLI."""
    source = directory / f"{MARKER_MODULE}.py"
    source.write_text(MARKER_SOURCE, encoding="utf-8")
    spec = importlib.util.spec_from_file_location(MARKER_MODULE, source)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[MARKER_MODULE] = module  # pickle finds classes by module name
    spec.loader.exec_module(module)
    return module


def plant_in_metadata(source: Path, target: Path, payload: Any) -> Path:
    """A copy of the DCP directory ``source`` whose ``.metadata`` also pickles ``payload``."""
    shutil.copytree(source, target)
    with (target / ".metadata").open("rb") as handle:
        metadata = pickle.load(handle)  # the test's own, trusted file
    metadata.storage_meta.modules = [payload]
    with (target / ".metadata").open("wb") as handle:
        pickle.dump(metadata, handle)
    return target


def trained_tiny() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """TinyNet weights and Adam state after one step."""
    model = checkpoint_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model(torch.randn(4, cli_models.IN_FEATURES)).pow(2).sum().backward()
    optimizer.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, optimizer.state_dict()


def assert_same_weights(module: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    state = module.state_dict()
    assert set(state) == set(expected)
    for key, tensor in expected.items():
        assert state[key].dtype == tensor.dtype, key
        assert torch.equal(state[key], tensor), key


# --------------------------------------------------------------------------- a checkpoint written by 2 ranks


def _fsdp_rank(rank: int, directory: str, rendezvous: str) -> None:
    """One of two gloo ranks: FSDP2-shard a TinyNet, take one Adam step, save with DCP (and the full weights)."""
    warnings.simplefilter("ignore")
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=2)
    try:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict
        from torch.distributed.fsdp import fully_shard

        model = checkpoint_model()  # the same seeded weights on both ranks
        fully_shard(model.fc1)
        fully_shard(model.fc2)
        fully_shard(model)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        torch.manual_seed(rank)
        model(torch.randn(4, cli_models.IN_FEATURES)).pow(2).sum().backward()
        optimizer.step()
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            torch.save(full, Path(directory).parent / "fsdp_full.pt")
        model_state, optimizer_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=directory)
    finally:
        dist.destroy_process_group()
    # torch 2.13 sometimes aborts a gloo rank at interpreter teardown ("terminate called without an active
    # exception") after everything was written; leave without the teardown so that spawn sees exit 0
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@pytest.fixture(scope="module")
def fsdp_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A DCP directory written by 2 FSDP2 ranks, and the unsharded weights it holds."""
    base = tmp_path_factory.mktemp("fsdp")
    directory = base / "ckpt"
    directory.mkdir()
    mp.spawn(_fsdp_rank, args=(str(directory), f"file://{base / 'rendezvous'}"), nprocs=2)
    full = torch.load(base / "fsdp_full.pt", weights_only=True)
    return directory, full


# --------------------------------------------------------------------------- in one process


@pytest.fixture(scope="module")
def arch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``arch.py`` with the --model factories."""
    path = tmp_path_factory.mktemp("arch") / "arch.py"
    path.write_text(textwrap.dedent(ARCH_SOURCE), encoding="utf-8")
    return path


def test_plain_state_dict_loads_exactly(tmp_path: Path, arch: Path) -> None:
    torch.manual_seed(3)
    source = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.BatchNorm1d(16), nn.Linear(16, 4))
    source(torch.randn(5, 8))  # running statistics and num_batches_tracked (int64) move away from init
    expected = {k: v.clone() for k, v in source.state_dict().items()}
    directory = save(source.state_dict(), tmp_path / "model.safetensors")  # a name that lies: content decides
    assert sniff(directory) is Kind.DCP
    before = snapshot(directory)
    loaded = load_checkpoint(directory, model_spec=f"{arch}:mlp", trust=False)
    assert loaded.kind == "dcp"
    assert loaded.trained is None
    assert loaded.notes == ()
    assert_same_weights(loaded.module, expected)
    assert snapshot(directory) == before


def test_model_and_optimizer_dict_loads_model_weights_and_counts_as_trained(tmp_path: Path, arch: Path) -> None:
    state, optimizer_state = trained_tiny()
    directory = save({"model": state, "optimizer": optimizer_state, "step": 7}, tmp_path / "ckpt")
    loaded = load_checkpoint(directory, model_spec=f"{arch}:tiny", trust=False)
    assert_same_weights(loaded.module, state)
    assert loaded.trained is not None
    assert "optimizer state ('optimizer')" in loaded.trained
    assert "step 7" in loaded.trained  # a python int, read tensors-only
    assert any("stripped key prefix 'model.'" in note for note in loaded.notes), loaded.notes
    assert any("of optimizer state (under 'optimizer')" in note for note in loaded.notes), loaded.notes


def test_get_model_state_dict_checkpoint_loads(tmp_path: Path, arch: Path) -> None:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    model = checkpoint_model()
    directory = save(get_model_state_dict(model), tmp_path / "ckpt")
    loaded = load_checkpoint(directory, model_spec=f"{arch}:tiny", trust=False)
    assert_same_weights(loaded.module, checkpoint_state())
    assert loaded.trained is None


def test_tiny_gpt2_loads_exactly(tmp_path: Path, arch: Path) -> None:
    pytest.importorskip("transformers")
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(11)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=32, bos_token_id=0, eos_token_id=0)
    source = GPT2LMHeadModel(config)
    expected = {k: v.clone() for k, v in source.state_dict().items()}
    directory = save(source.state_dict(), tmp_path / "gpt2")
    loaded = load_checkpoint(directory, model_spec=f"{arch}:gpt2", trust=False)
    assert type(loaded.module).__name__ == "GPT2LMHeadModel"
    assert_same_weights(loaded.module, expected)
    assert loaded.module.lm_head.weight is loaded.module.transformer.wte.weight  # still tied


def test_fsdp2_checkpoint_from_two_ranks_loads_unsharded(
    fsdp_checkpoint: tuple[Path, dict[str, torch.Tensor]], arch: Path
) -> None:
    directory, full = fsdp_checkpoint
    with (directory / ".metadata").open("rb") as handle:
        metadata = _MetadataUnpickler(handle).load()
    files = {info.relative_path for index, info in metadata.storage_data.items() if index.fqn == "model.fc1.weight"}
    assert files == {"__0_0.distcp", "__1_0.distcp"}, "each rank wrote its own shard of fc1.weight"
    before = snapshot(directory)
    loaded = load_checkpoint(directory, model_spec=f"{arch}:tiny", trust=False)
    assert_same_weights(loaded.module, full)
    assert loaded.trained is not None and "optimizer state" in loaded.trained
    assert snapshot(directory) == before


def test_restricted_unpickler_reads_real_metadata_like_pickle(
    fsdp_checkpoint: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    mixed = {
        "half": torch.randn(3, 4).half(),
        "bf16": torch.randn(2).bfloat16(),
        "ids": torch.arange(5),
        "flags": torch.tensor([True, False]),
        "complex": torch.randn(2, dtype=torch.complex64),
        "image": torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last),
        "python": {"name": "x", "values": [1, 2.5, None]},
    }
    for directory in (fsdp_checkpoint[0], save(mixed, tmp_path / "mixed")):
        raw = (directory / ".metadata").read_bytes()
        with (directory / ".metadata").open("rb") as handle:
            restricted = _MetadataUnpickler(handle).load()
        assert restricted == pickle.loads(raw)


def test_sniff_needs_dcp_content(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"without config\.json"):
        sniff(tmp_path / "empty")
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / ".metadata").write_text("not a pickle")
    with pytest.raises(CheckpointError, match=r"without config\.json"):
        sniff(tmp_path / "text")


def test_non_tensor_entries_never_unpickled_without_trust(tmp_path: Path, arch: Path) -> None:
    marker = marker_module(tmp_path)
    ran = tmp_path / "ran"
    state = checkpoint_state()
    directory = save(
        {"model": state, "extra": marker.Marker(str(ran)), "step": marker.Marker(str(ran))}, tmp_path / "c"
    )
    loaded = load_checkpoint(directory, model_spec=f"{arch}:tiny", trust=False)
    assert not ran.exists(), "the custom class's code ran without --trust"
    assert_same_weights(loaded.module, state)
    assert any("'step' needs --trust" in note for note in loaded.notes), loaded.notes
    assert any("2 entries holding Python objects not read (first: 'extra')" in n for n in loaded.notes), loaded.notes
    assert loaded.trained is None


def test_extra_state_is_read_tensors_only_and_custom_classes_need_trust(tmp_path: Path, arch: Path) -> None:
    marker = marker_module(tmp_path)
    weights = {"fc.weight": torch.randn(4, 8), "fc.bias": torch.randn(4)}
    safe = save({**weights, "_extra_state": 2.5}, tmp_path / "safe")
    loaded = load_checkpoint(safe, model_spec=f"{arch}:scaled", trust=False)
    assert loaded.module.scale == 2.5  # set_extra_state ran
    assert torch.equal(loaded.module.fc.weight, weights["fc.weight"])
    assert torch.equal(loaded.module.fc.bias, weights["fc.bias"])
    ran = tmp_path / "ran"
    unsafe = save({**weights, "_extra_state": marker.Marker(str(ran))}, tmp_path / "unsafe")
    with pytest.raises(UntrustedCheckpointError, match=f"{MARKER_MODULE}.Marker.*--trust"):
        load_checkpoint(unsafe, model_spec=f"{arch}:scaled", trust=False)
    assert not ran.exists()


def test_metadata_naming_a_file_outside_the_directory_is_refused(tmp_path: Path, arch: Path) -> None:
    directory = save(checkpoint_state(), tmp_path / "ckpt")
    with (directory / ".metadata").open("rb") as handle:
        metadata = pickle.load(handle)
    for info in metadata.storage_data.values():
        info.relative_path = "../outside.distcp"
    with (directory / ".metadata").open("wb") as handle:
        pickle.dump(metadata, handle)
    with pytest.raises(CheckpointError, match="outside the checkpoint directory"):
        load_checkpoint(directory, model_spec=f"{arch}:tiny", trust=False)


def test_damaged_metadata_and_shards_raise_one_line_errors(
    tmp_path: Path, arch: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """Seeded byte mutations of ``.metadata`` and of a shard: a one-line GradcheckError or a load, nothing else."""
    source = save({"model": checkpoint_state(), "step": 3, "epoch": torch.tensor(2)}, tmp_path / "source")
    rng = random.Random(0)
    outcomes: set[str] = set()
    for case in range(240):
        target = tmp_path / f"case{case}"
        shutil.copytree(source, target)
        damaged = target / (".metadata" if case % 3 else "__0_0.distcp")
        data = bytearray(damaged.read_bytes())
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(len(data))
            choice = rng.random()
            if choice < 0.6:
                data[at] = rng.randrange(256)
            elif choice < 0.8:
                del data[at : at + rng.randint(1, 8)]
            else:
                data[at:at] = rng.randbytes(rng.randint(1, 4))
        damaged.write_bytes(bytes(data))
        try:
            load_checkpoint(target, model_spec=f"{arch}:tiny", trust=False)
            outcomes.add("loaded")
        except GradcheckError as exc:
            assert "\n" not in str(exc), str(exc)
            outcomes.add(type(exc).__name__)
        shutil.rmtree(target)
    assert "CheckpointError" in outcomes
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""


# --------------------------------------------------------------------------- the command line


@pytest.fixture(scope="module")
def cli(
    fsdp_checkpoint: tuple[Path, dict[str, torch.Tensor]], arch: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("dcp_cli")
    save_inputs(work)
    shutil.copy(arch, work / "arch.py")
    marker = marker_module(work)
    (work / "markers").mkdir()
    tiny = save(checkpoint_state(), work / "tiny")
    broken = checkpoint_model()
    with torch.no_grad():
        broken.fc1.weight[0, 0] = float("nan")
    save(broken.state_dict(), work / "nan")
    shutil.copytree(fsdp_checkpoint[0], work / "fsdp")
    shutil.copytree(fsdp_checkpoint[0], work / "missing")
    (work / "missing" / "__1_0.distcp").unlink()
    shutil.copytree(fsdp_checkpoint[0], work / "truncated")
    shard = work / "truncated" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    shutil.copytree(tiny, work / "no_metadata")
    (work / "no_metadata" / ".metadata").unlink()
    plant_in_metadata(tiny, work / "evil", marker.Marker(str(work / "markers" / "untrusted")))
    plant_in_metadata(tiny, work / "evil_trusted", marker.Marker(str(work / "markers" / "trusted")))
    dirs = ["tiny", "nan", "fsdp", "missing", "truncated", "no_metadata", "evil", "evil_trusted"]
    before = {name: snapshot(work / name) for name in dirs}
    tiny_args = ["-m", "arch.py:tiny", "-f", "json"]
    runs = run_many(
        {
            "tiny": ["inspect", "tiny", "-i", "x.pt", *tiny_args],
            "fsdp": ["inspect", "fsdp", "-i", "xy_index.pt", *tiny_args],
            "nan": ["inspect", "nan", "-i", "x.pt", *tiny_args],
            "no_model": ["inspect", "tiny", "-i", "x.pt"],
            "wide": ["inspect", "tiny", "-i", "x.pt", "-m", "arch.py:wide"],
            "missing": ["inspect", "missing", "-i", "x.pt", *tiny_args],
            "truncated": ["inspect", "truncated", "-i", "x.pt", *tiny_args],
            "no_metadata": ["inspect", "no_metadata", "-i", "x.pt", *tiny_args],
            "evil": ["inspect", "evil", "-i", "x.pt", *tiny_args],
            "evil_trusted": ["inspect", "evil_trusted", "-i", "x.pt", "--trust", *tiny_args],
        },
        cwd=work,
    )
    return {"work": work, "dirs": dirs, "before": before, "full": fsdp_checkpoint[1], **runs}


def test_cli_loads_a_dcp_directory(cli: dict[str, Any]) -> None:
    report = json_report(cli["tiny"], exit_code=0)
    assert report["run"]["checkpoint_kind"] == "dcp"
    assert report["run"]["model_type"] == "TinyNet"
    assert_healthy_tiny_net(report)
    assert_weights_from(report, checkpoint_state())


def test_cli_loads_the_two_rank_fsdp_checkpoint(cli: dict[str, Any]) -> None:
    report = json_report(cli["fsdp"], exit_code=0)
    assert report["run"]["loss_kind"] == "cross_entropy"
    assert_weights_from(report, cli["full"])
    assert any("stripped key prefix 'model.'" in note for note in report["notes"]), report["notes"]


def test_cli_fails_the_gate_on_broken_weights(cli: dict[str, Any]) -> None:
    report = json_report(cli["nan"], exit_code=1)
    assert "non_finite" in report["problems"]


def test_cli_asks_for_the_architecture(cli: dict[str, Any]) -> None:
    assert_one_line_error(cli["no_model"], "holds weights only", "--model")
    assert_one_line_error(cli["wide"], "do not fit the --model architecture", "shape mismatch at fc1.weight")


def test_cli_names_the_missing_shard(cli: dict[str, Any]) -> None:
    line = assert_one_line_error(cli["missing"], "incomplete", "__1_0.distcp", "missing")
    assert "__0_0.distcp" not in line


def test_cli_names_the_truncated_shard(cli: dict[str, Any]) -> None:
    assert_one_line_error(cli["truncated"], "incomplete", "__0_0.distcp", "truncated")


def test_cli_says_a_missing_metadata_means_an_unfinished_save(cli: dict[str, Any]) -> None:
    assert_one_line_error(cli["no_metadata"], "incomplete", ".metadata is written last by rank 0")


def test_cli_refuses_metadata_with_a_foreign_class(cli: dict[str, Any]) -> None:
    assert_one_line_error(cli["evil"], ".metadata", f"{MARKER_MODULE}.Marker", "--trust")
    assert not (cli["work"] / "markers" / "untrusted").exists(), "the planted class's code ran"


def test_cli_with_trust_unpickles_metadata_fully(cli: dict[str, Any]) -> None:
    report = json_report(cli["evil_trusted"], exit_code=0)
    assert_weights_from(report, checkpoint_state())
    assert (cli["work"] / "markers" / "trusted").exists(), show(cli["evil_trusted"])


def test_cli_leaves_every_checkpoint_directory_untouched(cli: dict[str, Any]) -> None:
    runs: list[Proc] = [cli[name] for name in ("tiny", "fsdp", "missing", "evil")]
    assert all(run.returncode in (0, 2) for run in runs)
    for name in cli["dirs"]:
        assert snapshot(cli["work"] / name) == cli["before"][name], name
