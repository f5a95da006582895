"""Evaluation: kNN against a brute-force reference, the probe against sklearn, frozen backbones."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from torch import Tensor, nn

from barlow.evaluate import (
    Features,
    extract_features,
    knn_accuracy,
    knn_predict,
    linear_eval,
    linear_probe,
    write_metrics,
)

CPU = torch.device("cpu")


# ------------------------------------------------------------------------------ data and models


@pytest.fixture(scope="module")
def digits() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """sklearn digits as uint8 (N, 1, 8, 8) images: 1347 train / 450 test, stratified."""
    bunch = load_digits()
    images = (bunch.images * 15).astype(np.uint8)[:, None]  # 0..16 → 0..240
    x_tr, x_te, y_tr, y_te = train_test_split(
        images, bunch.target, test_size=0.25, random_state=0, stratify=bunch.target
    )
    return (
        torch.from_numpy(x_tr),
        torch.from_numpy(y_tr),
        torch.from_numpy(x_te),
        torch.from_numpy(y_te),
    )


def pixel_features(images: Tensor, labels: Tensor) -> Features:
    return Features(images.flatten(1).float(), labels.long())


def batches(images: Tensor, labels: Tensor, size: int = 64) -> list[tuple[Tensor, Tensor]]:
    return [(images[s : s + size], labels[s : s + size]) for s in range(0, len(images), size)]


def normalise(images: Tensor) -> Tensor:
    return (images.float() / 255 - 0.25) / 0.35


def tiny_encoder() -> nn.Sequential:
    """A random conv net with BatchNorm: (B, 1, 8, 8) → (B, 32) standardised features."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.BatchNorm1d(32),
    )


def warmed_up(encoder: nn.Module, images: Tensor) -> nn.Module:
    """BN running statistics of ``images`` (as pretraining leaves them), then left in train mode
    (the dangerous case for a frozen backbone)."""
    norms = [m for m in encoder.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.momentum = None  # cumulative average: the statistics of this one batch
    encoder.train()
    with torch.no_grad():
        encoder(normalise(images))
    for m in norms:
        m.momentum = 0.1
    return encoder


def snapshot(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_bitwise_equal(before: dict[str, Tensor], module: nn.Module) -> None:
    after = module.state_dict()
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert torch.equal(value, after[key]), key


# ------------------------------------------------------------------------------------------ kNN


def reference_knn(train: Features, test: Features, k: int, temperature: float) -> Tensor:
    """Brute force: the full similarity matrix, one test point at a time; ties by a stable sort
    (lower train index first) and by the lowest class."""
    bank = train.features / train.features.norm(dim=1, keepdim=True)
    queries = test.features / test.features.norm(dim=1, keepdim=True)
    similarity = queries @ bank.T
    num_classes = int(max(train.labels.max(), test.labels.max())) + 1
    predictions = []
    for row in similarity:
        order = row.sort(descending=True, stable=True).indices[: min(k, len(row))]
        scores = [0.0] * num_classes
        for j in order.tolist():
            scores[int(train.labels[j])] += math.exp(float(row[j]) / temperature)
        predictions.append(max(range(num_classes), key=lambda c: (scores[c], -c)))
    return torch.tensor(predictions)


def random_features(n: int, dim: int = 16, classes: int = 5, seed: int = 0) -> Features:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(classes, (n,), generator=g)
    centres = torch.randn(classes, dim, generator=g)
    return Features(centres[labels] + 1.5 * torch.randn(n, dim, generator=g), labels)


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 1000])
@pytest.mark.parametrize(("k", "temperature"), [(1, 0.1), (10, 0.1), (25, 0.5)])
def test_knn_matches_brute_force_reference(chunk_size: int, k: int, temperature: float) -> None:
    train, test = random_features(300, seed=1), random_features(97, seed=2)

    predicted = knn_predict(train, test, k=k, temperature=temperature, chunk_size=chunk_size)

    expected = reference_knn(train, test, k, temperature)
    assert torch.equal(predicted, expected)
    accuracy = knn_accuracy(train, test, k=k, temperature=temperature, chunk_size=chunk_size)
    assert accuracy == (expected == test.labels).double().mean().item()


@pytest.mark.parametrize("chunk_size", [1, 5, 64])
def test_knn_breaks_ties_like_the_reference(chunk_size: int) -> None:
    # One-hot features: every similarity is exactly 0 or 1, so neighbours tie massively.
    g = torch.Generator().manual_seed(3)
    train = Features(
        torch.eye(4)[torch.randint(4, (40,), generator=g)], torch.randint(6, (40,), generator=g)
    )
    test = Features(
        torch.eye(4)[torch.randint(4, (23,), generator=g)], torch.randint(6, (23,), generator=g)
    )

    for k in (1, 3, 8, 15):
        predicted = knn_predict(train, test, k=k, chunk_size=chunk_size)
        assert torch.equal(predicted, reference_knn(train, test, k, 0.1)), k


