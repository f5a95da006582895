"""Runs that stop and continue: mid-epoch resume is bit-identical, preemption signals save and exit.

The reference is always the same run done in one go; every comparison is exact (torch.equal).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from barlow import checkpoint
from barlow.config import Config, load_config
from barlow.methods import METHODS, Method
from barlow.preemption import EXIT_CODE, PreemptionSignals
from barlow.training import CHECKPOINT_NAME, pretrain
from barlow.training.epoch_data import DeviceViews, EpochOrder, ViewDataset, sample_seed
from comparisons import assert_identical, differing
from processes import patched_barlow, pretrain_on_two_processes
from runs import records, sets, weights

TINY = [
    'method.projector="32-32"',
    "train.batch_size=64",
    "train.epochs=2",
    "optim.warmup_epochs=1",
    "eval.online_knn_every=0",
    "eval.final=false",
]
STEPS_PER_EPOCH = 1437 // 64  # 22


def tiny(*extra: str) -> Config:
    return load_config("digits", [*TINY, *extra])


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    run = tmp_path_factory.mktemp("straight")
    pretrain(tiny(), run, progress=False)
    return weights(run)


@pytest.mark.parametrize("workers", [0, 1])
def test_mid_epoch_resume_is_bit_identical(
    tmp_path: Path, straight: dict[str, torch.Tensor], workers: int
) -> None:
    stop = STEPS_PER_EPOCH + 7  # inside epoch 2
    cfg = tiny(f"train.max_steps={stop}", f"data.num_workers={workers}")
    pretrain(cfg, tmp_path, progress=False)
    state = checkpoint.load_checkpoint(tmp_path / CHECKPOINT_NAME)
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (1, 7, stop)
    pretrain(tiny(f"data.num_workers={workers}"), tmp_path, resume=True, progress=False)
    assert_identical(weights(tmp_path), straight)


def views_counted_from_the_resume(monkeypatch: pytest.MonkeyPatch) -> None:
    """Deliberately broken, for the negative control: the device views of a resumed run count
    batches from the first one this process draws, not from the start of the epoch."""
    draw = DeviceViews.__call__
    first: dict[int, int] = {}

    def counted(self: DeviceViews, images: torch.Tensor, *, epoch: int, batch: int) -> Any:
        return draw(self, images, epoch=epoch, batch=batch - first.setdefault(id(self), batch))

    monkeypatch.setattr(DeviceViews, "__call__", counted)


def test_mid_epoch_resume_with_views_on_the_device_is_bit_identical(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    on_device, stop, end = 'data.augment_on="device"', STEPS_PER_EPOCH + 5, STEPS_PER_EPOCH + 8
    pretrain(tiny(on_device, f"train.max_steps={end}"), tmp_path / "straight", progress=False)
    pretrain(tiny(on_device, f"train.max_steps={stop}"), tmp_path / "split", progress=False)
    shutil.copytree(tmp_path / "split", tmp_path / "control")  # the same checkpoint
    pretrain(
        tiny(on_device, f"train.max_steps={end}"), tmp_path / "split", resume=True, progress=False
    )
    assert_identical(weights(tmp_path / "split"), weights(tmp_path / "straight"))
    # Negative control: the same resume drawing the views of the wrong batches is caught.
    views_counted_from_the_resume(monkeypatch)
    pretrain(
        tiny(on_device, f"train.max_steps={end}"), tmp_path / "control", resume=True, progress=False
    )
    assert differing(weights(tmp_path / "control"), weights(tmp_path / "straight"))


def test_resume_that_loses_the_optimizer_state_differs(
    tmp_path: Path, straight: dict[str, torch.Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Negative control: the comparison above catches a resume that drops part of the state."""
    from barlow.optim import LARS

    pretrain(tiny(f"train.max_steps={STEPS_PER_EPOCH + 7}"), tmp_path, progress=False)
    monkeypatch.setattr(LARS, "load_state_dict", lambda self, state: None)  # momentum lost
    pretrain(tiny(), tmp_path, resume=True, progress=False)
    resumed = weights(tmp_path)
    assert any(not torch.equal(resumed[k], straight[k]) for k in straight)


