"""``data.holdout``: labelled training images held out of pretraining and scored on instead of
the test split, so a recipe can be chosen without the test labels."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from barlow import data
from barlow.assessment import EvalData
from barlow.config import load_config
from barlow.training import pretrain
from barlow.training.setup import pretraining_data
from runs import FAST


def test_holdout_parts_are_disjoint_complete_sorted_and_fixed() -> None:
    kept, held = data.holdout_indices(100, 20)
    assert len(held) == 20 and len(kept) == 80
    assert torch.equal(torch.sort(torch.cat([kept, held])).values, torch.arange(100))
    assert torch.equal(kept, kept.sort().values) and torch.equal(held, held.sort().values)
    again_kept, again_held = data.holdout_indices(100, 20)
    assert torch.equal(held, again_held) and torch.equal(kept, again_kept)
    assert not torch.equal(held, torch.arange(20))  # a draw, not the first images
    for count in (0, 100, 150):
        with pytest.raises(ValueError, match=rf"data\.holdout={count} must be at least 1"):
            data.holdout_indices(100, count)


def test_pretraining_never_sees_the_held_out_images() -> None:
    cfg = load_config("digits", ["data.holdout=300"])
    train = data.build_dataset("digits", split="train")
    images = pretraining_data(cfg, torch.device("cpu")).dataset
    kept, held = data.holdout_indices(len(train), 300)
    assert len(images) == len(train) - 300
    assert torch.equal(images.images, train.images[kept])
    seen = {bytes(x.numpy()) for x in images.images}
    assert not any(bytes(x.numpy()) in seen for x in train.images[held] if x.any())


def test_evaluation_scores_on_the_held_out_images() -> None:
    cfg = load_config("digits", ["data.holdout=300"])
    splits = EvalData.from_config(cfg)
    train = data.build_dataset("digits", split="train")
    kept, held = data.holdout_indices(len(train), 300)
    assert torch.equal(splits.test.images, train.images[held])
    assert torch.equal(splits.train.images, train.images[kept])
    assert splits.test_split == "300 held-out training images (data.holdout)"
    assert EvalData.from_config(load_config("digits", [])).test_split == "test split"
    # naming the run's own dataset keeps its holdout
    assert EvalData.from_config(cfg, dataset="digits").test_split.endswith("(data.holdout)")


def test_holdout_is_refused_where_pretraining_adds_unlabelled_images() -> None:
    unlabeled = data.TensorImages(
        torch.zeros(12, 3, 4, 4, dtype=torch.uint8), torch.full((12,), -1), []
    )
    with pytest.raises(ValueError, match=r"pretrained on its labelled train split.*holdout=0"):
        data.without_holdout(unlabeled, "stl10", 3)
    with pytest.raises(ValueError, match=r"data\.holdout must be >= 0"):
        load_config("digits", ["data.holdout=-1"])


def test_a_run_says_what_it_was_scored_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = [*FAST, "data.holdout=300", "eval.final=true", "eval.probe_epochs=5"]
    pretrain(load_config("digits", settings), tmp_path, progress=False)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["evaluated_on"] == "300 held-out training images (data.holdout)"
    assert 0 < metrics["evaluation"]["pretrained"]["knn_top1"] <= 1
    assert "digits 300 held-out training images (data.holdout):" in capsys.readouterr().err
