"""Contrastive losses: SimCLR's NT-Xent, MoCo's InfoNCE with a queue, CMC's multi-view InfoNCE.

SimCLR: Chen, Kornblith, Norouzi & Hinton, "A Simple Framework for Contrastive Learning of
Visual Representations", ICML 2020, arXiv:2002.05709.
MoCo v2: Chen, Fan, Girshick & He, "Improved Baselines with Momentum Contrastive Learning",
arXiv:2003.04297 (MoCo: He et al., CVPR 2020, arXiv:1911.05722).
CMC: Tian, Krishnan & Isola, "Contrastive Multiview Coding", ECCV 2020, arXiv:1906.05849.

Distributed convention, shared by the three: each rank scores only its own anchors against the
candidates it needs (gathered with gradient where they come from the batch), and returns
loss = local mean + (global mean − local mean).detach(). The value is the global-batch loss on
every rank (so every rank logs, and stops on, the same number); the gradient is the local
mean's. A rank's rows then get Σ_ranks ∂L_rank/∂rows (the gather's backward sums the candidate
terms), i.e. W·∂L/∂rows as for barlow_twins_loss, and DDP's averaging makes it exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from barlow import distributed
from barlow.losses.checks import (
    autocast_disabled,
    check_finite,
    check_negatives,
    check_pair,
    check_temperature,
)


class ContrastiveLossOutput(NamedTuple):
    """Result of the contrastive losses: 0-d float32 tensors (float64 for float64 input)."""

    loss: Tensor  # the InfoNCE / NT-Xent value on the global batch
    positive_similarity: Tensor  # mean cosine similarity of the positive pairs (detached)
    accuracy: Tensor  # fraction of anchors whose positive has the largest logit (detached)


def nt_xent_loss(z1: Tensor, z2: Tensor, temperature: float = 0.5) -> ContrastiveLossOutput:
    """SimCLR's NT-Xent: each of the 2N views against the other 2N − 1 (Chen et al., 2020, Eq. 1).

    z1, z2: (N_local, D) projector outputs of the two views, row n of both from the same image.
    Over the global batch of N images, u = z / ‖z‖ for all 2N views, s_ij = u_iᵀu_j / τ and p(i)
    the other view of image i:

        ℓ_i = −log( exp(s_i,p(i)) / Σ_{k≠i} exp(s_ik) ),        L = (1 / 2N) Σ_i ℓ_i

    τ = ``temperature`` (paper: 0.5 for small batches, 0.1 with LARS at batch 4096). Symmetric
    in the two views. Distributed: every rank's 2·N_local anchors are scored against all 2N views
    gathered with gradient, the positive's column offset by rank · N_local (see the convention
    in the module docstring). Float32 inside, also under autocast. Raises ``ValueError`` for bad
    shapes, a global batch < 2 (no negatives), NaN/Inf input (not inside
    :func:`~barlow.losses.checks.finite_checks_by_caller`) or a temperature that is not > 0.
    """
    check_temperature(temperature, paper="0.5, or 0.1 at batch 4096")
    check_pair(z1, z2, ("z1", "z2"))
    world, n_local = distributed.world_size(), z1.shape[0]
    check_negatives(n_local * world)
    dtype = torch.promote_types(z1.dtype, torch.float32)
    with autocast_disabled(z1.device.type):
        u1, u2 = _unit(z1.to(dtype)), _unit(z2.to(dtype))
        g1, g2 = distributed.gather_with_grad(u1), distributed.gather_with_grad(u2)
        check_finite({"z1": g1, "z2": g2}, across_ranks=True)
        n = g1.shape[0]
        anchors = torch.cat([u1, u2])  # (2·N_local, D)
        candidates = torch.cat([g1, g2])  # (2N, D): all views of rank 0, rank 1, …, then again
        logits = anchors @ candidates.T / temperature
        own = torch.arange(n_local, device=z1.device) + distributed.rank() * n_local
        self_column = torch.cat([own, own + n])
        positive_column = torch.cat([own + n, own])
        rows = torch.arange(2 * n_local, device=z1.device)
        # new_full fills on the device; new_tensor would copy from the host, a sync on CUDA.
        logits = logits.index_put((rows, self_column), logits.new_full((), float("-inf")))
        loss = _global_mean(F.cross_entropy(logits, positive_column))
        with torch.no_grad():
            positive = (u1 * u2).sum(dim=1).mean()
            accuracy = (logits.argmax(dim=1) == positive_column).to(dtype).mean()
    return ContrastiveLossOutput(loss, *_global_logs(positive, accuracy))


def info_nce_loss(
    q: Tensor, k: Tensor, queue: Tensor, temperature: float = 0.2
) -> ContrastiveLossOutput:
    """MoCo's InfoNCE: each query against its key and a queue of negatives (He et al., 2020, Eq. 1).

    q: (N_local, D) queries (online encoder), k: (N_local, D) keys of the other view (momentum
    encoder; pass them detached), queue: (K, D) keys of earlier batches. With unit vectors
    û = u / ‖u‖ (the queue is normalised here too, a no-op for a queue of unit keys):

        ℓ_n = −log( exp(q̂_nᵀk̂_n / τ) / (exp(q̂_nᵀk̂_n / τ) + Σ_j exp(q̂_nᵀQ̂_j / τ)) ),
        L = mean_n ℓ_n                                              τ = ``temperature``

    (MoCo v2: τ 0.2, K 65536.) Every term is per row and the queue is the same on every rank, so
    nothing is gathered: the value is made the global-batch mean (see the convention in the
    module docstring). Float32 inside, also under autocast. Raises ``ValueError`` for bad
    shapes, an empty queue, NaN/Inf input (not inside
    :func:`~barlow.losses.checks.finite_checks_by_caller`) or a temperature that is not > 0.
    """
    check_temperature(temperature, paper="0.2 (MoCo v2), 0.07 (MoCo v1)")
    check_pair(q, k, ("q", "k"))
    if queue.ndim != 2 or queue.shape[0] == 0 or queue.shape[1] != q.shape[1]:
        raise ValueError(
            f"queue must be (K, D) with K >= 1 keys of the queries' width D = {q.shape[1]}, "
            f"got shape {tuple(queue.shape)}; build it with the projector's output width"
        )
    dtype = torch.promote_types(q.dtype, torch.float32)
    with autocast_disabled(q.device.type):
        q, k, queue = q.to(dtype), k.to(dtype), queue.to(dtype)
        check_finite({"q": q, "k": k, "queue": queue}, across_ranks=True)
        q_hat, k_hat = _unit(q), _unit(k)
        positive_logit = (q_hat * k_hat).sum(dim=1, keepdim=True)
        logits = torch.cat([positive_logit, q_hat @ _unit(queue).T], dim=1) / temperature
        target = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)  # column 0
        loss = _global_mean(F.cross_entropy(logits, target))
        with torch.no_grad():
            positive = positive_logit.mean()
            accuracy = (logits.argmax(dim=1) == 0).to(dtype).mean()
    return ContrastiveLossOutput(loss, *_global_logs(positive, accuracy))


def multiview_info_nce_loss(
    views: Sequence[Tensor], temperature: float = 0.07
) -> ContrastiveLossOutput:
    """CMC's full-graph InfoNCE over V ≥ 2 views with in-batch negatives (Tian et al., 2019, §3).

    views: V tensors (N_local, D), row n of each from the same image. Over the global batch,
    u^v = z^v / ‖z^v‖; for an ordered pair (i, j) the anchor u^i_n is scored against every
    u^j_m of the other view, m over the N images:

        ℓ^{i→j}_n = −log( exp(u^i_nᵀu^j_n / τ) / Σ_m exp(u^i_nᵀu^j_m / τ) )
        L(V_i, V_j) = mean_n ℓ^{i→j}_n + mean_n ℓ^{j→i}_n,    L = Σ_{i<j} L(V_i, V_j)

    a sum over all V(V − 1)/2 pairs: the paper's "full graph" objective. Negatives are the
    other images of the global batch (gathered with gradient), not the paper's memory bank of
    16384 (see the CMC method). τ = ``temperature`` (paper: 0.07). Distributed, precision and
    errors: as :func:`nt_xent_loss`; ``positive_similarity`` and ``accuracy`` are means over
    the pairs.
    """
    check_temperature(temperature, paper="0.07")
    if len(views) < 2:
        raise ValueError(f"CMC contrasts at least 2 views, got {len(views)}; pass V >= 2 tensors")
    for v, z in enumerate(views[1:], start=1):
        check_pair(views[0], z, ("views[0]", f"views[{v}]"))
    n_local = views[0].shape[0]
    check_negatives(n_local * distributed.world_size())
    dtype = torch.promote_types(views[0].dtype, torch.float32)
    with autocast_disabled(views[0].device.type):
        units = [_unit(z.to(dtype)) for z in views]
        gathered = [distributed.gather_with_grad(u) for u in units]
        check_finite({f"views[{v}]": g for v, g in enumerate(gathered)}, across_ranks=True)
        target = torch.arange(n_local, device=units[0].device) + distributed.rank() * n_local
        local = units[0].new_zeros(())
        positive, accuracy = units[0].new_zeros(()), units[0].new_zeros(())
        pairs = [(i, j) for i in range(len(views)) for j in range(len(views)) if i != j]
        for i, j in pairs:
            logits = units[i] @ gathered[j].T / temperature  # (N_local, N)
            local = local + F.cross_entropy(logits, target)
            with torch.no_grad():
                positive += (units[i] * units[j]).sum(dim=1).mean() / len(pairs)
                accuracy += (logits.argmax(dim=1) == target).to(dtype).mean() / len(pairs)
        loss = _global_mean(local)
    return ContrastiveLossOutput(loss, *_global_logs(positive, accuracy))


def _unit(z: Tensor) -> Tensor:
    return F.normalize(z, dim=1, eps=1e-12)


def _global_mean(local: Tensor) -> Tensor:
    """Value: the mean of ``local`` over ranks. Gradient: ``local``'s (DDP averages it)."""
    if distributed.world_size() == 1:
        return local
    return local + (distributed.all_reduce_mean(local) - local.detach())


def _global_logs(positive: Tensor, accuracy: Tensor) -> tuple[Tensor, Tensor]:
    """Detached global-batch means of the two logged scalars (one small all-reduce)."""
    both = distributed.all_reduce_mean(torch.stack([positive, accuracy]))
    return both[0], both[1]
