"""A small file that takes the machine (issue 16, section 3): sizes are checked before anything is allocated.

Every hostile input is built here, at test time: a torch zip whose data record is a deflate bomb, an ``.npz``
bomb and an ``.npy`` header declaring a huge shape, a stride-0 batch tensor declaring ``float32[1e8, 4]``, a
legacy torch file whose pickle declares a huge storage, a ``.pt2`` and a TorchScript archive carrying bombs, a
Hugging Face ``config.json`` with ``n_layer: 20000`` beside small weights, and FIFOs and devices where files
belong. Runs that would allocate gigabytes without the checks are real subprocesses whose peak resident memory
(``os.wait4``) and wall time are measured; each must exit 2 with one line, small and fast.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import cli_models
from cli_support import CLI_ENV, Proc, assert_one_line_error, run_cli, show
from gradcheck_cli.errors import GradcheckError
from gradcheck_cli.load.limits import GiB, MiB, format_bytes, parse_size, set_memory_budget, use_memory_budget

BOMB = 1 * GiB
"""What each bomb declares (and, for deflated ones, really expands to): far beyond what a run needs."""
BUDGET = "4GiB"
"""GRADCHECK_MAX_MEMORY for every run: the budget 4 GiB, the expansion allowance 64 MiB, on any machine."""
MAX_RSS = 800 * MiB
"""Peak resident memory of a refused run: torch's start-up is ~300 MiB; any bomb would add at least 1 GiB."""
MAX_RSS_HF = 1 * GiB
"""The same with transformers imported and the architecture sized on the meta device (~450 MiB)."""
HANG_S = 90.0
"""A run still going after this long is killed and counts as a hang."""
MODEL = "cli_models:make_tiny"


# --------------------------------------------------------------------------- running and measuring


CHILD = """
import atexit, os, runpy, sys

def report_peak():
    # VmHWM belongs to the address space exec created: unlike getrusage's ru_maxrss, it does not inherit the
    # peak of the (large) test process this child was forked from
    with open("/proc/self/status") as status, open(os.environ["HOSTILE_PEAK_FILE"], "w") as out:
        out.write(next(line.split()[1] for line in status if line.startswith("VmHWM:")))

if os.path.exists("/proc/self/status"):
    atexit.register(report_peak)
sys.argv = ["gradcheck", *sys.argv[1:]]
runpy.run_module("gradcheck_cli", run_name="__main__")
"""


def run_measured(args: Sequence[Any], cwd: Path) -> tuple[Proc, float, int | None]:
    """``gradcheck ARGS`` in a subprocess: the finished run, its wall time, and its peak resident memory in bytes
    (None where ``/proc`` cannot tell)."""
    argv = [sys.executable, "-c", CHILD, *(str(a) for a in args)]
    with tempfile.TemporaryDirectory() as scratch:
        peak_file = Path(scratch) / "peak"
        env = {**CLI_ENV, "GRADCHECK_MAX_MEMORY": BUDGET, "HOSTILE_PEAK_FILE": str(peak_file)}
        start = time.monotonic()
        try:
            proc = subprocess.run(
                argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, cwd=cwd, env=env, timeout=HANG_S
            )
        except subprocess.TimeoutExpired:
            pytest.fail(f"gradcheck {' '.join(str(a) for a in args)} still ran after {HANG_S:.0f} s (a hang)")
        elapsed = time.monotonic() - start
        peak = int(peak_file.read_text()) * 1024 if peak_file.exists() else None  # /proc reports kB
    return proc, elapsed, peak


def assert_refused_small(
    args: Sequence[Any], cwd: Path, *needles: str, max_rss: int = MAX_RSS, max_s: float = HANG_S
) -> str:
    """The run exits 2 with one line holding ``needles``, stays under ``max_rss`` and ends within ``max_s``."""
    proc, elapsed, rss = run_measured(args, cwd)
    line = assert_one_line_error(proc, *needles)
    assert rss is None or rss < max_rss, f"peak RSS {format_bytes(rss or 0)}{show(proc)}"
    assert elapsed < max_s, f"took {elapsed:.1f} s{show(proc)}"
    return line


