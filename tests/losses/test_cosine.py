"""BYOL's and SimSiam's losses (barlow.losses.cosine): the formulas, scale invariance,
stop-gradient, input validation and precision."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from barlow.losses import negative_cosine, normalized_mse

N, D = 12, 7


def pair(seed: int = 0, n: int = N, d: int = D) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d, generator=gen)
    return a, a + 0.7 * torch.randn(n, d, generator=gen)


def cosines(p: Tensor, z: Tensor) -> Tensor:
    """cos(p_n, z_n) written out, in float64."""
    p, z = p.double(), z.double()
    return (p * z).sum(1) / (p.square().sum(1).sqrt() * z.square().sum(1).sqrt())


def test_normalized_mse_is_the_formula() -> None:
    p, z = pair()
    expected = (2 - 2 * cosines(p, z)).mean()
    # ‖p̂ − ẑ‖² written out as well: the two forms of BYOL's Eq. 2 agree.
    p_hat = p.double() / p.double().norm(dim=1, keepdim=True)
    z_hat = z.double() / z.double().norm(dim=1, keepdim=True)
    assert torch.allclose(expected, (p_hat - z_hat).square().sum(1).mean(), rtol=1e-14)
    # float32 against float64: measured 3.4e-7
    assert torch.allclose(normalized_mse(p, z).double(), expected, rtol=2e-6)


def test_negative_cosine_is_the_formula() -> None:
    p, z = pair(1)
    # float32 against float64: measured 4.3e-8
    assert torch.allclose(negative_cosine(p, z).double(), -cosines(p, z).mean(), rtol=1e-6)


def test_cosine_losses_at_their_extremes() -> None:
    p, _ = pair(2)
    # measured 0; 1e-6 is two float32 ulps of 4
    assert normalized_mse(p, p).abs() < 1e-6
    assert normalized_mse(p, -p).sub(4).abs() < 1e-6
    assert negative_cosine(p, 3 * p).add(1).abs() < 1e-6


@pytest.mark.parametrize("loss_fn", [normalized_mse, negative_cosine])
@pytest.mark.parametrize("scale_p, scale_z", [(3.0, 1.0), (1.0, 0.01), (250.0, 7.0)])
def test_cosine_losses_ignore_positive_scales(loss_fn, scale_p: float, scale_z: float) -> None:  # type: ignore[no-untyped-def]
    p, z = pair(3)
    per_row = torch.linspace(0.5, 4.0, N).unsqueeze(1)  # also a different scale per image
    scaled = loss_fn(scale_p * per_row * p, scale_z * z)
    assert torch.allclose(scaled, loss_fn(p, z), rtol=1e-6, atol=0)  # measured 0


@pytest.mark.parametrize("loss_fn", [normalized_mse, negative_cosine])
def test_cosine_losses_stop_the_gradient_at_z(loss_fn) -> None:  # type: ignore[no-untyped-def]
    p, z = pair(4)
    p.requires_grad_(True)
    z.requires_grad_(True)
    grad_p, grad_z = torch.autograd.grad(loss_fn(p, z), [p, z], allow_unused=True)
    assert grad_z is None
    assert grad_p is not None and grad_p.abs().sum() > 0
    # Scale invariance in p means the gradient is orthogonal to p, image by image.
    assert (grad_p * p).sum(1).abs().max() < 2e-7  # measured 1.5e-8


@pytest.mark.parametrize("loss_fn", [normalized_mse, negative_cosine])
def test_cosine_losses_reject_bad_input(loss_fn) -> None:  # type: ignore[no-untyped-def]
    p, z = pair(5)
    with pytest.raises(ValueError, match="2-D"):
        loss_fn(p.unsqueeze(0), z.unsqueeze(0))
    with pytest.raises(ValueError, match="same shape"):
        loss_fn(p, z[:, :-1])
    with pytest.raises(ValueError, match="no samples"):
        loss_fn(p[:0], z[:0])
    for bad in (math.nan, math.inf):
        broken = z.clone()
        broken[3, 2] = bad
        with pytest.raises(ValueError, match="z contains NaN or Inf"):
            loss_fn(p, broken)


def test_cosine_losses_are_float32_under_autocast() -> None:
    p, z = pair(6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = normalized_mse(p.bfloat16(), z.bfloat16())
    assert out.dtype == torch.float32
    # the loss upcasts before it computes
    assert torch.equal(out, normalized_mse(p.bfloat16().float(), z.bfloat16().float()))