def test_views_are_a_function_of_seed_epoch_and_index() -> None:
    from barlow import data
    from barlow.augment import MultiView, build_specs

    info = data.dataset_info("digits")
    images = data.build_dataset("digits", split="train")
    specs = build_specs("barlow-gray", crop_size=16, mean=info.mean, std=info.std)
    views = ViewDataset(images, MultiView(specs), seed=3)
    first = views[(1, 5)][0]
    torch.rand(100)  # the caller's generator does not matter ...
    again = views[(1, 5)][0]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    # ... and is left untouched: same draw with or without a view in between.
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    views[(0, 0)]
    assert torch.equal(torch.rand(3), expected)
    other_epoch = views[(2, 5)][0]
    assert not all(torch.equal(a, b) for a, b in zip(first, other_epoch, strict=True))
    assert len({sample_seed(0, e, i) for e in range(50) for i in range(2000)}) == 50 * 2000


def test_epoch_order_shards_and_skips() -> None:
    data = list(range(103))
    shards = [EpochOrder(data, world=2, rank=r, seed=0, local_batch=10) for r in range(2)]
    for s in shards:
        s.set_epoch(4)
    full = [list(s) for s in shards]
    assert all(len(f) == 50 for f in full)  # 51 per rank, 5 whole batches of 10
    assert not set(i for _, i in full[0]) & set(i for _, i in full[1])
    assert all(e == 4 for f in full for e, _ in f)
    shards[0].set_epoch(4, start_batch=2)
    assert list(shards[0]) == full[0][20:]
    with pytest.raises(ValueError, match="start_batch"):
        shards[0].set_epoch(4, start_batch=6)


def test_preemption_signals_only_set_a_flag() -> None:
    with PreemptionSignals() as signals:
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.05)
        assert signals.requested and signals.signal_name == "SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL


# Deliberately broken resumes for the negative controls, run in subprocesses (patched_barlow).
LOSE_THE_MOMENTUM = """
from barlow.optim import LARS
LARS.load_state_dict = lambda self, state: None  # the resume drops the LARS momentum
"""
LOSE_RANK_1_MOMENTUM = """
import os
from barlow.optim import LARS
if os.environ["RANK"] == "1":
    LARS.load_state_dict = lambda self, state: None  # rank 1 resumes without its momentum
"""


