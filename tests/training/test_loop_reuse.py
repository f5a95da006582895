"""The training loop serves a second job: a backbone with a linear head trained on labels (the
shape of fine-tuning), built from the library's parts without copying the loop."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from barlow import checkpoint, data
from barlow.backbones import create_backbone
from barlow.compute import Precision
from barlow.config import Config, load_config
from barlow.logbook import Logbook, Progress
from barlow.methods import StepOutput
from barlow.preemption import PreemptionSignals
from barlow.rundir import RunDir
from barlow.training import StepGuard, TrainingLoop, TrainState
from barlow.training.epoch_data import epoch_loader
from barlow.training.setup import Run, assemble_run
from barlow.training.state import validate_training_checkpoint
from runs import records

CPU = torch.device("cpu")
SETTINGS = [
    'optim.name="sgd"',
    "optim.lr=0.4",
    "optim.warmup_epochs=0",
    "optim.weight_decay=0.0",
    "train.batch_size=128",
    "train.epochs=3",
    "train.log_every=4",
    'train.precision="fp32"',
]


class Classifier(nn.Module):
    """A small CNN and a linear head; the step's loss is the cross-entropy on labels."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = create_backbone("small_cnn", in_channels=1, small_images=True)
        self.head = nn.Linear(self.backbone.num_features, 10)  # type: ignore[arg-type]

    def forward(self, batch: tuple[Tensor, Tensor]) -> StepOutput:
        images, labels = batch
        logits = self.head(self.backbone(images))
        accuracy = (logits.argmax(1) == labels).float().mean()
        return StepOutput(F.cross_entropy(logits, labels), {"accuracy": accuracy.detach()})


class LabelledImages(Dataset[Any]):
    """Indexed by ``(epoch, index)`` as the loop's order gives; the model input carries the
    label: ``((image, label), label)``."""

    def __init__(self, dataset: data.TensorImages) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        image, label = self.dataset[key[1]]
        return (image, label), label


def prepare(inputs: Any, epoch: int, batch: int) -> tuple[Tensor, Tensor]:
    images, labels = inputs
    return (images.float() / 255 - 0.5) / 0.5, labels


def supervised_run(cfg: Config) -> Run:
    torch.manual_seed(cfg.train.seed)
    loader, order = epoch_loader(
        LabelledImages(data.build_dataset("digits", split="train")),  # type: ignore[arg-type]
        local_batch=cfg.train.batch_size,
        world=1,
        rank=0,
        seed=cfg.train.seed,
        num_workers=0,
        device=CPU,
    )
    return assemble_run(
        cfg,
        device=CPU,
        module=Classifier(),
        loader=loader,
        order=order,
        prepare=prepare,
        precision=Precision(None),
        channels_last=False,
    )


def train(cfg: Config, out: Path, state: TrainState | None = None) -> tuple[Run, dict[str, Any]]:
    """Train the classifier with the loop (from ``out``'s checkpoint when one exists)."""
    run, run_dir = supervised_run(cfg), RunDir(out)
    if state is None and run_dir.checkpoint.exists():
        saved = checkpoint.load_checkpoint(run_dir.checkpoint)
        state = TrainState.from_checkpoint(
            saved,
            module=run.module,
            optimizer=run.optimizer,
            scaler=run.scaler,
            steps_per_epoch=run.steps_per_epoch,
        )
    logbook = Logbook(out, tensorboard=False)
    with PreemptionSignals() as signals, contextlib.closing(logbook):
        guard = StepGuard.from_config(cfg, device=CPU, signals=signals)
        loop = TrainingLoop(
            run, run_dir, state or TrainState(), guard=guard, logbook=logbook,
            progress=Progress(enabled=False),
        )  # fmt: skip
        return run, loop.fit()


@torch.no_grad()
def held_out_accuracy(module: nn.Module) -> float:
    images, labels = data.in_memory_images(data.build_dataset("digits", split="test"))  # type: ignore[misc]
    module.eval()
    logits = module.head(module.backbone(prepare((images, labels), 0, 0)[0]))
    return float((logits.argmax(1) == labels).float().mean())


def test_the_loop_trains_a_supervised_objective(tmp_path: Path) -> None:
    cfg = load_config("digits", SETTINGS)
    untrained = held_out_accuracy(supervised_run(cfg).module)
    run, last_epoch = train(cfg, tmp_path)
    accuracy = held_out_accuracy(run.module)
    # 3 epochs of 11 steps: far above chance (0.1) and the untrained head (measured 0.96 / 0.10)
    assert accuracy > 0.85 and accuracy > untrained + 0.5, (accuracy, untrained)
    epochs = records(tmp_path, "epoch")
    assert [r["epoch"] for r in epochs] == [1, 2, 3] and last_epoch["epoch"] == 3
    assert epochs[-1]["loss"] < epochs[0]["loss"] / 2
    assert "accuracy" in records(tmp_path)[0]  # the objective's own log terms reach the logbook
    saved = validate_training_checkpoint(tmp_path / "checkpoint.pt")
    assert (saved["epoch"], saved["global_step"]) == (3, 3 * 11)
    assert "head.weight" in saved["method"]


def test_a_supervised_run_resumes_mid_epoch_bit_identically(tmp_path: Path) -> None:
    straight, _ = train(load_config("digits", SETTINGS), tmp_path / "straight")
    train(load_config("digits", [*SETTINGS, "train.max_steps=16"]), tmp_path / "split")
    assert checkpoint.load_checkpoint(tmp_path / "split" / "checkpoint.pt")["step_in_epoch"] == 5
    resumed, _ = train(load_config("digits", SETTINGS), tmp_path / "split")
    for name, weight in straight.module.state_dict().items():
        assert torch.equal(weight, resumed.module.state_dict()[name]), name
    # negative control: without the checkpoint (a fresh start) the weights differ
    fresh, _ = train(load_config("digits", [*SETTINGS, "train.max_steps=16"]), tmp_path / "other")
    assert not torch.equal(fresh.module.head.weight, straight.module.head.weight)


@pytest.mark.parametrize("poisoned_step", [4])
def test_the_guard_skips_a_nonfinite_supervised_step(
    tmp_path: Path, poisoned_step: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bad-step policy is the loop's, not pretraining's: a NaN batch is skipped here too."""
    calls = {"n": 0}
    forward = Classifier.forward

    def poisoned(self: Classifier, batch: tuple[Tensor, Tensor]) -> StepOutput:
        calls["n"] += 1
        if calls["n"] == poisoned_step:
            batch = (batch[0] * float("nan"), batch[1])
        return forward(self, batch)

    monkeypatch.setattr(Classifier, "forward", poisoned)
    run, _ = train(load_config("digits", [*SETTINGS, "train.skip_nonfinite=1"]), tmp_path)
    assert all(torch.isfinite(t).all() for t in run.module.state_dict().values())
    assert [r["step"] for r in records(tmp_path) if "skipped_nonfinite" in r] == [poisoned_step - 1]