def test_knn_tied_neighbours_and_tied_votes_go_to_the_lowest_index() -> None:
    same = torch.ones(4, 2)
    train = Features(same, torch.tensor([2, 1, 0, 3]))
    test = Features(torch.ones(1, 2), torch.tensor([1]))

    # k=2: neighbours 0 and 1 (not 2 or 3); their equal votes for classes 2 and 1 go to class 1
    assert knn_predict(train, test, k=2).tolist() == [1]
    assert knn_predict(train, test, k=3).tolist() == [0]


def test_knn_with_k_above_the_bank_uses_the_whole_bank() -> None:
    train, test = random_features(50, seed=4), random_features(30, seed=5)

    assert torch.equal(knn_predict(train, test, k=10_000), knn_predict(train, test, k=50))
    assert torch.equal(knn_predict(train, test, k=10_000), reference_knn(train, test, 50, 0.1))


def test_knn_on_a_separable_toy_set_is_perfect() -> None:
    g = torch.Generator().manual_seed(6)
    labels = torch.randint(3, (60,), generator=g)
    directions = torch.eye(3) * 10
    features = directions[labels] + 0.1 * torch.randn(60, 3, generator=g)
    train, test = Features(features[:40], labels[:40]), Features(features[40:], labels[40:])

    assert knn_accuracy(train, test, k=200) == 1.0


def test_knn_small_temperature_stays_finite() -> None:
    train, test = random_features(100, seed=7), random_features(40, seed=8)

    # exp(1 / 0.001) overflows float32; the votes must still follow the nearest neighbours
    accuracy = knn_accuracy(train, test, k=5, temperature=0.001)
    assert accuracy == knn_accuracy(train, test, k=1)


def test_knn_on_digits_pixels(digits: tuple[Tensor, Tensor, Tensor, Tensor]) -> None:
    x_tr, y_tr, x_te, y_te = digits

    accuracy = knn_accuracy(pixel_features(x_tr, y_tr), pixel_features(x_te, y_te), k=20)

    assert accuracy >= 0.9


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"train": Features(torch.zeros(0, 16), torch.zeros(0, dtype=torch.long))},
            "train features are empty",
        ),
        (
            {"test": Features(torch.zeros(0, 16), torch.zeros(0, dtype=torch.long))},
            "test features are empty",
        ),
        (
            {"test": Features(torch.randn(5, 8), torch.zeros(5, dtype=torch.long))},
            "dimension mismatch",
        ),
        ({"k": 0}, "k must be >= 1"),
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -0.1}, "temperature"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"num_classes": 3}, "num_classes"),
        (
            {"train": Features(torch.full((5, 16), math.nan), torch.zeros(5, dtype=torch.long))},
            "NaN",
        ),
    ],
)
def test_knn_rejects_bad_arguments(change: dict[str, object], message: str) -> None:
    arguments: dict[str, object] = {
        "train": random_features(20),
        "test": random_features(10),
        "k": 5,
    }
    arguments.update(change)

    with pytest.raises(ValueError, match=message):
        knn_accuracy(**arguments)  # type: ignore[arg-type]


def test_features_reject_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="labels must be"):
        Features(torch.zeros(4, 3), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="features must be"):
        Features(torch.zeros(4, 3, 2), torch.zeros(4, dtype=torch.long))


# --------------------------------------------------------------------------------- linear probe


def test_linear_probe_is_close_to_sklearn_on_digits(
    digits: tuple[Tensor, Tensor, Tensor, Tensor],
) -> None:
    x_tr, y_tr, x_te, y_te = digits
    train, test = pixel_features(x_tr, y_tr), pixel_features(x_te, y_te)
    scaler = StandardScaler().fit(train.features.numpy())
    sklearn_model = LogisticRegression(max_iter=1000).fit(
        scaler.transform(train.features.numpy()), y_tr.numpy()
    )
    sklearn_accuracy = sklearn_model.score(scaler.transform(test.features.numpy()), y_te.numpy())

    result = linear_probe(train, test, device=CPU)

    assert set(result) == {"train_acc", "test_acc", "train_loss"}
    assert result["test_acc"] >= 0.9
    # two solvers: measured 1 of 450 test images (0.0022); 0.01 is 4.5 images
    assert abs(result["test_acc"] - sklearn_accuracy) <= 0.01, (result, sklearn_accuracy)
    assert result["train_acc"] >= result["test_acc"] - 0.02
    assert math.isfinite(result["train_loss"])


