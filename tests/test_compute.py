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


def test_the_probe_answers_a_bool() -> None:
    assert isinstance(compute.cpu_has_native_bf16(), bool)


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
    torch.testing.assert_close(out_nhwc, out, rtol=1e-5, atol=1e-5)
    out.square().sum().backward()
    out_nhwc.square().sum().backward()
    for a, b in zip(plain.parameters(), nhwc.parameters(), strict=True):
        assert a.grad is not None and b.grad is not None
        # summation order differs between the layouts: compare relative to the gradient's norm
        assert (b.grad - a.grad).norm() <= 1e-4 * a.grad.norm()


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
    torch.testing.assert_close(mixed, exact, rtol=5e-2, atol=0.0)
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
