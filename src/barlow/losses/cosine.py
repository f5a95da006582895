"""BYOL's and SimSiam's losses: the cosine between a prediction and a stop-gradient target.

BYOL: Grill et al., "Bootstrap Your Own Latent", NeurIPS 2020, arXiv:2006.07733.
SimSiam: Chen & He, "Exploring Simple Siamese Representation Learning", CVPR 2021,
arXiv:2011.10566.
"""

from __future__ import annotations

import torch
from torch import Tensor

from barlow import distributed
from barlow.losses.checks import autocast_disabled, check_finite, check_pair


def normalized_mse(p: Tensor, z: Tensor) -> Tensor:
    """BYOL's regression loss: ‖p̂ − ẑ‖² = 2 − 2·cos(p, z) per image, averaged over the batch.

    p: (N_local, D) online predictions; z: (N_local, D) target projections of the *other* view,
    row n of both from the same image. p̂ = p / max(‖p‖, 1e-12), likewise ẑ. z is a constant
    (stop-gradient): the loss detaches it. BYOL's total loss sums both directions,
    ``normalized_mse(p1, z2') + normalized_mse(p2, z1')`` (Grill et al., 2020, Eq. 2 and the
    symmetrised L + L̃), so it lies in [0, 8]; each direction here is a batch *mean*, as in the
    released code.

    Distributed: the per-image values are gathered with gradient, so every rank returns the mean
    over the global batch, and after DDP's averaging the gradients equal one process on the
    concatenated batch (each rank's rows get W·∂L/∂p from the gather's backward, DDP divides by W).
    Every rank must call it with the same N_local. Float32 inside, also under autocast.
    Raises ``ValueError`` for non-2-D or mismatched shapes, an empty batch or NaN/Inf input (not
    inside :func:`~barlow.losses.checks.finite_checks_by_caller`).
    """
    return 2 - 2 * _global_mean_cosine(p, z)


def negative_cosine(p: Tensor, z: Tensor) -> Tensor:
    """SimSiam's D(p, z) = −cos(p, stopgrad(z)), averaged over the batch; a value in [−1, 1].

    p: (N_local, D) predictor outputs; z: (N_local, D) projector outputs of the *other* view. The
    loss detaches z. SimSiam's symmetric loss is ``½·D(p1, z2) + ½·D(p2, z1)`` (Chen & He, 2021,
    Eq. 2–4). Distributed, precision and errors: as :func:`normalized_mse` (global-batch mean).
    """
    return -_global_mean_cosine(p, z)


def _global_mean_cosine(p: Tensor, z: Tensor) -> Tensor:
    """Mean over the global batch of cos(p_n, stopgrad(z_n)), float32, differentiable in p."""
    check_pair(p, z, ("p", "z"))
    dtype = torch.promote_types(p.dtype, torch.float32)
    with autocast_disabled(p.device.type):
        p, z = p.to(dtype), z.detach().to(dtype)
        check_finite({"p": p, "z": z}, across_ranks=True)
        p_hat = p / torch.linalg.vector_norm(p, dim=1, keepdim=True).clamp_min(1e-12)
        z_hat = z / torch.linalg.vector_norm(z, dim=1, keepdim=True).clamp_min(1e-12)
        # Gathering N scalars is all it takes for the global mean; no embeddings cross ranks.
        cosine = distributed.gather_with_grad((p_hat * z_hat).sum(dim=1))
        return cosine.mean()