def test_linear_probe_does_not_depend_on_chunking(
    digits: tuple[Tensor, Tensor, Tensor, Tensor],
) -> None:
    x_tr, y_tr, x_te, y_te = digits
    train, test = pixel_features(x_tr, y_tr), pixel_features(x_te, y_te)

    whole = linear_probe(train, test, epochs=20, device=CPU)
    chunked = linear_probe(train, test, epochs=20, chunk_size=100, device=CPU)

    # chunking changes summation order only: measured 0 (accuracy), 7.6e-7 (loss)
    assert chunked["test_acc"] == pytest.approx(whole["test_acc"], abs=1 / 450)
    assert chunked["train_loss"] == pytest.approx(whole["train_loss"], rel=1e-5)


def test_linear_probe_leaves_the_features_untouched() -> None:
    train, test = random_features(80, seed=9), random_features(20, seed=10)
    before = train.features.clone()

    linear_probe(train, test, epochs=5, device=CPU)

    assert torch.equal(train.features, before)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"epochs": 0}, "epochs"),
        ({"weight_decay": -1.0}, "weight_decay"),
        ({"chunk_size": 0}, "chunk_size"),
    ],
)
def test_linear_probe_rejects_bad_arguments(change: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        linear_probe(random_features(20), random_features(10), device=CPU, **change)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- feature extraction


def test_extract_features_keeps_the_encoder_and_the_order(
    digits: tuple[Tensor, Tensor, Tensor, Tensor],
) -> None:
    x_tr, y_tr, _, _ = digits
    images, labels = x_tr[:200], y_tr[:200]
    encoder = warmed_up(tiny_encoder(), x_tr[:512])
    encoder[4].eval()  # a deliberately frozen BN inside a training model keeps its own mode
    modes = [m.training for m in encoder.modules()]
    before = snapshot(encoder)
    calls: list[tuple[torch.dtype, int]] = []

    def preprocess(x: Tensor) -> Tensor:
        calls.append((x.dtype, len(x)))
        return normalise(x)

    features = extract_features(
        encoder, batches(images, labels, 64), device=CPU, preprocess=preprocess
    )

    assert [m.training for m in encoder.modules()] == modes
    assert_bitwise_equal(before, encoder)
    assert torch.equal(features.labels, labels.long())
    assert features.features.shape == (200, 32) and features.features.dtype == torch.float32
    assert calls == [(torch.uint8, 64), (torch.uint8, 64), (torch.uint8, 64), (torch.uint8, 8)]
    with torch.no_grad():
        expected = encoder.eval()(normalise(images))
    torch.testing.assert_close(features.features, expected)
    # Negative control: an extraction that left the encoder in train mode would move BatchNorm's
    # statistics, and the bitwise comparison above sees it.
    with torch.no_grad():
        encoder.train()(normalise(images[:64]))
    with pytest.raises(AssertionError):
        assert_bitwise_equal(before, encoder)


def test_extract_features_takes_float_images_and_refuses_raw_uint8() -> None:
    encoder = tiny_encoder()
    images, labels = torch.randint(0, 255, (10, 1, 8, 8), dtype=torch.uint8), torch.arange(10)

    floats = extract_features(encoder, [(normalise(images), labels)], device=CPU)
    assert floats.features.shape == (10, 32)
    with pytest.raises(ValueError, match="preprocess"):
        extract_features(encoder, [(images, labels)], device=CPU)
    with pytest.raises(ValueError, match="no batches"):
        extract_features(encoder, [], device=CPU, preprocess=normalise)


def test_extract_features_progress_prints_plain_lines(capsys: pytest.CaptureFixture[str]) -> None:
    images, labels = torch.randint(0, 255, (10, 1, 8, 8), dtype=torch.uint8), torch.arange(10)

    extract_features(
        tiny_encoder(),
        batches(images, labels, 4),
        device=CPU,
        preprocess=normalise,
        progress="feats",
    )

    assert "feats: 3 batches" in capsys.readouterr().err


# ------------------------------------------------------------------------------ linear evaluation


def test_linear_eval_learns_on_a_frozen_backbone(
    digits: tuple[Tensor, Tensor, Tensor, Tensor],
) -> None:
    x_tr, y_tr, x_te, y_te = digits
    encoder = warmed_up(tiny_encoder(), x_tr[:512])
    before = snapshot(encoder)
    requires_grad = [p.requires_grad for p in encoder.parameters()]
    augmented: list[torch.dtype] = []

    def contrast_jitter(images: Tensor) -> Tensor:
        """A stand-in for the caller's augmentation: per-image contrast in [0.8, 1.2]."""
        augmented.append(images.dtype)
        contrast = torch.empty(len(images), 1, 1, 1).uniform_(0.8, 1.2)
        return normalise(images) * contrast

    torch.manual_seed(0)
    result = linear_eval(
        encoder,
        batches(x_tr, y_tr, 64),
        batches(x_te, y_te, 100),
        num_classes=10,
        feature_dim=32,
        device=CPU,
        train_transform=contrast_jitter,
        test_preprocess=normalise,
        epochs=3,
    )

    assert augmented == [torch.uint8] * 3 * len(batches(x_tr, y_tr, 64))
    assert_bitwise_equal(before, encoder)
    assert encoder.training and all(m.training for m in encoder.modules())
    assert [p.requires_grad for p in encoder.parameters()] == requires_grad
    assert all(p.grad is None for p in encoder.parameters())
    assert set(result) == {"top1", "top5", "train_loss"}
    assert 0.5 < result["top1"] <= result["top5"] <= 1.0  # chance is 0.1
    assert 0 < result["train_loss"] < math.log(10)


def test_linear_eval_reports_top1_only_below_five_classes(
    digits: tuple[Tensor, Tensor, Tensor, Tensor],
) -> None:
    x_tr, y_tr, x_te, y_te = digits
    keep_tr, keep_te = y_tr < 3, y_te < 3

    result = linear_eval(
        tiny_encoder(),
        batches(x_tr[keep_tr], y_tr[keep_tr]),
        batches(x_te[keep_te], y_te[keep_te]),
        num_classes=3,
        feature_dim=32,
        device=CPU,
        train_transform=normalise,
        test_preprocess=normalise,
        epochs=1,
    )

    assert set(result) == {"top1", "train_loss"}


def one_shot(images: Tensor, labels: Tensor) -> Iterator[tuple[Tensor, Tensor]]:
    yield from batches(images, labels)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"feature_dim": 16}, "feature_dim=32"),
        ({"num_classes": 1}, "num_classes"),
        ({"epochs": 0}, "epochs"),
        ({"lr": 0.0}, "lr"),
        ({"momentum": 1.0}, "momentum"),
        ({"train_loader": "one-shot"}, "one-shot iterator"),
        ({"num_classes": 5}, r"labels must be in \[0, 5\)"),
    ],
)
def test_linear_eval_rejects_bad_arguments(change: dict[str, object], message: str) -> None:
    images, labels = torch.randint(0, 255, (20, 1, 8, 8), dtype=torch.uint8), torch.arange(20) % 10
    arguments: dict[str, object] = {
        "train_loader": batches(images, labels),
        "test_loader": batches(images, labels),
        "num_classes": 10,
        "feature_dim": 32,
        "device": CPU,
        "train_transform": normalise,
        "test_preprocess": normalise,
        "epochs": 2,
    }
    arguments.update(change)
    if arguments["train_loader"] == "one-shot":
        arguments["train_loader"] = one_shot(images, labels)

    with pytest.raises(ValueError, match=message):
        linear_eval(tiny_encoder(), **arguments)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------ metrics.json