# --------------------------------------------------------------------------- building hostile files


def write_deflated(archive: zipfile.ZipFile, name: str, size: int) -> None:
    """A member of ``size`` zero bytes, deflated (about 1/230 of that on disk at level 1), streamed."""
    info = zipfile.ZipInfo(name)
    info.compress_type = zipfile.ZIP_DEFLATED
    chunk = bytes(MiB)
    with archive.open(info, "w", force_zip64=True) as member:
        for start in range(0, size, len(chunk)):
            member.write(chunk[: min(len(chunk), size - start)])


class _Storage:
    """Stands for a storage in a hand-written pickle: ``persistent_id`` turns it into torch's storage record."""

    def __init__(self, numel: int) -> None:
        self.numel = numel


class _Tensor:
    """Pickles as ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)``, as torch.save writes."""

    def __init__(self, storage: _Storage, size: Sequence[int], stride: Sequence[int]) -> None:
        self.args = (storage, 0, tuple(size), tuple(stride), False, OrderedDict())

    def __reduce__(self) -> tuple[Any, ...]:
        return (torch._utils._rebuild_tensor_v2, self.args)


def torch_pickle(obj: Any, *, legacy: bool = False) -> bytes:
    """The pickle torch.save writes for ``obj``, with one float32 storage under key ``"0"``."""
    buffer = io.BytesIO()
    pickler = pickle.Pickler(buffer, protocol=2)

    def persistent_id(value: Any) -> tuple[Any, ...] | None:
        if not isinstance(value, _Storage):
            return None
        record = ("storage", torch.FloatStorage, "0", "cpu", value.numel)
        return (*record, None) if legacy else record

    pickler.persistent_id = persistent_id  # type: ignore[method-assign]
    pickler.dump(obj)
    return buffer.getvalue()


