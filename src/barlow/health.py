"""Collapse monitors: how spread out a batch of embeddings is.

Two numbers per batch of embeddings z (N, D), logged once per epoch:

- **std** of the ℓ2-normalised embeddings ẑ = z / ‖z‖, averaged over dimensions (SimSiam, Chen
  & He 2021, §4.1). When the ẑ are spread over the sphere each coordinate has variance ≈ 1/D, so
  std ≈ 1/√D; when every input maps to one vector (complete collapse) std = 0. ``std_ratio`` =
  std·√D is ≈ 1 healthy and → 0 at collapse, comparable across D.
- **effective rank** of z (RankMe, Garrido et al. 2023): with singular values σ_k of z and
  p_k = σ_k / Σ_j σ_j, erank = exp(−Σ_k p_k log p_k), between 1 (one direction) and min(N, D)
  (all directions equally used); ``rank_fraction`` = erank / min(N, D). It falls when the
  embeddings use few dimensions (dimensional collapse) even while std stays up. Uncentred, as in
  RankMe, so complete collapse gives erank = 1 rather than an undefined 0/0.

:class:`CollapseWatch` turns the per-epoch numbers into a warning after ``patience`` consecutive
bad checks; the training loop warns, or with ``--abort-on-collapse`` raises :class:`CollapseError`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor


class CollapseError(RuntimeError):
    """The embeddings stayed collapsed for ``patience`` checks and the run was asked to stop."""


def normalized_std(z: Tensor) -> Tensor:
    """Mean over dimensions of the batch std of z/‖z‖ (Chen & He, 2021, Fig. 2): 0 on collapse.

    The per-step monitor: a tensor on the device, no host sync (``embedding_health`` is the
    per-epoch one, with the effective rank).
    """
    z = z.detach().float()
    z = z / torch.linalg.vector_norm(z, dim=1, keepdim=True).clamp_min(1e-12)
    return z.std(dim=0).mean()


def embedding_health(z: Tensor) -> dict[str, float]:
    """Collapse statistics of a batch of embeddings ``z`` (N, D), N ≥ 2.

    Returns ``std`` (mean over dimensions of the per-dimension standard deviation of the rows of
    ``z`` scaled to unit ℓ2 norm, ≈ 1/√D healthy, 0 collapsed), ``std_ratio`` (std·√D),
    ``effective_rank`` (exp of the entropy of the normalised singular values of ``z``, in
    [1, min(N, D)]; 0 for an all-zero ``z``) and ``rank_fraction`` (effective_rank / min(N, D)).
    Computed in float64 without gradients; singular values below σ_max·max(N, D)·eps of ``z``'s
    dtype (float32 at least) are rounding noise and left out (``matrix_rank``'s tolerance).
    """
    if z.ndim != 2 or z.shape[0] < 2 or z.shape[1] < 1:
        raise ValueError(
            f"embedding_health needs z of shape (N, D) with N >= 2, got {tuple(z.shape)}; "
            "pass a batch of embeddings, flattened to 2-D"
        )
    # float32's eps at least: a bf16 eps (8e-3) would discard real directions of a bf16 batch
    eps = torch.finfo(torch.promote_types(z.dtype, torch.float32)).eps
    z = z.detach().to(torch.float64)
    if not bool(torch.isfinite(z).all()):
        raise ValueError("embedding_health got NaN or infinite embeddings; the run has diverged")
    n, d = z.shape
    # rows of norm 0 stay 0 (F.normalize's eps): they count as collapsed, not as NaN
    unit = z / z.norm(dim=1, keepdim=True).clamp_min(1e-12)
    std = float(unit.std(dim=0, correction=0).mean())
    sigma = torch.linalg.svdvals(z)
    # singular values below the rounding noise of z's own dtype are zeros (matrix_rank's rule)
    sigma = sigma[sigma > sigma.max() * max(n, d) * eps]
    total = float(sigma.sum())
    if total == 0.0:
        effective_rank = 0.0
    else:
        p = sigma / total
        effective_rank = math.exp(float(-(p * p.log()).sum()))
    return {
        "std": std,
        "std_ratio": std * math.sqrt(d),
        "effective_rank": effective_rank,
        "rank_fraction": effective_rank / min(n, d),
    }


@dataclass
class CollapseWatch:
    """Flags collapse when the statistics of :func:`embedding_health` stay low.

    A check is bad when ``std_ratio < min_std_ratio`` or ``rank_fraction < min_rank_fraction``;
    :meth:`update` returns a message once ``patience`` consecutive checks were bad (and on every
    bad check after that), else None. The defaults flag complete collapse (std_ratio ≈ 0,
    effective rank ≈ 1) but not a healthy run: isotropic embeddings give std_ratio ≈ 1, and a
    Barlow Twins projector output uses most of its dimensions.
    """

    min_std_ratio: float = 0.1
    min_rank_fraction: float = 0.01
    patience: int = 3
    bad_checks: int = 0

    def __post_init__(self) -> None:
        if self.patience < 1:
            raise ValueError(f"patience must be >= 1 check, got {self.patience}")
        if not (self.min_std_ratio >= 0 and 0 <= self.min_rank_fraction <= 1):
            raise ValueError(
                f"thresholds must be min_std_ratio >= 0 and 0 <= min_rank_fraction <= 1, got "
                f"{self.min_std_ratio} and {self.min_rank_fraction}"
            )

    def update(self, stats: Mapping[str, float]) -> str | None:
        """Record one check (the dict :func:`embedding_health` returned); a message if flagged."""
        bad = (
            stats["std_ratio"] < self.min_std_ratio
            or stats["rank_fraction"] < self.min_rank_fraction
        )
        self.bad_checks = self.bad_checks + 1 if bad else 0
        if self.bad_checks < self.patience:
            return None
        return (
            f"the embeddings look collapsed for {self.bad_checks} consecutive checks: std of the "
            f"l2-normalised embeddings x sqrt(D) = {stats['std_ratio']:.3g} (healthy ~ 1, "
            f"threshold {self.min_std_ratio}), effective rank fraction "
            f"{stats['rank_fraction']:.3g} (effective rank {stats['effective_rank']:.3g}, "
            f"threshold {self.min_rank_fraction}). Try a lower optim.lr or longer "
            "optim.warmup_epochs, stronger augmentations, or check the method's "
            "hyper-parameters (e.g. lambd, the predictor, target_momentum)"
        )
