"""R28 memory preflight: the estimate printed before training, and out-of-memory errors that say
what to shrink while the checkpoints already written stay intact."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from barlow.cli import main
from barlow.config import load_config
from barlow.encoder import build_method
from barlow.heads import mlp_num_parameters
from barlow.methods import METHODS, BarlowTwins
from barlow.training import CHECKPOINT_NAME
from barlow.training.memory import memory_estimate
from barlow.training.state import validate_training_checkpoint
from runs import sets


def test_estimate_of_the_paper_model() -> None:
    """ResNet-50 + the 8192-8192-8192 projector, built on the meta device (no memory)."""
    cfg = load_config("imagenet-resnet50")
    with torch.device("meta"):
        method = build_method(cfg)
    estimate = memory_estimate(method, global_batch=2048)
    projector = estimate.parameters["projector"]
    # 2048·8192 + 2·8192² weights + 2 BatchNorms × 2·8192 = 151 027 712
    assert projector == mlp_num_parameters(2048, "8192-8192-8192") == 151_027_712
    assert estimate.parameters["backbone"] == 23_508_032  # torchvision's ResNet-50 without fc
    total = sum(p.numel() for p in method.parameters())
    assert estimate.total_parameters == estimate.trainable == total
    buffers = sum(b.numel() for b in method.buffers())
    assert estimate.model_mib == pytest.approx(4 * (total + buffers + 2 * total) / 2**20)
    # N = 2048 < 3·8192/4: the two N×N Gram matrices; N = 16384: the 8192×8192 correlation
    assert estimate.loss_matrix == (2048, 2048) and estimate.loss_matrix_mib == 16
    big = memory_estimate(method, global_batch=16384)
    assert big.loss_matrix == (8192, 8192) and big.loss_matrix_mib == 256
    assert "174.5 M parameters" in estimate.summary() and "projector 151.03 M" in estimate.summary()


@pytest.mark.parametrize("name", sorted(METHODS))
def test_estimate_counts_every_method(name: str) -> None:
    cfg = load_config("digits", [f'method.name="{name}"'])
    with torch.device("meta"):
        method = build_method(cfg)
    estimate = memory_estimate(method, global_batch=64, world=2)
    assert estimate.total_parameters == sum(p.numel() for p in method.parameters())
    trainable = sum(p.numel() for p in method.parameters() if p.requires_grad)
    assert estimate.trainable == trainable
    if name in ("byol", "moco"):  # the target / key networks are counted but not trained
        assert estimate.trainable < estimate.total_parameters
    assert min(estimate.loss_matrix) >= 1


def largest(name: str, *params: str, global_batch: int, world: int = 1) -> tuple:
    """The method's own answer for its loss's largest matrix, built on the meta device."""
    cfg = load_config("digits", [f'method.name="{name}"', *params])
    with torch.device("meta"):
        return build_method(cfg).largest_loss_matrix(global_batch, world)


def test_loss_matrix_per_method() -> None:
    n, world = 512, 4
    assert largest("barlow_twins", 'method.projector="64-8192"', global_batch=n) == (
        "N×N Gram matrix",
        (512, 512),
    )
    forced = ('method.projector="64-8192"', 'method.loss_path="correlation"')
    assert largest("vicreg", *forced, global_batch=n)[1] == (8192, 8192)
    simclr = largest("simclr", 'method.projector="128"', global_batch=n, world=world)
    assert simclr[1] == (2 * n // world, 2 * n)
    moco = ('method.projector="128"', "method.queue_size=65536")
    assert largest("moco", *moco, global_batch=n, world=world)[1] == (128, 65537)
    assert largest("byol", 'method.projector="256"', global_batch=n)[1] == (512, 256)
    assert largest("cmc", 'method.projector="32"', global_batch=n, world=world)[1] == (128, 512)


def test_out_of_memory_in_a_step_names_what_to_shrink(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    steps_per_epoch = 1437 // 256
    calls = {"n": 0}
    forward = BarlowTwins.forward

    def out_of_memory(self: BarlowTwins, views: list[torch.Tensor]):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == steps_per_epoch + 3:  # in epoch 2, after the epoch-1 checkpoint
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")
        return forward(self, views)

    monkeypatch.setattr(BarlowTwins, "forward", out_of_memory)
    args = ["pretrain", "--quiet", "--out", str(tmp_path), "--epochs", "2"]
    args += sets(
        'method.projector="32-32"',
        "train.batch_size=256",
        'data.augment_on="device"',
        "optim.warmup_epochs=1",
        "eval.online_knn_every=0",
        "eval.final=false",
    )
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "memory preflight:" in err and "parameters (backbone" in err  # printed at the start
    message = err.split("error: ", 1)[1]
    assert f"out of memory at step {steps_per_epoch + 2} (epoch 2)" in message
    for hint in ("train.batch_size=256", "method.projector='32-32'", "train.precision"):
        assert hint in message
    assert f"{tmp_path / CHECKPOINT_NAME} (epoch 1)" in message
    state = validate_training_checkpoint(tmp_path / CHECKPOINT_NAME)  # intact and complete
    assert (state["epoch"], state["global_step"]) == (1, steps_per_epoch)
