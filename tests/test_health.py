"""Collapse monitor: std of ℓ2-normalised embeddings, effective rank, and the watch."""

import math

import pytest
import torch

from barlow.health import CollapseWatch, embedding_health


def gaussian(n: int, d: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("n", "d"), [(512, 16), (256, 128), (64, 256)])
def test_isotropic_gaussian_is_healthy(n: int, d: int) -> None:
    stats = embedding_health(gaussian(n, d))
    # sampling noise of a finite Gaussian batch: measured 1.25e-2 at worst of the 3 sizes
    assert stats["std"] == pytest.approx(1 / math.sqrt(d), rel=0.1)
    assert stats["std_ratio"] == pytest.approx(1.0, rel=0.1)
    # a Gaussian matrix's singular values spread (Marchenko-Pastur), so not exactly 1
    assert stats["rank_fraction"] > 0.7
    assert CollapseWatch(patience=1).update(stats) is None


def test_identical_rows_are_collapsed() -> None:
    z = gaussian(1, 32).repeat(100, 1)
    stats = embedding_health(z)
    assert stats["std"] == pytest.approx(0.0, abs=1e-7)
    assert stats["effective_rank"] == pytest.approx(1.0, abs=1e-6)
    assert stats["rank_fraction"] == pytest.approx(1 / 32, abs=1e-6)
    assert CollapseWatch(patience=1).update(stats) is not None


@pytest.mark.parametrize("k", [1, 3, 10])
def test_rank_k_embeddings_have_effective_rank_about_k(k: int) -> None:
    # equal singular values along k orthonormal directions: exactly k; random ones: a bit less
    q, _ = torch.linalg.qr(gaussian(64, 64, seed=1))
    exact = embedding_health(q[:, :k] @ q[:k, :])
    assert exact["effective_rank"] == pytest.approx(k, rel=1e-12)  # measured 2.1e-14
    z = gaussian(200, k, seed=2) @ gaussian(k, 64, seed=3)
    stats = embedding_health(z)
    assert 0.6 * k <= stats["effective_rank"] <= k + 1e-6


def test_scale_invariance_and_no_nan_for_zero_rows() -> None:
    z = gaussian(50, 8)
    a, b = embedding_health(z), embedding_health(1000 * z)
    assert a == pytest.approx(b, rel=5e-9)  # measured 3.0e-10
    zero = embedding_health(torch.zeros(4, 8))
    assert zero == {"std": 0.0, "std_ratio": 0.0, "effective_rank": 0.0, "rank_fraction": 0.0}


def test_low_precision_and_gradients_are_fine() -> None:
    z = gaussian(32, 16).bfloat16().requires_grad_()
    stats = embedding_health(z)
    assert all(isinstance(v, float) and math.isfinite(v) for v in stats.values())
    assert z.grad is None


@pytest.mark.parametrize(
    ("z", "match"),
    [
        (torch.zeros(1, 4), "N >= 2"),
        (torch.zeros(4), "N >= 2"),
        (torch.tensor([[0.0, float("nan")], [1.0, 2.0]]), "NaN"),
    ],
)
def test_bad_input_is_an_error(z: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        embedding_health(z)


def test_watch_needs_patience_consecutive_bad_checks() -> None:
    healthy = embedding_health(gaussian(64, 16))
    collapsed = embedding_health(torch.ones(64, 16))
    watch = CollapseWatch(patience=3)
    assert [watch.update(s) for s in (collapsed, collapsed, healthy)] == [None] * 3
    assert watch.update(collapsed) is None and watch.update(collapsed) is None
    message = watch.update(collapsed)
    assert message is not None and "3 consecutive checks" in message and "optim.lr" in message
    assert watch.update(collapsed) is not None  # keeps flagging
    assert watch.update(healthy) is None and watch.bad_checks == 0


def test_watch_flags_dimensional_collapse_through_the_rank() -> None:
    # spread along 1 of 256 directions: std stays up, the rank gives it away
    z = torch.cat([gaussian(128, 1), torch.zeros(128, 255)], dim=1) + 1e-3 * gaussian(128, 256)
    stats = embedding_health(z)
    assert stats["std_ratio"] > 0.1 and stats["rank_fraction"] < 0.05
    assert CollapseWatch(patience=1, min_rank_fraction=0.05).update(stats) is not None
    assert CollapseWatch(patience=1, min_rank_fraction=0.0).update(stats) is None


@pytest.mark.parametrize(
    "kwargs", [{"patience": 0}, {"min_std_ratio": -1.0}, {"min_rank_fraction": 2.0}]
)
def test_watch_rejects_bad_thresholds(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        CollapseWatch(**kwargs)
