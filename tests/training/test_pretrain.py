"""The pretraining loop end to end on the embedded digits data (seconds per run)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from barlow import checkpoint
from barlow.config import Config, load_config
from barlow.data import CorruptImageError
from barlow.methods import BarlowTwins
from barlow.training import CHECKPOINT_NAME, NonFiniteLossError, pretrain
from barlow.training.epoch_data import CorruptSample, collate_dropping_corrupt
from barlow.training.state import validate_training_checkpoint
from comparisons import assert_identical
from runs import records, weights

TINY = [
    'method.projector="64-64"',
    "train.batch_size=64",
    "train.epochs=2",
    "train.log_every=5",
    "optim.warmup_epochs=1",
    "eval.online_knn_every=1",
    "eval.probe_epochs=5",
    "eval.knn_k=20",
    "eval.baselines=false",
]


def tiny_config(*extra: str) -> Config:
    return load_config("digits", [*TINY, *extra])


def test_pretrain_writes_a_complete_run(tmp_path: Path) -> None:
    cfg = tiny_config("eval.baselines=true", "train.max_steps=30")
    results = pretrain(cfg, tmp_path, progress=False)

    assert {p.name for p in tmp_path.iterdir()} >= {
        "config.json",
        "metrics.jsonl",
        "metrics.json",
        CHECKPOINT_NAME,
        "backbone.safetensors",
        "tensorboard",
    }
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["config"] == cfg.to_dict()

    epochs, steps = records(tmp_path, "epoch"), records(tmp_path, "train")
    assert [r["epoch"] for r in epochs] == [1]  # max_steps=30 stops inside epoch 2
    assert all(0 <= r["knn_top1"] <= 1 for r in epochs)
    assert all({"loss", "on_diag", "off_diag", "lr", "images_per_s"} <= r.keys() for r in steps)

    state = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (1, 30 - 22, 30)
    rows = results["evaluation"]
    assert set(rows) == {"pretrained", "random init", "raw pixels"}
    assert json.loads((tmp_path / "metrics.json").read_text())["evaluation"] == rows


def test_loss_decreases(tmp_path: Path) -> None:
    """Beating a random-init encoder is tested on Fashion-MNIST (test_learning.py): on digits a
    random small CNN already reaches ~95 % kNN, so there the comparison is noise."""
    cfg = tiny_config("train.epochs=8", "eval.final=false", "eval.online_knn_every=0")
    pretrain(cfg, tmp_path, progress=False)
    losses = [r["loss"] for r in records(tmp_path, "epoch")]
    assert losses[-1] < 0.8 * losses[0]


def test_resume_continues_exactly(tmp_path: Path) -> None:
    straight = tiny_config("eval.online_knn_every=0", "eval.final=false")
    pretrain(straight, tmp_path / "straight", progress=False)

    first = tiny_config("eval.online_knn_every=0", "eval.final=false", "train.epochs=1")
    pretrain(first, tmp_path / "split", progress=False)
    # Same run, continued: the config now asks for 2 epochs.
    pretrain(straight, tmp_path / "split", resume=True, progress=False)

    assert_identical(weights(tmp_path / "straight"), weights(tmp_path / "split"))


def test_output_directory_holding_a_run_is_refused(tmp_path: Path) -> None:
    cfg = tiny_config("train.max_steps=2", "eval.final=false", "eval.online_knn_every=0")
    pretrain(cfg, tmp_path, progress=False)
    before = (tmp_path / CHECKPOINT_NAME).read_bytes()
    with pytest.raises(FileExistsError, match="--resume"):
        pretrain(cfg, tmp_path, progress=False)
    assert (tmp_path / CHECKPOINT_NAME).read_bytes() == before


def test_resume_without_checkpoint_is_an_error(tmp_path: Path) -> None:
    """A directory that does not exist (a mistyped --out) is not a fresh start."""
    with pytest.raises(FileNotFoundError, match="does not exist; check --out"):
        pretrain(tiny_config(), tmp_path / "nothing", resume=True, progress=False)


def test_resume_of_a_different_run_is_refused(tmp_path: Path) -> None:
    pretrain(tiny_config("train.epochs=1", "eval.final=false"), tmp_path, progress=False)
    before = (tmp_path / CHECKPOINT_NAME).read_bytes()
    other = tiny_config('method.projector="32-32"', "eval.final=false")
    with pytest.raises(ValueError) as refused:
        pretrain(other, tmp_path, resume=True, progress=False)
    assert str(refused.value) == (
        f"{tmp_path / CHECKPOINT_NAME} belongs to a different run; these settings differ:\n"
        "  method.projector: checkpoint '64-64', config '32-32'\n"
        "Resume with the run's own settings; or pass --resume-weights-only "
        "(train.resume_weights_only=true) to start a fresh schedule from its weights; or "
        "choose another --out (or --overwrite) for a new run"
    )
    assert (tmp_path / CHECKPOINT_NAME).read_bytes() == before


def test_non_finite_loss_stops_before_saving_nan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"n": 0}
    original = BarlowTwins.forward

    def poisoned(self: BarlowTwins, views: list[torch.Tensor]):  # type: ignore[no-untyped-def]
        out = original(self, views)
        calls["n"] += 1
        if calls["n"] == 30:  # in the second epoch (22 steps per epoch)
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(BarlowTwins, "forward", poisoned)
    with pytest.raises(NonFiniteLossError, match="step 29") as info:
        pretrain(
            tiny_config("eval.final=false", "eval.online_knn_every=0"), tmp_path, progress=False
        )
    assert "epoch 1" in str(info.value)  # names the last good checkpoint
    state = checkpoint.load_checkpoint(tmp_path / CHECKPOINT_NAME)
    assert state["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in state["method"].values() if t.is_floating_point())


def test_batch_larger_than_dataset_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        pretrain(tiny_config("train.batch_size=4096"), tmp_path, progress=False)


def test_precision_needing_a_gpu_is_refused_on_cpu(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="precision"):
        pretrain(
            tiny_config('train.precision="fp16"', 'train.device="cpu"'), tmp_path, progress=False
        )
    assert not (tmp_path / CHECKPOINT_NAME).exists()


def test_resuming_after_a_non_finite_loss_does_not_re_poison(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """R16: the run stops at the NaN step; its last checkpoint resumes to a finite end."""
    calls = {"n": 0}
    original = BarlowTwins.forward

    def poisoned_once(self: BarlowTwins, views: list[torch.Tensor]):  # type: ignore[no-untyped-def]
        out = original(self, views)
        calls["n"] += 1
        if calls["n"] == 3:  # step 2, counted from 0; max_steps=2 saved the step-2 checkpoint
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(BarlowTwins, "forward", poisoned_once)
    fast = ("eval.final=false", "eval.online_knn_every=0", 'data.augment_on="device"')
    pretrain(tiny_config(*fast, "train.max_steps=2"), tmp_path, progress=False)
    with pytest.raises(NonFiniteLossError, match=r"at step 2 .*last good checkpoint: .*checkpoint"):
        pretrain(tiny_config(*fast, "train.max_steps=4"), tmp_path, resume=True, progress=False)
    assert validate_training_checkpoint(tmp_path / CHECKPOINT_NAME)["global_step"] == 2
    assert not list(tmp_path.glob("checkpoint-step*0003.pt"))
    pretrain(tiny_config(*fast, "train.max_steps=4"), tmp_path, resume=True, progress=False)
    state = validate_training_checkpoint(tmp_path / CHECKPOINT_NAME)  # every tensor finite
    assert state["global_step"] == 4


def test_collate_drops_corrupt_samples_and_names_them() -> None:
    good = [((torch.full((1, 2, 2), float(i)),), i) for i in range(3)]
    batch = [good[0], CorruptSample("a.jpg", "cannot decode"), good[1], good[2]]
    (views,), labels, dropped = collate_dropping_corrupt(batch)
    assert views[:, 0, 0, 0].tolist() == [0.0, 1.0, 2.0]  # the others, in order, none repeated
    assert labels.tolist() == [0, 1, 2] and dropped == ["a.jpg"]
    inputs, labels, dropped = collate_dropping_corrupt([CorruptSample("b.png", "x")])
    assert inputs is None and len(labels) == 0 and dropped == ["b.png"]


def image_folder_with_two_corrupt_files(root: Path) -> Path:
    """14 decodable 20×20 PNGs, a 0-byte .jpg and a truncated .png: 16 files."""
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(14):
        pixels = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"good{i:02d}.png")
    (root / "empty.jpg").write_bytes(b"")
    (root / "truncated.png").write_bytes((root / "good00.png").read_bytes()[:100])
    return root


FOLDER_RUN = (
    'method.projector="16-16"',
    "train.batch_size=4",
    "train.epochs=1",
    "data.crop_size=16",
    "eval.final=false",
    "eval.online_knn_every=0",
)


@pytest.mark.parametrize("workers", [0, 1])
def test_a_corrupt_image_stops_the_run_naming_the_file(tmp_path: Path, workers: int) -> None:
    images = image_folder_with_two_corrupt_files(tmp_path / "images")
    cfg = load_config(
        "digits", [f'data.dataset="{images}"', f"data.num_workers={workers}", *FOLDER_RUN]
    )
    with pytest.raises(CorruptImageError, match=r"(empty\.jpg|truncated\.png)") as caught:
        pretrain(cfg, tmp_path / "run", progress=False)
    assert str(images) in str(caught.value) and "corrupt or truncated" in str(caught.value)


@pytest.mark.parametrize("workers", [0, 1])
def test_skip_corrupt_drops_counts_and_reports(
    tmp_path: Path, workers: int, capsys: pytest.CaptureFixture[str]
) -> None:
    images = image_folder_with_two_corrupt_files(tmp_path / "images")
    extra = [f'data.dataset="{images}"', f"data.num_workers={workers}", "data.skip_corrupt=true"]
    results = pretrain(load_config("digits", [*extra, *FOLDER_RUN]), tmp_path / "run")
    expected = sorted(str(images / name) for name in ("empty.jpg", "truncated.png"))
    assert results["corrupt_skipped"] == {"total": 2, "files": expected}
    epochs = records(tmp_path / "run", "epoch")
    assert [(e["corrupt_skipped"], e["corrupt_skipped_total"]) for e in epochs] == [(2, 2)]
    err = capsys.readouterr().err
    assert "2 corrupt image(s) skipped" in err  # the epoch line
    assert "2 corrupt image read(s) skipped in this run, 2 distinct file(s)" in err
    validate_training_checkpoint(tmp_path / "run" / CHECKPOINT_NAME)  # it trained to the end
