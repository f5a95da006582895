"""Progressive resolution (``data.start_crop_size``): the side of each epoch's views, on both view
paths, and a resumed run that draws what an uninterrupted one drew."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from barlow.augment import CropRamp, ViewSpec
from barlow.config import Config, load_config
from barlow.training import pretrain
from barlow.training.epoch_data import DeviceViews
from comparisons import assert_identical
from runs import records, weights

TINY = [
    'method.projector="32-32"',
    "train.batch_size=64",
    "train.epochs=4",
    "optim.warmup_epochs=1",
    "eval.online_knn_every=0",
    "eval.final=false",
    "data.start_crop_size=8",
    "data.crop_ramp_epochs=2",
]
STEPS_PER_EPOCH = 1437 // 64  # digits without the held-back images: 22 steps


def tiny(*extra: str) -> Config:
    return load_config("digits", [*TINY, *extra])


def test_the_side_grows_linearly_to_the_full_one_and_stays() -> None:
    ramp = CropRamp(start=16, full=28, epochs=4)
    assert [ramp.size(e) for e in range(7)] == [16, 19, 22, 25, 28, 28, 28]
    specs = ramp.specs((ViewSpec(crop_size=28), ViewSpec(crop_size=28, solarize_p=0.2)), 1)
    assert [s.crop_size for s in specs] == [19, 19] and specs[1].solarize_p == 0.2


@pytest.mark.parametrize(
    ("start", "full", "epochs", "message"),
    [
        (28, 28, 4, "below the full crop side 28"),
        (3, 28, 4, "at least 4 px"),
        (16, 28, 0, "at least 1 epoch"),
    ],
)
def test_a_ramp_that_cannot_grow_is_refused(
    start: int, full: int, epochs: int, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        CropRamp(start=start, full=full, epochs=epochs)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.start_crop_size=2"], r"data\.start_crop_size must be >= 4"),
        (["data.crop_ramp_epochs=2"], r"data\.crop_ramp_epochs=2 needs data\.start_crop_size"),
        (["data.start_crop_size=8", "data.crop_ramp_epochs=0"], r"at least 1 epoch"),
        (
            ["data.start_crop_size=8", "data.crop_ramp_epochs=4", "train.epochs=4"],
            r"must reach the full side before the last epoch",
        ),
        (["data.start_crop_size=8", "train.epochs=1"], r"must reach the full side"),
    ],
)
def test_bad_ramp_settings_name_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_config("digits", overrides)


def test_a_start_side_not_below_the_full_one_fails_before_training(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"data\.start_crop_size=16 must be .* below the full"):
        pretrain(tiny("data.start_crop_size=16"), tmp_path, progress=False)


def test_device_views_draw_the_epoch_side() -> None:
    views = DeviceViews(
        (ViewSpec(crop_size=16, mean=(0.5,), std=(0.5,)),) * 2,
        seed=0,
        world=1,
        rank=0,
        device=torch.device("cpu"),
        ramp=CropRamp(start=8, full=16, epochs=2),
    )
    images = torch.randint(0, 256, (4, 1, 16, 16), dtype=torch.uint8)
    sides = [views(images, epoch=e, batch=0)[0].shape[-1] for e in range(4)]
    assert sides == [8, 12, 16, 16]


@pytest.mark.parametrize("augment_on", ["device", "workers"])
def test_each_epoch_trains_at_its_side_and_ends_at_the_full_one(
    tmp_path: Path, augment_on: str
) -> None:
    pretrain(tiny(f'data.augment_on="{augment_on}"'), tmp_path, progress=False)
    assert [r["crop_size"] for r in records(tmp_path, "epoch")] == [8, 12, 16, 16]


def test_a_resumed_ramp_equals_the_uninterrupted_run(tmp_path: Path) -> None:
    on_device, stop = 'data.augment_on="device"', STEPS_PER_EPOCH + 5  # inside epoch 2 (side 12)
    pretrain(tiny(on_device), tmp_path / "straight", progress=False)
    pretrain(tiny(on_device, f"train.max_steps={stop}"), tmp_path / "split", progress=False)
    pretrain(tiny(on_device), tmp_path / "split", resume=True, progress=False)
    assert_identical(weights(tmp_path / "split"), weights(tmp_path / "straight"))