def deflate_bomb_checkpoint(path: Path, size: int = BOMB) -> None:
    """A state_dict ``{"fc1.weight": float32[size / 4]}`` whose data record is deflated: ~4 MiB on disk."""
    state = {"fc1.weight": _Tensor(_Storage(size // 4), [size // 4], [1])}
    with zipfile.ZipFile(path, "w", compresslevel=1) as archive:
        archive.writestr("archive/data.pkl", torch_pickle(state))
        archive.writestr("archive/byteorder", "little")
        write_deflated(archive, "archive/data/0", size)
        archive.writestr("archive/version", "3\n")


def legacy_checkpoint(path: Path, declared: int, stored: int) -> None:
    """A legacy (non-zip) torch file whose pickle declares ``declared`` float32 elements; ``stored`` follow."""
    buffer = io.BytesIO()
    sys_info = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}
    for header in (0x1950A86A20F9469CFC6C, 1001, sys_info):
        pickle.dump(header, buffer, protocol=2)
    buffer.write(torch_pickle({"fc1.weight": _Tensor(_Storage(declared), [stored], [1])}, legacy=True))
    pickle.dump(["0"], buffer, protocol=2)
    buffer.write(struct.pack("<q", stored) + bytes(4 * stored))
    path.write_bytes(buffer.getvalue())


def npy_header(shape: tuple[int, ...], descr: str = "<f8") -> bytes:
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": descr, "fortran_order": False, "shape": shape})
    return header.getvalue()


def rezip(source: Path, target: Path, replace: Mapping[str, bytes] = {}, bombs: Sequence[str] = ()) -> None:
    """``source``'s members copied to ``target`` (stored), some replaced, plus deflated bombs."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w", compresslevel=1) as new:
        for info in old.infolist():
            new.writestr(info.filename, replace.get(info.filename, old.read(info.filename)))
        for name in bombs:
            write_deflated(new, name, BOMB)


@pytest.fixture(scope="module")
def work() -> Any:
    """A directory with a tiny model's checkpoint and batch, shared by the tests of this module."""
    with tempfile.TemporaryDirectory() as folder:
        directory = Path(folder)
        torch.manual_seed(0)
        torch.save(cli_models.TinyNet().state_dict(), directory / "tiny.pt")
        torch.save(torch.randn(4, cli_models.IN_FEATURES), directory / "x.pt")
        yield directory


# --------------------------------------------------------------------------- zip records: torch, TorchScript, .pt2


def test_deflated_torch_record_is_refused_before_it_is_inflated(work: Path) -> None:
    path = work / "deflated.pt"
    deflate_bomb_checkpoint(path)
    assert path.stat().st_size < 8 * MiB
    assert_refused_small(
        ["inspect", path, "--model", MODEL, "--input-shape", "4,8"],
        work,
        str(path),
        "deflated records that expand",
        "archive/data/0, 1.0 GiB",
        "64.0 MiB",
        "re-save it with torch.save",
        "--max-memory",
    )


def test_stored_records_over_the_budget_name_the_flag(work: Path) -> None:
    torch.save({"fc1.weight": torch.zeros(2**20)}, work / "four_mib.pt")
    proc = run_cli(
        ["inspect", work / "four_mib.pt", "--model", MODEL, "--input-shape", "4,8"],
        cwd=work,
        env={"GRADCHECK_MAX_MEMORY": "1MiB"},
    )
    assert_one_line_error(proc, "four_mib.pt declares 4.0 MiB", "over the 1.0 MiB memory budget", "--max-memory")


def test_stored_record_declaring_more_than_it_stores_is_refused(work: Path) -> None:
    """A stored record's declared size is what torch allocates: it must equal the bytes stored."""
    source = work / "tiny.pt"
    lying = bytearray(source.read_bytes())
    with zipfile.ZipFile(source) as archive:
        name = next(i.filename for i in archive.infolist() if i.filename.endswith("data/0")).encode()
    entry = lying.find(b"PK\x01\x02")  # central directory entries: the name starts 46 bytes in
    while lying[entry + 46 : entry + 46 + len(name)] != name:
        entry = lying.find(b"PK\x01\x02", entry + 1)
        assert entry > 0
    lying[entry + 24 : entry + 28] = struct.pack("<I", 0xF0000000)  # the declared uncompressed size
    (work / "lying.pt").write_bytes(bytes(lying))
    proc = run_cli(["inspect", work / "lying.pt", "--model", MODEL, "--input-shape", "4,8"], cwd=work)
    assert_one_line_error(proc, "lying.pt", name.decode(), "declares 3.8 GiB but stores", "damaged or crafted")


def test_zip_listing_too_many_records_is_refused_before_its_directory_is_read(work: Path) -> None:
    """70,000 empty records: a 7 MiB file whose directory alone would take ~70 MiB in zipfile and miniz."""
    path = work / "many_records.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", torch_pickle({}))
        for index in range(70_000):
            archive.writestr(f"archive/data/{index}", b"")
    proc = run_cli(["inspect", path, "--model", MODEL], cwd=work, env={"GRADCHECK_MAX_MEMORY": BUDGET})
    assert_one_line_error(proc, "many_records.pt lists 70001 records", "beyond the 64.0 MiB")


def test_torchscript_archive_with_a_bomb_is_refused(work: Path) -> None:
    source, path = work / "script.pt", work / "script_bomb.pt"
    torch.jit.save(torch.jit.script(cli_models.TinyNet()), source)
    prefix = zipfile.ZipFile(source).namelist()[0].split("/")[0]
    rezip(source, path, bombs=[f"{prefix}/data/9"])
    assert_refused_small(["inspect", path], work, str(path), f"{prefix}/data/9", "deflated records")


def test_pt2_archive_with_a_bomb_inside_its_sample_inputs_is_refused(work: Path) -> None:
    """The stored sample inputs of a ``.pt2`` are a torch zip inside the zip, opened from memory by torch."""
    source, path = work / "program.pt2", work / "program_bomb.pt2"
    model = cli_models.TinyNet()
    torch.export.save(torch.export.export(model, (torch.randn(2, cli_models.IN_FEATURES),)), source)
    inner = next(n for n in zipfile.ZipFile(source).namelist() if "sample_inputs" in n)
    bomb = work / "inner.pt"
    deflate_bomb_checkpoint(bomb)
    rezip(source, path, replace={inner: bomb.read_bytes()})
    assert_refused_small(["inspect", path], work, str(path), f"(in {inner})", "deflated records")


# --------------------------------------------------------------------------- tensors: stride 0, legacy storages


def test_stride0_batch_is_refused_before_the_forward_pass(work: Path) -> None:
    path = work / "stride0.pt"
    torch.save(torch.zeros(1).expand(10**8, 4), path)
    assert path.stat().st_size < 4096  # torch.save keeps the 4-byte storage and the view's strides
    assert_refused_small(
        ["inspect", work / "tiny.pt", "--model", MODEL, "--input", path],
        work,
        "stride0.pt",
        "float32[100000000, 4] (1.5 GiB) backed by only 4 bytes",
        "strides [0, 0]",
        ".contiguous()",
    )


def test_stride0_tensor_in_a_checkpoint_is_refused(work: Path) -> None:
    torch.save({"fc1.weight": torch.zeros(1).expand(10**8, 8)}, work / "stride0_state.pt")
    proc = run_cli(
        ["inspect", work / "stride0_state.pt", "--model", MODEL, "--input-shape", "4,8"],
        cwd=work,
        env={"GRADCHECK_MAX_MEMORY": BUDGET},
    )
    assert_one_line_error(proc, "fc1.weight: float32[100000000, 8]", "backed by only 4 bytes")


def test_a_small_broadcast_batch_still_runs(work: Path) -> None:
    """A view within the expansion allowance (a broadcast mask) is an ordinary batch."""
    torch.save({"x": torch.randn(4, 8), "mask": torch.ones(1, 8).expand(4, 8)}, work / "broadcast.pt")
    proc = run_cli(
        ["inspect", work / "tiny.pt", "--model", "cli_models:make_keyword", "--input", work / "broadcast.pt"], cwd=work
    )
    assert proc.returncode in (0, 1), show(proc)


def test_legacy_file_declaring_a_huge_storage_is_refused(work: Path) -> None:
    path = work / "legacy.pt"
    legacy_checkpoint(path, declared=10**10, stored=4)
    assert_refused_small(
        ["inspect", path, "--model", MODEL, "--input-shape", "4,8"],
        work,
        "legacy.pt declares 37.3 GiB of tensor storage but the file holds only",
        "damaged or crafted",
    )


def test_legacy_file_that_is_honest_still_loads(work: Path) -> None:
    torch.save(cli_models.TinyNet().state_dict(), work / "old.pt", _use_new_zipfile_serialization=False)
    proc = run_cli(["inspect", work / "old.pt", "--model", MODEL, "--input-shape", "4,8"], cwd=work)
    assert proc.returncode in (0, 1), show(proc)


# --------------------------------------------------------------------------- NumPy batches


def test_npz_bomb_is_refused_before_it_is_inflated(work: Path) -> None:
    path = work / "bomb.npz"
    with zipfile.ZipFile(path, "w", compresslevel=1) as archive:
        info = zipfile.ZipInfo("arr_0.npy")
        info.compress_type = zipfile.ZIP_DEFLATED
        with archive.open(info, "w", force_zip64=True) as member:
            member.write(npy_header((BOMB // 8,)))
            for _ in range(BOMB // MiB):
                member.write(bytes(MiB))
    assert_refused_small(
        ["inspect", work / "tiny.pt", "--model", MODEL, "--input", path],
        work,
        "bomb.npz",
        "deflated records that expand",
        "arr_0.npy",
        "np.savez",
    )


def test_npz_member_header_declaring_a_huge_shape_is_refused(work: Path) -> None:
    path = work / "huge_shape.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("arr_0.npy", npy_header((10**12,)) + bytes(64))
    proc = run_cli(
        ["inspect", work / "tiny.pt", "--model", MODEL, "--input", path], cwd=work, env={"GRADCHECK_MAX_MEMORY": BUDGET}
    )
    assert_one_line_error(proc, "huge_shape.npz (arr_0.npy)", "float64[1000000000000] (7.3 TiB)", "over the 4.0 GiB")


def test_npy_header_declaring_more_than_the_file_holds_is_refused(work: Path) -> None:
    path = work / "short.npy"
    path.write_bytes(npy_header((1000, 8), "<f4") + bytes(64))
    proc = run_cli(["inspect", work / "tiny.pt", "--model", MODEL, "--input", path], cwd=work)
    assert_one_line_error(proc, "short.npy", "float32[1000, 8] (31.2 KiB) but holds only 64 bytes", "np.save")


def test_compressed_npz_within_the_allowance_still_loads(work: Path) -> None:
    np.savez_compressed(work / "small.npz", np.zeros((4, 8), dtype=np.float32))
    proc = run_cli(["inspect", work / "tiny.pt", "--model", MODEL, "--input", work / "small.npz"], cwd=work)
    assert proc.returncode in (0, 1), show(proc)


# --------------------------------------------------------------------------- Hugging Face config


def tiny_gpt2_directory(directory: Path, **changes: Any) -> Path:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_embd=64, n_layer=2, n_head=4, n_positions=64, vocab_size=1000, bos_token_id=0, eos_token_id=0
    )
    transformers.GPT2LMHeadModel(config).save_pretrained(directory)
    raw = json.loads((directory / "config.json").read_text())
    raw.update(changes)
    (directory / "config.json").write_text(json.dumps(raw))
    return directory


def test_config_with_20000_layers_beside_small_weights_is_refused_before_building(work: Path) -> None:
    directory = tiny_gpt2_directory(work / "hf_20000", n_layer=20000)
    assert_refused_small(
        ["inspect", directory],
        work,
        "hf_20000/config.json describes GPT2LMHeadModel",
        "(n_layer 20000)",
        "its weights hold only",
        "fix it",
        max_rss=MAX_RSS_HF,
    )


def test_architecture_estimate_matches_a_full_meta_build() -> None:
    """Extrapolating from 4 and 8 layers gives exactly the size of a 100-layer stack of identical blocks."""
    transformers = pytest.importorskip("transformers")
    from gradcheck_cli.load.hf_size import EXACT_UP_TO, estimate_architecture

    config = transformers.GPT2Config(n_embd=32, n_layer=100, n_head=4, n_positions=64, vocab_size=100)
    assert config.n_layer > EXACT_UP_TO
    estimate = estimate_architecture(Path("x"), transformers.GPT2LMHeadModel, config, transformers)
    with torch.device("meta"):
        model = transformers.GPT2LMHeadModel(config)
    assert estimate is not None
    assert estimate.parameters == sum(p.numel() for p in model.parameters())
    assert ("n_layer", 100) in estimate.repeats


# --------------------------------------------------------------------------- FIFOs and devices


@pytest.mark.parametrize("role", ["checkpoint", "input", "config.json", "model.safetensors", "dcp .metadata"])
def test_fifo_is_refused_without_opening_it(work: Path, role: str) -> None:
    folder = work / f"fifo_{role.replace(' ', '_')}"
    folder.mkdir()
    if role == "checkpoint":
        os.mkfifo(folder / "model.pt")
        args: list[Any] = ["inspect", folder / "model.pt", "--model", MODEL, "--input-shape", "4,8"]
        needle = "model.pt is a named pipe (FIFO)"
    elif role == "input":
        os.mkfifo(folder / "batch.pt")
        args = ["inspect", work / "tiny.pt", "--model", MODEL, "--input", folder / "batch.pt"]
        needle = "batch.pt is a named pipe (FIFO)"
    elif role == "dcp .metadata":
        (folder / "__0_0.distcp").write_bytes(b"\0" * 16)
        os.mkfifo(folder / ".metadata")
        args, needle = ["inspect", folder, "--model", MODEL], ".metadata in"
    else:
        directory = tiny_gpt2_directory(folder / "hf")
        (directory / role).unlink()
        os.mkfifo(directory / role)
        args, needle = ["inspect", directory], f"{role} in"
    line = assert_refused_small(args, work, needle, "not a regular file", max_s=60)
    assert "named pipe (FIFO)" in line


def test_character_device_as_checkpoint_is_refused(work: Path) -> None:
    proc = run_cli(["inspect", "/dev/zero", "--model", MODEL, "--input-shape", "4,8"], cwd=work)
    assert_one_line_error(proc, "/dev/zero is a character device", "not a regular file")


# --------------------------------------------------------------------------- the budget itself


@pytest.mark.parametrize(
    ("text", "expected"),
    [("8GiB", 8 * GiB), ("8G", 8 * GiB), ("8gb", 8 * GiB), ("512MiB", 512 * MiB), ("1.5T", int(1.5 * 1024 * GiB)),
     ("2097152", 2 * MiB)],
)  # fmt: skip
def test_memory_sizes_parse(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["lots", "8 PB", "-1G", "100"])
def test_bad_memory_sizes_are_one_line_errors(text: str) -> None:
    with pytest.raises(GradcheckError, match="--max-memory"):
        parse_size(text)


def test_the_budget_comes_from_the_flag_then_the_environment_then_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    from gradcheck_cli.load import limits

    monkeypatch.delenv(limits.ENV_VAR, raising=False)
    default = limits.memory_budget()
    memory = limits.machine_memory()
    assert default.max_bytes == (memory // 2 if memory else limits.FALLBACK_BYTES)
    monkeypatch.setenv(limits.ENV_VAR, "3GiB")
    assert limits.memory_budget().max_bytes == 3 * GiB
    with use_memory_budget("2GiB") as budget:
        assert limits.memory_budget() == budget
        assert budget.max_bytes == 2 * GiB and budget.expansion_bytes == 32 * MiB
        assert "--max-memory 2.0 GiB" in budget.limit()
    assert limits.memory_budget().max_bytes == 3 * GiB
    set_memory_budget(5 * GiB)
    try:
        assert limits.memory_budget().max_bytes == 5 * GiB
    finally:
        set_memory_budget(None)
    assert limits.memory_budget().max_bytes == 3 * GiB


def test_loaders_take_an_explicit_budget(work: Path) -> None:
    from gradcheck_cli.errors import BatchError
    from gradcheck_cli.load import load_checkpoint
    from gradcheck_cli.load.batch_file import load_batch_file
    from gradcheck_cli.load.limits import MemoryBudget

    tight = MemoryBudget(MiB, "a test")
    torch.save(torch.zeros(2**19), work / "two_mib.pt")
    with pytest.raises(BatchError, match=r"over the 1\.0 MiB memory budget \(a test\)"):
        load_batch_file(work / "two_mib.pt", tight)
    assert load_batch_file(work / "two_mib.pt", MemoryBudget(GiB, "a test")).numel() == 2**19
    loaded = load_checkpoint(work / "tiny.pt", model_spec=MODEL, trust=False, budget=MemoryBudget(GiB, "a test"))
    assert isinstance(loaded.module, nn.Module)
