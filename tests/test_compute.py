"""Precision and memory format of the training step: what ``auto`` resolves to on each device,
clear refusals, and that the fast CPU habits (channels_last, bf16 autocast) keep the numbers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from barlow import checkpoint, compute
from barlow.backbones import SmallCNN
from barlow.compute import (
    Precision,
    flush_denormals,
    images_channels_last,
    to_channels_last,
    uses_channels_last,
)
from barlow.config import load_config
from barlow.encoder import build_method
from barlow.training import CHECKPOINT_NAME, pretrain
from comparisons import rel_err

CPU = torch.device("cpu")


def native_bf16(monkeypatch: pytest.MonkeyPatch, native: bool) -> None:
    monkeypatch.setattr(compute, "cpu_has_native_bf16", lambda: native)


@pytest.mark.parametrize(("native", "expected"), [(True, torch.bfloat16), (False, None)])
def test_auto_on_cpu_is_bf16_only_where_native(
    monkeypatch: pytest.MonkeyPatch, native: bool, expected: torch.dtype | None
) -> None:
    native_bf16(monkeypatch, native)
    assert Precision.resolve("auto", CPU).dtype == expected
    assert Precision.resolve("fp32", CPU).dtype is None


def test_bf16_on_a_cpu_without_native_bf16_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    native_bf16(monkeypatch, False)
    with pytest.raises(ValueError, match=r"no native bf16.*train\.precision=fp32"):
        Precision.resolve("bf16", CPU)
    native_bf16(monkeypatch, True)
    assert Precision.resolve("bf16", CPU).dtype == torch.bfloat16


@pytest.mark.parametrize("native", [True, False])
def test_fp16_on_cpu_is_refused(monkeypatch: pytest.MonkeyPatch, native: bool) -> None:
    native_bf16(monkeypatch, native)
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        Precision.resolve("fp16", CPU)


def test_other_devices_and_unknown_names() -> None:
    meta = torch.device("meta")
    assert Precision.resolve("auto", meta).dtype is None
    with pytest.raises(ValueError, match="needs a GPU"):
        Precision.resolve("bf16", meta)
    with pytest.raises(ValueError, match="one of auto, fp32, bf16, fp16"):
        Precision.resolve("fp8", CPU)


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags from /proc/cpuinfo (Linux), or None where there is none."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    flags = [
        line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")
    ]
    return set(flags[0]) if flags else None


BF16_FLAGS = {"avx512_bf16", "amx_bf16"}
PROBES = ["cpu_has_native_bf16", "broken: a fixed answer"]


@pytest.mark.parametrize("probe", PROBES)
def test_the_probe_finds_native_bf16_where_the_cpu_has_it(probe: str) -> None:
    """A CPU listing AVX512-BF16 or AMX-BF16 has native bf16; one without AVX-512 has not.
    (The old check, that the answer is a bool, passed a probe that always says False.)"""
    flags = cpu_flags()
    if flags is None or "avx2" not in flags:
        pytest.skip("not an x86 Linux CPU: no /proc/cpuinfo flags to compare with")
    if not flags & BF16_FLAGS and "avx512bw" in flags:
        # torch's probe asks for AVX512BW/VL/DQ, not AVX512-BF16: it answers True here
        pytest.skip("AVX-512 without AVX512-BF16: the probe's answer is not pinned down")
    native = bool(flags & BF16_FLAGS)
    # The negative case is deliberately broken: a fixed answer, the wrong one for this CPU.
    answer = compute.cpu_has_native_bf16() if probe == "cpu_has_native_bf16" else not native
    assert isinstance(answer, bool)  # the old check
    assert (answer == native) == (probe == "cpu_has_native_bf16"), sorted(flags & BF16_FLAGS)


def test_the_probe_says_no_where_it_cannot_ask(monkeypatch: pytest.MonkeyPatch) -> None:
    """A build without oneDNN, or without its probe, answers False rather than raising."""
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    assert compute.cpu_has_native_bf16() is False
    monkeypatch.undo()

    def missing() -> bool:
        raise RuntimeError("no such op")

    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", missing)
    assert compute.cpu_has_native_bf16() is False


def test_channels_last_applies_on_cpu_and_cuda_only() -> None:
    assert uses_channels_last(True, CPU)
    assert uses_channels_last(True, torch.device("cuda"))
    assert not uses_channels_last(True, torch.device("meta"))
    assert not uses_channels_last(False, CPU)


def test_channels_last_keeps_outputs_and_gradients() -> None:
    torch.manual_seed(0)
    plain = SmallCNN(in_channels=1)
    nhwc = to_channels_last(SmallCNN(in_channels=1))
    nhwc.load_state_dict(plain.state_dict())
    conv = nhwc.features[3].weight  # block 2: 32 input channels (block 1 has 1: both layouts)
    assert conv.is_contiguous(memory_format=torch.channels_last)
    assert not conv.is_contiguous()  # really NHWC, not a no-op
    x = torch.randn(8, 1, 28, 28)
    (x_nhwc,) = images_channels_last([x])
    assert x_nhwc.is_contiguous(memory_format=torch.channels_last)
    out, out_nhwc = plain(x), nhwc(x_nhwc)
    assert rel_err(out_nhwc, out) < 4e-6  # another summation order: measured 4.0e-7
    out.square().sum().backward()
    out_nhwc.square().sum().backward()
    for a, b in zip(plain.parameters(), nhwc.parameters(), strict=True):
        assert a.grad is not None and b.grad is not None
        # summation order differs between the layouts: measured up to 1.3e-5 (the conv weights)
        assert rel_err(b.grad, a.grad) < 1e-4


def test_images_channels_last_passes_other_tensors_through() -> None:
    flat = torch.randn(4, 10)
    assert images_channels_last([flat])[0] is flat


def test_bf16_autocast_step_keeps_a_float32_loss_near_fp32() -> None:
    """bf16 convolutions and matmuls; the loss stays float32 and within bf16 rounding of fp32."""
    cfg = load_config("fashion-mnist", ['method.projector="256-256"'])
    torch.manual_seed(0)
    method = build_method(cfg).train()
    views = [torch.randn(64, 1, 28, 28), torch.randn(64, 1, 28, 28)]
    exact = method(views).loss
    with Precision(torch.bfloat16).autocast(CPU):
        mixed = method(views).loss
    assert mixed.dtype == torch.float32
    assert torch.isfinite(mixed)
    # bf16 keeps 8 significant bits; measured 7.5e-4 here (1.3e-4 to 7.7e-4 over seeds 0-3).
    # The Barlow Twins loss itself computed in bf16 is 2.4e-3 off at this seed; rtol=5e-2 let it
    # through. (That loss is caught exactly by tests/losses/test_barlow_twins.py.)
    torch.testing.assert_close(mixed, exact, rtol=1.5e-3, atol=0.0)
    assert mixed != exact  # autocast really ran in bf16


DENORMAL = 1e-39  # below float32's smallest normal number, 1.18e-38


def test_flush_denormals_zeroes_them_on_cpu_and_restores_ieee() -> None:
    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU cannot flush denormals (no SSE3)")
    x = torch.tensor([DENORMAL])
    with flush_denormals(CPU):
        assert (x * 1.0).item() == 0.0
    assert (x * 1.0).item() == pytest.approx(DENORMAL)


def test_flush_denormals_leaves_other_devices_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bool] = []
    monkeypatch.setattr(torch, "set_flush_denormal", lambda on: calls.append(on) or True)
    with flush_denormals(torch.device("meta")):
        pass
    assert calls == []
    with pytest.raises(RuntimeError), flush_denormals(CPU):
        raise RuntimeError("a failing step")
    assert calls == [True, False]  # switched off again on the way out


def test_compiled_run_writes_plain_checkpoints_that_resume_uncompiled(tmp_path: Path) -> None:
    """train.compile=true (inductor on CPU): the run trains and its checkpoint holds the method's
    own parameter names, so a run without compile resumes it."""
    overrides = [
        'method.projector="64-64"',
        "train.batch_size=64",
        "train.epochs=2",
        "optim.warmup_epochs=1",
        "eval.online_knn_every=0",
        "eval.final=false",
    ]
    pretrain(
        load_config("digits", [*overrides, "train.compile=true", "train.max_steps=4"]),
        tmp_path,
        progress=False,
    )
    saved = checkpoint.load_checkpoint(tmp_path / CHECKPOINT_NAME)
    assert saved["global_step"] == 4
    assert not [k for k in saved["method"] if "_orig_mod" in k]
    assert all(torch.isfinite(v).all() for v in saved["method"].values() if v.is_floating_point())
    pretrain(load_config("digits", overrides), tmp_path, resume=True, progress=False)
    assert checkpoint.load_checkpoint(tmp_path / CHECKPOINT_NAME)["global_step"] > 4


FLUSH_PROBE = """
import sys, numpy, torch
torch.set_num_threads(2)
# denormal inputs made before any flag is set, by numpy: no torch thread pool yet
x = torch.from_numpy(numpy.full(1_000_000, 1e-39, dtype=numpy.float32))
if sys.argv[1] == "pool-first":
    torch.ones(1_000_000) * 0.5  # the intra-op thread pool exists before the CLI runs
from barlow.cli import main
main(["recipes"])
print(int(((x * 0.5) == 0).sum()))
"""


@pytest.mark.parametrize(("order", "flushed"), [("cli-first", 1.0), ("pool-first", 0.5)])
def test_the_cli_flushes_denormals_in_every_intra_op_thread(order: str, flushed: float) -> None:
    """The flag is per thread and pool threads copy it when created: the CLI sets it before any
    tensor work, so both threads of a 2-thread multiply flush. Set after the pool exists, only
    the calling thread's half is flushed (the control: the order matters)."""
    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU cannot flush denormals (no SSE3)")
    run = subprocess.run(
        [sys.executable, "-c", FLUSH_PROBE, order], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr[-2000:]
    zeros = int(run.stdout.strip().splitlines()[-1])
    assert zeros == pytest.approx(flushed * 1_000_000, rel=0.05)
