"""VICReg's loss (barlow.losses.vicreg): the formula, both paths, the three terms, invariances,
input validation and precision."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from barlow.losses import vicreg_loss

N, D = 12, 7


def pair(seed: int = 0, n: int = N, d: int = D) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d, generator=gen)
    return a, a + 0.7 * torch.randn(n, d, generator=gen)


def vicreg_reference(z1: Tensor, z2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Bardes et al. (2022), Eq. 1–6 with the released code's ½ on the variance, in float64."""
    z1, z2 = z1.double(), z2.double()
    n, d = z1.shape
    invariance = ((z1 - z2) ** 2).sum() / (n * d)
    variance = torch.zeros((), dtype=torch.float64)
    covariance = torch.zeros((), dtype=torch.float64)
    off = ~torch.eye(d, dtype=torch.bool)
    for z in (z1, z2):
        centred = z - z.sum(0) / n
        cov = torch.einsum("ni,nj->ij", centred, centred) / (n - 1)
        std = torch.sqrt(cov.diagonal() + 1e-4)
        variance += torch.clamp(1 - std, min=0).sum() / d / 2
        covariance += cov[off].square().sum() / d
    return invariance, variance, covariance


@pytest.mark.parametrize("path", ["correlation", "gram", "auto"])
@pytest.mark.parametrize("n, d", [(12, 7), (5, 9)])
def test_vicreg_loss_is_the_formula(path: str, n: int, d: int) -> None:
    z1, z2 = pair(7, n, d)
    z1, z2 = 0.6 * z1, 0.6 * z2  # stds below 1, so the hinge is active
    out = vicreg_loss(z1, z2, path=path)  # type: ignore[arg-type]
    invariance, variance, covariance = vicreg_reference(z1, z2)
    assert variance > 0
    for actual, expected in zip(out[1:], (invariance, variance, covariance), strict=True):
        assert torch.allclose(actual.double(), expected, rtol=5e-6)  # measured 3.4e-7
    weighted = 25 * invariance + 25 * variance + 1 * covariance
    assert torch.allclose(out.loss.double(), weighted, rtol=1e-6)  # measured 4.3e-8
    custom = vicreg_loss(z1, z2, 2.0, 3.0, 5.0, path=path)  # type: ignore[arg-type]
    custom_weighted = 2 * invariance + 3 * variance + 5 * covariance
    assert torch.allclose(custom.loss.double(), custom_weighted, rtol=1e-6)  # measured 9.1e-8


@pytest.mark.parametrize("n, d", [(12, 7), (5, 9)])
def test_vicreg_paths_agree_in_value_and_gradient(n: int, d: int) -> None:
    results = []
    for path in ("correlation", "gram"):
        z1, z2 = pair(8, n, d)
        z1.requires_grad_(True)
        z2.requires_grad_(True)
        loss = vicreg_loss(z1, z2, path=path).loss  # type: ignore[arg-type]
        loss.backward()
        results.append((loss.detach(), z1.grad, z2.grad))
    for a, b in zip(*results, strict=True):
        # two summation orders, float32: measured 2.4e-7 absolute, 3.0e-6 relative
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_vicreg_variance_term_is_zero_when_every_std_is_at_least_one() -> None:
    z1, z2 = pair(9)
    z1 = z1 / z1.std(0) * torch.linspace(1.0, 3.0, D)  # column stds from 1 (exactly) to 3
    z2 = z2 / z2.std(0) * 1.5
    assert vicreg_loss(z1, z2).variance == 0
    # One column shrunk below 1: the hinge is that column's shortfall / D / 2.
    z2[:, 4] *= 0.5 / 1.5
    expected = (1 - math.sqrt(0.25 + 1e-4)) / D / 2
    # float32 against the float64 value: measured 0 (a few ulps allowed)
    assert torch.allclose(vicreg_loss(z1, z2).variance, torch.tensor(expected), rtol=1e-6)