def test_sigterm_saves_exits_143_and_resumes_exactly(tmp_path: Path) -> None:
    """A real SIGTERM to a running `barlow pretrain`, then `--resume`: same weights as straight."""
    run = tmp_path / "run"
    command = ["pretrain", "--quiet", *sets(*TINY)]
    args = [sys.executable, "-m", "barlow", *command]
    # The reference runs in a subprocess too: the same thread count gives the same float sums.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    reference = subprocess.run(
        [*args, "--out", str(tmp_path / "straight")], env=env, capture_output=True, text=True
    )
    assert reference.returncode == 0, reference.stderr[-2000:]
    args += ["--out", str(run)]
    slow = ["--set", "train.log_every=1"]  # a record per step: the run lasts long enough to hit
    proc = subprocess.Popen([*args, *slow], env=env, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    for line in proc.stderr:  # wait until training has started
        if "steps/epoch" in line:
            break
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == EXIT_CODE, err[-2000:]
    assert "continue with --resume" in err
    state = checkpoint.load_checkpoint(run / CHECKPOINT_NAME)
    assert 0 < state["global_step"] < 2 * STEPS_PER_EPOCH
    shutil.copytree(run, tmp_path / "control")  # the same checkpoint
    done = subprocess.run([*args, *slow, "--resume"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert_identical(weights(run), weights(tmp_path / "straight"))
    # Negative control: the same resume, losing the LARS momentum, is caught.
    broken = patched_barlow(LOSE_THE_MOMENTUM, tmp_path)
    control = [sys.executable, str(broken), *command, "--out", str(tmp_path / "control")]
    done = subprocess.run([*control, *slow, "--resume"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert differing(weights(tmp_path / "control"), weights(tmp_path / "straight"))


def _torchrun(
    out: Path, *extra: str, resume: bool = False, patch: Path | None = None
) -> subprocess.CompletedProcess[str]:
    args = sets(*TINY, "train.epochs=1", *extra) + (["--resume"] if resume else [])
    return pretrain_on_two_processes(out, args, patch=patch)


def test_two_process_mid_epoch_resume_is_bit_identical(tmp_path: Path) -> None:
    straight = _torchrun(tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr[-2000:]
    stopped = _torchrun(tmp_path / "split", "train.max_steps=9")
    assert stopped.returncode == 0, stopped.stderr[-2000:]
    assert checkpoint.load_checkpoint(tmp_path / "split" / CHECKPOINT_NAME)["step_in_epoch"] == 9
    shutil.copytree(tmp_path / "split", tmp_path / "control")  # the same checkpoint
    resumed = _torchrun(tmp_path / "split", resume=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_identical(weights(tmp_path / "split"), weights(tmp_path / "straight"))
    # Negative control: the same resume with rank 1 alone losing its momentum is caught (the
    # checkpoint holds rank 0's weights, which rank 1's gradients reach through DDP).
    broken = patched_barlow(LOSE_RANK_1_MOMENTUM, tmp_path)
    control = _torchrun(tmp_path / "control", resume=True, patch=broken)
    assert control.returncode == 0, control.stderr[-2000:]
    assert differing(weights(tmp_path / "control"), weights(tmp_path / "straight"))


def restore_trainable_parameters_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Deliberately broken, for the negative controls: the resume loads the method's trainable
    parameters only; its buffers and frozen parameters (BYOL's target network, MoCo's key
    encoder and queue, BatchNorm statistics) keep their fresh values."""
    load = nn.Module.load_state_dict

    def partial(self: nn.Module, state: Any, strict: bool = True, assign: bool = False) -> Any:
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        return load(self, {k: v for k, v in state.items() if k in trainable}, strict=False)

    monkeypatch.setattr(Method, "load_state_dict", partial)


@pytest.mark.parametrize("name", sorted(set(METHODS) - {"barlow_twins"}))
def test_every_method_resumes_bit_identically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """Target networks, momentum and queues come back exactly (BT is covered above); a resume
    that leaves them (or BatchNorm's statistics) fresh is caught."""
    method = (f'method.name="{name}"', 'data.augment_on="device"', "train.epochs=1")
    pretrain(tiny(*method, "train.max_steps=12"), tmp_path / "straight", progress=False)
    pretrain(tiny(*method, "train.max_steps=6"), tmp_path / "split", progress=False)
    shutil.copytree(tmp_path / "split", tmp_path / "control")  # the same checkpoint
    pretrain(tiny(*method, "train.max_steps=12"), tmp_path / "split", resume=True, progress=False)
    assert_identical(weights(tmp_path / "split"), weights(tmp_path / "straight"))
    restore_trainable_parameters_only(monkeypatch)  # the negative control
    pretrain(tiny(*method, "train.max_steps=12"), tmp_path / "control", resume=True, progress=False)
    changed = differing(weights(tmp_path / "control"), weights(tmp_path / "straight"))
    assert changed
    if name in ("byol", "moco"):  # their own state, not only BatchNorm's statistics
        own = ("target_", "key_", "queue")
        assert any(k.startswith(own) for k in changed), changed


# R8: a resume continues the same run or fails saying why; --resume-weights-only is the way out.


def test_resume_of_a_different_run_lists_every_differing_key(tmp_path: Path) -> None:
    pretrain(tiny("train.max_steps=2", 'data.augment_on="device"'), tmp_path, progress=False)
    before = (tmp_path / CHECKPOINT_NAME).read_bytes()
    other = tiny('method.projector="16-16"', "train.batch_size=32", 'model.backbone="resnet18"')
    with pytest.raises(ValueError, match="belongs to a different run") as caught:
        pretrain(other, tmp_path, resume=True, progress=False)
    message = str(caught.value)
    for line in (
        "method.projector: checkpoint '32-32', config '16-16'",
        "model.backbone: checkpoint 'small_cnn', config 'resnet18'",
        "train.batch_size: checkpoint 64, config 32",
        "--resume-weights-only",
    ):
        assert line in message
    assert "method.lambd" not in message and "data.dataset" not in message  # only what differs
    assert (tmp_path / CHECKPOINT_NAME).read_bytes() == before
    # A default written out is the same run: method.lambd=0.0051 is BarlowTwins' default.
    same = tiny("method.lambd=0.0051", "train.max_steps=3", 'data.augment_on="device"')
    pretrain(same, tmp_path, resume=True, progress=False)
    assert checkpoint.load_checkpoint(tmp_path / CHECKPOINT_NAME)["global_step"] == 3


def test_resume_without_a_checkpoint_is_an_error_not_a_fresh_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from barlow.cli import main

    args = ["pretrain", "--quiet", "--out", str(tmp_path / "missing"), "--resume"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--resume given but" in err and "does not exist; check --out" in err
    assert not (tmp_path / "missing").exists()


def test_weights_only_resume_starts_a_fresh_schedule_from_the_weights(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    device = 'data.augment_on="device"'
    pretrain(tiny("train.max_steps=3", device), tmp_path, progress=False)
    old = weights(tmp_path)
    capsys.readouterr()
    pretrain(tiny(device, *bigger_overrides()), tmp_path, resume=True, progress=False)
    err = capsys.readouterr().err
    assert "WEIGHTS-ONLY RESUME" in err and "differs in train.batch_size" in err
    assert "Loaded: backbone, projector" in err and "start fresh at step 0" in err
    state = checkpoint.load_checkpoint(tmp_path / CHECKPOINT_NAME)
    assert state["global_step"] == 2 and state["config"]["train"]["batch_size"] == 128
    kept = tmp_path / "weights-source-step00000003.pt"  # the source outlives the new run's saves
    assert_identical(checkpoint.load_checkpoint(kept)["method"], old)
    # The same command again continues the new run (its checkpoint matches): no second restart.
    pretrain(tiny(device, *bigger_overrides(max_steps=4)), tmp_path, resume=True, progress=False)
    assert "WEIGHTS-ONLY" not in capsys.readouterr().err
    assert checkpoint.load_checkpoint(tmp_path / CHECKPOINT_NAME)["global_step"] == 4


def bigger_overrides(max_steps: int = 2) -> list[str]:
    return [
        "train.batch_size=128",
        f"train.max_steps={max_steps}",
        "train.resume_weights_only=true",
    ]


def test_load_weights_only_into_another_method() -> None:
    """Barlow Twins → BYOL: the backbone is loaded, BYOL's target starts as its copy again, the
    heads whose shapes differ stay fresh; a different backbone is refused naming the mismatch."""
    from barlow.encoder import build_method
    from barlow.training.resume import load_weights_only

    source = build_method(tiny()).state_dict()
    byol = build_method(tiny('method.name="byol"', 'method.projector="16-8"'))
    fresh_projector = {k: v.clone() for k, v in byol.projector.state_dict().items()}
    parts = load_weights_only(byol, source)
    assert parts["loaded"] == ["backbone"]
    assert parts["copied"] == ["target_backbone ← backbone"]
    assert set(parts["fresh"]) >= {"projector", "predictor", "target_projector"}
    backbone = {k[len("backbone.") :]: v for k, v in source.items() if k.startswith("backbone.")}
    assert_identical(byol.backbone.state_dict(), backbone)
    assert_identical(byol.target_backbone.state_dict(), backbone)
    assert_identical(byol.projector.state_dict(), fresh_projector)
    resnet = build_method(tiny('model.backbone="resnet18"'))
    with pytest.raises(ValueError, match="weights do not fit"):
        load_weights_only(resnet, source)


def test_a_mid_epoch_resume_stops_at_max_steps_and_logs_what_an_uninterrupted_run_logs(
    tmp_path: Path,
) -> None:
    """Resumed at batch 5, the run still knows the epoch has 22 batches: it stops at
    ``train.max_steps=8`` inside the epoch, and its per-step records (epoch fraction, loss)
    equal the uninterrupted run's. (Counting the epoch from the loader, which after a resume
    holds only the batches left, ran it to the epoch's end and logged wrong fractions.)"""
    logged = ("train.log_every=1", 'data.augment_on="device"')
    pretrain(tiny(*logged, "train.max_steps=8"), tmp_path / "straight", progress=False)
    pretrain(tiny(*logged, "train.max_steps=5"), tmp_path / "split", progress=False)
    pretrain(tiny(*logged, "train.max_steps=8"), tmp_path / "split", resume=True, progress=False)
    saved = checkpoint.load_checkpoint(tmp_path / "split" / CHECKPOINT_NAME)
    assert (saved["epoch"], saved["step_in_epoch"], saved["global_step"]) == (0, 8, 8)

    def steps(run: Path) -> list[tuple[int, float, float]]:
        return [(r["step"], r["epoch"], r["loss"]) for r in records(run, "train")]

    assert steps(tmp_path / "split") == steps(tmp_path / "straight")
    assert [s for s, _, _ in steps(tmp_path / "straight")] == list(range(1, 9))