def test_write_metrics_merges_into_valid_json(tmp_path: Path) -> None:
    path = tmp_path / "metrics.json"

    write_metrics(path, {"knn": {"knn_top1": 0.5, "k": 20}, "pretrain": {"loss": 1.0}})
    write_metrics(
        path,
        {"knn": {"knn_top1": torch.tensor(0.75)}, "linear_probe": {"test_acc": np.float32(0.5)}},
    )
    write_metrics(path, {"odd": {"loss": math.nan, "tensor": torch.arange(3)}})

    text = path.read_text()
    saved = json.loads(text)
    assert saved == {
        "knn": {"knn_top1": 0.75},
        "linear_probe": {"test_acc": 0.5},
        "pretrain": {"loss": 1.0},
        "odd": {"loss": "nan", "tensor": [0, 1, 2]},
    }
    assert list(saved) == sorted(saved) and text.startswith('{\n  "')
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temp file left behind


def test_write_metrics_refuses_to_overwrite_a_corrupt_file(tmp_path: Path) -> None:
    path = tmp_path / "metrics.json"
    path.write_text("{not json")

    with pytest.raises(ValueError, match="not valid JSON"):
        write_metrics(path, {"knn": 0.5})
    assert path.read_text() == "{not json"


def test_write_metrics_leaves_the_old_file_when_serialising_fails(tmp_path: Path) -> None:
    path = tmp_path / "metrics.json"
    write_metrics(path, {"knn": 0.5})
    before = path.read_bytes()

    with pytest.raises(TypeError):
        write_metrics(path, {"bad": object()})

    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
