"""VICReg: invariance, variance and covariance terms on the global batch.

Bardes, Ponce & LeCun, "VICReg: Variance-Invariance-Covariance Regularization for
Self-Supervised Learning", ICLR 2022, arXiv:2105.04906.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from barlow import distributed
from barlow.losses.barlow_twins import LOSS_PATHS, LossPath
from barlow.losses.checks import autocast_disabled, check_global_batch, check_pair


class VICRegLossOutput(NamedTuple):
    """Result of :func:`vicreg_loss`: 0-d float32 tensors (float64 for float64 input); the three
    terms are not multiplied by their coefficients."""

    loss: Tensor  # sim_coeff·invariance + std_coeff·variance + cov_coeff·covariance
    invariance: Tensor  # mean over N·D of (z1 − z2)²
    variance: Tensor  # ½ Σ_views mean_j max(0, γ − sqrt(Var z_j + ε))
    covariance: Tensor  # Σ_views Σ_{i≠j} C_ij² / D


def vicreg_loss(
    z1: Tensor,
    z2: Tensor,
    sim_coeff: float = 25.0,
    std_coeff: float = 25.0,
    cov_coeff: float = 1.0,
    *,
    gamma: float = 1.0,
    eps: float = 1e-4,
    path: LossPath = "auto",
) -> VICRegLossOutput:
    """VICReg: invariance + variance + covariance regularisation (Bardes et al., 2022, Eq. 1–6).

    z1, z2: (N_local, D) projector outputs of the two views, row n of both from the same image.
    All three terms use the *global* batch of N images (gathered with gradient), with
    z̄ = z − mean_batch(z):

        s = (1 / (N·D)) Σ_n ‖z1_n − z2_n‖²                          invariance (MSE)
        v = ½ Σ_{z∈{z1,z2}} (1/D) Σ_j max(0, γ − sqrt(Var(z_j) + ε))   Var unbiased (N − 1)
        c = Σ_{z∈{z1,z2}} (1/D) Σ_{i≠j} C(z)_ij²,  C(z) = z̄ᵀz̄ / (N − 1)
        L = sim_coeff·s + std_coeff·v + cov_coeff·c                 paper: 25, 25, 1; γ 1, ε 1e-4

    The ½ in v follows the released code (the paper's Eq. 6 writes v(Z) + v(Z'); its 25/25/1
    were tuned with the code's form). ``path`` chooses how Σ_{i≠j} C_ij² is computed:
    "correlation" from the D×D matrix with its diagonal zeroed (~4·N·D² flops forward and
    backward, memory D²); "gram" as ‖z̄z̄ᵀ‖²_F − Σ_j ‖z̄_j‖⁴ from the N×N Gram matrix (~4·N²·D,
    memory N²; ‖z̄ᵀz̄‖²_F = ‖z̄z̄ᵀ‖²_F); "auto" the Gram matrix when N < D. They agree to float32
    rounding: the Gram form is a difference, off by ~1e-7·‖C‖²_F, negligible unless C is
    close to diagonal with very unequal variances.

    Distributed: as :func:`barlow_twins_loss` — every rank computes L on the gathered global
    batch, so loss and gradients after DDP's averaging equal one process on the concatenated
    batch (the released code's invariance term uses the local batch only; its gradient is the
    same, its value is not). Every rank must call it with the same (N_local, D). Float32 inside,
    also under autocast. Raises ``ValueError`` for bad shapes, a global batch < 2, NaN/Inf
    input (not inside :func:`~barlow.losses.checks.finite_checks_by_caller`), negative
    coefficients, γ ≤ 0, ε ≤ 0 or an unknown ``path``.
    """
    _check_arguments(sim_coeff, std_coeff, cov_coeff, gamma, eps, path)
    check_pair(z1, z2, ("z1", "z2"))
    dtype = torch.promote_types(z1.dtype, torch.float32)
    with autocast_disabled(z1.device.type):
        z1 = distributed.gather_with_grad(z1.to(dtype))
        z2 = distributed.gather_with_grad(z2.to(dtype))
        check_global_batch(z1, z2)
        n, d = z1.shape
        gram = path == "gram" or (path == "auto" and n < d)
        invariance = (z1 - z2).square().mean()
        variance = z1.new_zeros(())
        covariance = z1.new_zeros(())
        for z in (z1, z2):
            centred = z - z.mean(dim=0)
            var = centred.square().sum(dim=0) / (n - 1)
            variance = variance + (gamma - torch.sqrt(var + eps)).clamp_min(0).mean() / 2
            off_diagonal_sq = _OffDiagonalSquaredSum.apply(centred, gram) / (n - 1) ** 2
            covariance = covariance + off_diagonal_sq / d
        loss = sim_coeff * invariance + std_coeff * variance + cov_coeff * covariance
    return VICRegLossOutput(loss, invariance, variance, covariance)


class _OffDiagonalSquaredSum(torch.autograd.Function):
    """Σ_{i≠j} (AᵀA)_ij² for A of shape (N, D), from either product, with a one-product backward.

    - D×D (``gram=False``): M = AᵀA with its diagonal zeroed; value ‖M‖²_F, gradient 4·A·M.
      Exact: no difference of large sums.
    - N×N (``gram=True``): G = AAᵀ, d_j = ‖A_{:,j}‖² (the diagonal of AᵀA); since
      ‖AᵀA‖²_F = ‖AAᵀ‖²_F the value is ‖G‖²_F − ‖d‖², gradient 4·(G·A − A·diag(d)). In float32
      its absolute error is ~1e-7·‖AᵀA‖²_F.

    Plain autograd would differentiate the product through both of its operands: two products
    where one suffices.
    """

    @staticmethod
    def forward(ctx: Any, a: Tensor, gram: bool) -> Tensor:
        ctx.gram = gram
        if gram:
            g, d = a @ a.T, a.square().sum(dim=0)
            ctx.save_for_backward(a, g, d)
            # Row norms, then a sum: more accurate than one float32 sum over all N² entries.
            return torch.linalg.vector_norm(g, dim=1).square().sum() - d.square().sum()
        m = a.T @ a
        m.fill_diagonal_(0)
        ctx.save_for_backward(a, m)
        return torch.linalg.vector_norm(m, dim=1).square().sum()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        if ctx.gram:
            a, g, d = ctx.saved_tensors
            return (g @ a - a * d) * (4 * grad), None
        a, m = ctx.saved_tensors
        return (a @ m) * (4 * grad), None


def _check_arguments(
    sim_coeff: float, std_coeff: float, cov_coeff: float, gamma: float, eps: float, path: str
) -> None:
    if path not in LOSS_PATHS:
        raise ValueError(f"unknown path={path!r}; choose one of {', '.join(LOSS_PATHS)}")
    for name, value, paper in (
        ("sim_coeff", sim_coeff, 25.0),
        ("std_coeff", std_coeff, 25.0),
        ("cov_coeff", cov_coeff, 1.0),
    ):
        if not 0 <= value < float("inf"):
            raise ValueError(f"{name} must be a finite number >= 0 (paper: {paper}), got {value}")
    if not 0 < gamma < float("inf"):
        raise ValueError(f"gamma (the target std) must be > 0 (paper: 1.0), got {gamma}")
    if not 0 < eps < float("inf"):
        raise ValueError(f"eps must be > 0 to keep sqrt differentiable (paper: 1e-4), got {eps}")