def test_vicreg_variance_term_of_a_collapsed_batch() -> None:
    z = torch.ones(N, D)
    out = vicreg_loss(z, z)
    # float32 against the float64 value: measured 1.2e-7
    assert torch.allclose(out.variance, torch.tensor(1 - math.sqrt(1e-4)), rtol=2e-6, atol=0)
    assert out.invariance == 0 and out.covariance == 0


@pytest.mark.parametrize("path", ["correlation", "gram"])
def test_vicreg_covariance_is_zero_for_decorrelated_dimensions(path: str) -> None:
    # Columns 1..7 of the 8×8 Hadamard matrix: centred and mutually orthogonal.
    h = torch.ones(1, 1)
    for _ in range(3):
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    z1 = h[:, 1:] * torch.arange(1.0, 8.0)  # any scale per dimension
    z2 = h[:, [3, 1, 2, 7, 5, 6, 4]]
    out = vicreg_loss(z1, z2, path=path)  # type: ignore[arg-type]
    if path == "correlation":  # the D×D path zeroes the diagonal: no cancellation
        assert out.covariance == 0
    else:  # ‖C‖²_F − Σ_j C_jj², with float32 rounding of ‖C‖²_F / D
        variances = z1.var(0)
        assert out.covariance.abs() < 1e-6 * variances.square().sum() / 7  # measured 1.0e-7 of it
    mixed = z1 + 0.5 * z1.roll(1, dims=1)  # correlated neighbours: the term must notice
    assert vicreg_loss(mixed, z2, path=path).covariance > 0.1  # type: ignore[arg-type]


def test_vicreg_statistics_ignore_a_shift() -> None:
    z1, z2 = pair(10)
    shift = torch.randn(D) * 5
    base, shifted = vicreg_loss(z1, z2), vicreg_loss(z1 + shift, z2 + shift)
    for a, b in zip(base, shifted, strict=True):
        # centring subtracts the shift, rounding aside: measured 3.3e-7 relative
        assert torch.allclose(a, b, rtol=5e-6, atol=0)
    # Only the invariance term sees a shift of one view: it grows by ‖shift‖² / D.
    one = vicreg_loss(z1 + shift, z2)
    assert torch.allclose(one.variance, base.variance, rtol=5e-6, atol=0)
    assert torch.allclose(one.covariance, base.covariance, rtol=5e-6, atol=0)
    assert one.invariance > base.invariance


def test_vicreg_loss_rejects_bad_input() -> None:
    z1, z2 = pair(11)
    with pytest.raises(ValueError, match="2-D"):
        vicreg_loss(z1.flatten(), z2.flatten())
    with pytest.raises(ValueError, match="same shape"):
        vicreg_loss(z1, z2[:-1])
    with pytest.raises(ValueError, match="at least 2"):
        vicreg_loss(z1[:1], z2[:1])
    broken = z1.clone()
    broken[0, 0] = math.nan
    with pytest.raises(ValueError, match="z1 contains NaN or Inf"):
        vicreg_loss(broken, z2)
    for kwargs, name in [
        ({"sim_coeff": -1.0}, "sim_coeff"),
        ({"std_coeff": math.inf}, "std_coeff"),
        ({"cov_coeff": -0.1}, "cov_coeff"),
        ({"gamma": 0.0}, "gamma"),
        ({"eps": 0.0}, "eps"),
        ({"path": "fast"}, "path"),
    ]:
        with pytest.raises(ValueError, match=name):
            vicreg_loss(z1, z2, **kwargs)  # type: ignore[arg-type]


def test_vicreg_loss_is_float32_under_autocast() -> None:
    z1, z2 = pair(12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = vicreg_loss(z1.bfloat16(), z2.bfloat16())
    assert all(t.dtype == torch.float32 for t in out)
    expected = vicreg_loss(z1.bfloat16().float(), z2.bfloat16().float())
    assert torch.equal(out.loss, expected.loss)  # the loss upcasts before it computes
