"""Fine-tuning with few labels (issue 12): the labelled subsets, the classifier trained by the
same loop as pretraining (resumable bit for bit), its baselines, and transfer to another
dataset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from barlow import data
from barlow.augment import EvalPreprocess, match_channels
from barlow.cli import main
from barlow.config import load_config
from barlow.optim import build_optimizer, set_learning_rate
from barlow.subsets import (
    SHIPPED,
    dataset_labels,
    labelled_subset,
    read_subset_file,
    stratified_subset,
)
from barlow.training.finetune import Classifier
from barlow.training.state import validate_training_checkpoint
from runs import FAST, sets

# --- the labelled subsets ---------------------------------------------------------------------


def test_the_stratified_rule_keeps_every_class_in_proportion() -> None:
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 3)
    chosen = stratified_subset(labels, 0.1)
    counts = torch.bincount(labels[chosen], minlength=3).tolist()
    assert counts == [5, 3, 1]  # round(5), round(3), at least 1
    assert torch.equal(chosen, stratified_subset(labels, 0.1))  # deterministic
    assert torch.equal(chosen, torch.sort(chosen).values) and len(set(chosen.tolist())) == 9
    assert not torch.equal(chosen, stratified_subset(labels, 0.1, seed=1))  # the seed matters


@pytest.mark.parametrize(("name", "percent"), sorted(SHIPPED))
def test_the_shipped_subsets_are_the_rule(name: str, percent: int) -> None:
    """The files make a subset the same everywhere; they must not drift from the rule."""
    train = data.build_dataset(name, split="train")
    shipped = labelled_subset(f"{percent}%", train, name)
    assert "shipped" in shipped.source
    expected = stratified_subset(dataset_labels(train), percent / 100)
    assert torch.equal(shipped.indices, expected)
    counts = torch.bincount(dataset_labels(train)[shipped.indices], minlength=10)
    assert int(counts.min()) >= 1 and len(counts) == 10


def test_a_count_and_an_index_file_give_their_images(tmp_path: Path) -> None:
    train = data.build_dataset("digits", split="train")
    assert len(labelled_subset("100", train, "digits").indices) == 100
    (tmp_path / "mine.txt").write_text("# three\n5\n\n2\n9\n")
    picked = labelled_subset(str(tmp_path / "mine.txt"), train, "digits")
    assert picked.indices.tolist() == [2, 5, 9]


def test_an_index_file_of_names_picks_those_files_of_a_folder(tmp_path: Path) -> None:
    from PIL import Image

    for c in ("cat", "dog"):
        (tmp_path / "train" / c).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8)).save(tmp_path / "train" / c / f"{c}_{i}.png")
    folder = data.image_folder(tmp_path / "train")
    (tmp_path / "list.txt").write_text("dog_1.png\ncat_0.png\n")
    picked = read_subset_file(tmp_path / "list.txt", folder)
    assert sorted(Path(folder.samples[i][0]).name for i in picked) == ["cat_0.png", "dog_1.png"]
    (tmp_path / "bad.txt").write_text("dog_1.png\nbird_7.png\n")
    with pytest.raises(ValueError, match=r"1 of 2 names are not in the training set.*bird_7"):
        read_subset_file(tmp_path / "bad.txt", folder)


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("", "names no image"),
        ("3\n3\n", "more than once"),
        ("1\n99999\n", "names index 99999"),
        ("a.png\n", "not read from files"),
    ],
)
def test_a_bad_index_file_is_named(tmp_path: Path, text: str, error: str) -> None:
    (tmp_path / "list.txt").write_text(text)
    with pytest.raises(ValueError, match=error):
        read_subset_file(tmp_path / "list.txt", data.build_dataset("digits", split="train"))


def test_a_bad_labels_spec_is_named() -> None:
    train = data.build_dataset("digits", split="train")
    with pytest.raises(FileNotFoundError, match="not a percentage"):
        labelled_subset("ten", train, "digits")
    with pytest.raises(ValueError, match="has 1437 images"):
        labelled_subset("5000", train, "digits")


# --- the classifier and its optimizer ----------------------------------------------------------


def test_the_head_learns_at_its_own_rate() -> None:
    """finetune.head_lr / optim.lr scales the head's groups; the backbone's keep the base rate
    (biases and norms at optim.bias_lr)."""
    classifier = Classifier(torch.nn.Sequential(torch.nn.Linear(4, 6)), 6, 3)
    optimizer = build_optimizer(
        "sgd", classifier, lr=0.01, weight_decay=0.0, lr_scales={"head": 100.0}
    )
    set_learning_rate(optimizer, 0.01)
    rates = {group["name"]: group["lr"] for group in optimizer.param_groups}
    assert rates == pytest.approx(
        {"weights": 0.01, "biases": 0.01, "head weights": 1.0, "head biases": 1.0}
    )
    with pytest.raises(ValueError, match="not submodules"):
        build_optimizer("sgd", classifier, lr=0.01, weight_decay=0.0, lr_scales={"neck": 2.0})


# --- end to end ----------------------------------------------------------------------------------

TUNE = [
    "train.epochs=4",
    "train.batch_size=32",
    "optim.lr=0.05",
    "finetune.head_lr=0.5",
    "eval.probe_epochs=20",
    'train.precision="fp32"',
]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("pretrained") / "run"
    args = ["pretrain", "--quiet", "--out", str(run), *sets(*FAST, "train.epochs=3")]
    assert main(args) == 0
    return run / "checkpoint.pt"


@pytest.fixture(scope="module")
def finetuned(pretrained: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("finetuned") / "ft"
    args = ["finetune", str(pretrained), "--labels", "10%", "--out", str(out), "--quiet"]
    assert main([*args, *sets(*TUNE)]) == 0
    return out


def test_finetune_scores_the_encoder_beside_its_baselines(finetuned: Path) -> None:
    results = json.loads((finetuned / "metrics.json").read_text())["finetune"]
    assert results["labelled_images"] == 142 and "shipped digits-10pct.txt" in results["labels"]
    for name in ("fine-tuned", "from scratch"):
        assert set(results[name]) == {"top1", "top5"}
        assert 0 <= results[name]["top1"] <= results[name]["top5"] <= 1, (name, results)
    # 16 steps on 142 labels: the pretrained start is far ahead (measured 56 % against 15 %)
    tuned, scratch = results["fine-tuned"]["top1"], results["from scratch"]["top1"]
    assert tuned > 0.3 and tuned > scratch + 0.15, results
    assert results["linear probe (frozen)"]["top1"] > 0.5, results
    for run in (finetuned, finetuned / "scratch"):
        state = validate_training_checkpoint(run / "checkpoint.pt")
        assert state["global_step"] == 4 * (142 // 32)  # 4 epochs of 4 batches of 32
        assert state["config"]["finetune"]["labels"] == "10%"


def test_a_finished_finetune_is_not_trained_again(pretrained: Path, finetuned: Path) -> None:
    before = {p: p.stat().st_mtime_ns for p in finetuned.rglob("checkpoint*.pt")}
    args = ["finetune", str(pretrained), "--labels", "10%", "--out", str(finetuned), "--quiet"]
    assert main([*args, "--resume", *sets(*TUNE)]) == 0
    assert {p: p.stat().st_mtime_ns for p in finetuned.rglob("checkpoint*.pt")} == before
    assert main([*args, *sets(*TUNE)]) == 2  # without --resume: the directory holds a run


def test_finetune_stopped_mid_run_resumes_bit_for_bit(pretrained: Path, tmp_path: Path) -> None:
    args = ["finetune", str(pretrained), "--labels", "10%", "--quiet"]
    quick = [*TUNE, "finetune.baselines=false"]
    assert main([*args, "--out", str(tmp_path / "whole"), *sets(*quick)]) == 0
    stopped = ["--out", str(tmp_path / "stopped")]
    assert main([*args, *stopped, *sets(*quick, "train.max_steps=6")]) == 0
    assert main([*args, *stopped, "--resume", *sets(*quick)]) == 0
    whole = validate_training_checkpoint(tmp_path / "whole" / "checkpoint.pt")["method"]
    resumed = validate_training_checkpoint(tmp_path / "stopped" / "checkpoint.pt")["method"]
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    earlier = tmp_path / "stopped" / "checkpoint-step00000012.pt"  # kept by train.keep_last=2
    untuned = validate_training_checkpoint(earlier)
    assert not all(torch.equal(whole[k], untuned["method"][k]) for k in whole)  # the control


def test_a_subset_smaller_than_the_batch_trains_at_the_subset_size(
    pretrained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["finetune", str(pretrained), "--labels", "1%", "--out", str(tmp_path), "--quiet"]
    assert main([*args, *sets(*TUNE, "train.epochs=1", "finetune.baselines=false")]) == 0
    assert "train.batch_size 32 > 10 labelled images: using 10" in capsys.readouterr().err


# --- transfer --------------------------------------------------------------------------------


def test_channels_are_matched_to_the_encoder() -> None:
    grey = torch.randint(0, 256, (2, 1, 4, 4), dtype=torch.uint8)
    assert torch.equal(match_channels(grey, 3), grey.expand(-1, 3, -1, -1))
    rgb = torch.zeros(1, 3, 1, 1, dtype=torch.uint8)
    rgb[0, :, 0, 0] = torch.tensor([200, 100, 50], dtype=torch.uint8)
    assert match_channels(rgb, 1).item() == round(0.299 * 200 + 0.587 * 100 + 0.114 * 50)
    pre = EvalPreprocess(8, (0.5,), (0.25,), channels=1)
    assert pre(torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)).shape == (2, 1, 8, 8)
    with pytest.raises(ValueError, match=r"between 1 .* and 3"):
        match_channels(torch.zeros(1, 4, 2, 2), 3)


def test_an_encoder_pretrained_on_fashion_mnist_transfers_to_digits(tmp_path: Path) -> None:
    """Pretrained on Fashion-MNIST (28 px), scored on digits (16 px, resized to 28): kNN and
    linear probe work, and fine-tuning on 10 % of digits learns (chance is 10 %). The fine-tuning
    recipe is the fine-tuning's own: the pretraining's train.max_steps=5 does not carry over."""
    cfg = load_config("fashion-mnist")
    assert cfg.data.dataset == "fashion-mnist"
    run = tmp_path / "fmnist"
    pretrain = ["pretrain", "fashion-mnist", "--quiet", "--out", str(run)]
    assert main([*pretrain, *sets(*FAST, "train.max_steps=5")]) == 0
    ckpt = str(run / "checkpoint.pt")
    assert main(["knn", ckpt, "--data", "digits", "--set", "eval.knn_k=20"]) == 0
    assert main(["linear", ckpt, "--data", "digits", "--set", "eval.probe_epochs=20"]) == 0
    written = json.loads((run / "metrics.json").read_text())
    assert written["knn@digits"]["knn_top1"] > 0.5, written
    assert written["linear_probe@digits"]["test_acc"] > 0.5, written
    assert "knn" not in written  # a transfer result never stands in for the run's own
    out = tmp_path / "transfer"
    args = ["finetune", ckpt, "--data", "digits", "--labels", "10%", "--out", str(out)]
    longer = [*TUNE, "train.epochs=15", "finetune.baselines=false"]  # 60 steps: measured 50 %
    assert main([*args, "--quiet", *sets(*longer)]) == 0
    results = json.loads((out / "metrics.json").read_text())["finetune"]
    assert results["fine-tuned"]["top1"] > 0.3 and "digits-10pct" in results["labels"]
