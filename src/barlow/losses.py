"""Loss functions on embeddings: pure functions, float32 inside, exact across processes.

Barlow Twins: Zbontar, Jing, Misra, LeCun, Deny, "Barlow Twins: Self-Supervised Learning via
Redundancy Reduction", ICML 2021, arXiv:2103.03230.
"""

from __future__ import annotations

import contextlib
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from barlow import distributed

LossPath = Literal["auto", "correlation", "gram"]
LOSS_PATHS: tuple[LossPath, ...] = ("auto", "correlation", "gram")


class BarlowTwinsLossOutput(NamedTuple):
    """Result of :func:`barlow_twins_loss`: 0-d float32 tensors (float64 for float64 input)."""

    loss: Tensor  # on_diag + λ·off_diag
    on_diag: Tensor  # Σ_i (1 − C_ii)²
    off_diag: Tensor  # Σ_{i≠j} C_ij², not multiplied by λ


def off_diagonal(x: Tensor) -> Tensor:
    """The off-diagonal elements of a square (D, D) matrix, as a flat (D·(D − 1),) copy.

    Row-major order. Without the first element, the flattened matrix splits into D − 1 rows of
    D + 1 elements, each ending with one diagonal element; dropping that last column drops
    exactly the diagonal.
    """
    if x.ndim != 2 or x.shape[0] != x.shape[1]:
        raise ValueError(f"off_diagonal needs a square 2-D matrix, got shape {tuple(x.shape)}")
    d = x.shape[0]
    return x.flatten()[1:].view(d - 1, d + 1)[:, :-1].flatten()


def standardize(z: Tensor, eps: float = 1e-5) -> Tensor:
    """Standardise each column of z (N, D) over the batch: (z − mean) / sqrt(var + eps).

    Biased variance (divide by N), as ``BatchNorm1d(affine=False)`` in training mode.
    """
    if z.ndim != 2:
        raise ValueError(f"standardize expects (N, D) embeddings, got shape {tuple(z.shape)}")
    var, mean = torch.var_mean(z, dim=0, correction=0)
    return (z - mean) * torch.rsqrt(var + eps)


def choose_path(n: int, d: int) -> Literal["correlation", "gram"]:
    """The cheaper way to compute the Barlow Twins loss for a global batch N and dimension D.

    Cost model, counting matrix-product flops of forward + backward:

    - "correlation": C = Ẑ1ᵀẐ2 (2·N·D²) and its two backward products → 6·N·D²; memory ~D².
    - "gram": Ẑ1Ẑ1ᵀ and Ẑ2Ẑ2ᵀ (4·N²·D) and the backward G2·Ẑ1, G1·Ẑ2 (4·N²·D) → 8·N²·D;
      memory ~N² + N·D.

    "gram" is cheaper when 8·N²·D < 6·N·D², i.e. N < 3·D/4: a batch of 256–2048 with the paper's
    D = 8192 projector takes the Gram path, a small projector with a large batch the D×D one.
    """
    if n < 1 or d < 1:
        raise ValueError(f"choose_path needs n >= 1 and d >= 1, got n={n}, d={d}")
    return "gram" if 4 * n < 3 * d else "correlation"


def barlow_twins_loss(
    z1: Tensor,
    z2: Tensor,
    lambd: float = 0.0051,
    *,
    path: LossPath = "auto",
    eps: float = 1e-5,
) -> BarlowTwinsLossOutput:
    """Barlow Twins redundancy-reduction loss (Zbontar et al., 2021, arXiv:2103.03230).

    z1, z2: (N_local, D) projector outputs of the two views of the same images, row n of z1 and
    of z2 from the same image. Each view is standardised over the *global* batch of N images
    (biased variance, ``eps``, as ``BatchNorm1d(affine=False)`` in training mode), and

        C = Ẑ1ᵀ Ẑ2 / N                                    (D, D) cross-correlation
        L = Σ_i (1 − C_ii)² + λ Σ_{i≠j} C_ij²              λ = ``lambd``

    ``path`` picks how ‖C‖²_F (hence the off-diagonal sum ‖C‖²_F − Σ_i C_ii²) is computed; both
    give the same loss up to float32 rounding, and C_ii = Σ_n Ẑ1[n, i] Ẑ2[n, i] / N is O(N·D):

    - "correlation": from the D×D matrix C. Cost ~N·D², memory ~D².
    - "gram": ‖C‖²_F = ⟨Ẑ1Ẑ1ᵀ, Ẑ2Ẑ2ᵀ⟩ / N² from the two N×N Gram matrices (trace cyclicity:
      tr(Ẑ2ᵀẐ1Ẑ1ᵀẐ2) = tr(Ẑ1Ẑ1ᵀ·Ẑ2Ẑ2ᵀ)). Cost ~N²·D, memory ~N² + N·D.
    - "auto": :func:`choose_path` (the Gram path when N < 3·D/4).

    Distributed: under ``torchrun`` each rank passes its local shard. The loss gathers both views
    from all ranks with :func:`barlow.distributed.gather_with_grad` and computes L on the full
    global batch on every rank. The gather's backward sums the (identical) gradients of all W
    ranks, so each rank's gradient w.r.t. its own rows is W·∂L/∂z; DDP then averages parameter
    gradients over the W ranks, and the W and 1/W cancel: loss and gradients equal one process
    on the concatenated batch. Every rank must call it, with the same (N_local, D).

    Precision: inputs are upcast to float32 (float64 stays float64) and autocast is disabled
    inside, because fp16 sums over a D×D matrix overflow. The off-diagonal sum is a difference
    of two sums: in float32 its absolute error is ~1e-7·‖C‖²_F, negligible unless C is close to
    diagonal with N > D, a regime where "auto" uses the D×D path anyway.

    Returns ``BarlowTwinsLossOutput(loss, on_diag, off_diag)``, 0-d tensors; ``off_diag`` is not
    multiplied by λ. Raises ``ValueError`` on bad shapes, a global batch < 2, NaN/Inf input, a
    negative ``lambd`` or an unknown ``path``; the NaN/Inf check costs one device-to-host sync.
    """
    _check_arguments(z1, z2, lambd, path, eps)
    dtype = torch.promote_types(z1.dtype, torch.float32)
    with _autocast_disabled(z1.device.type):
        z1, z2 = z1.to(dtype), z2.to(dtype)
        if distributed.world_size() > 1:
            z1, z2 = distributed.gather_with_grad(z1), distributed.gather_with_grad(z2)
        _check_global_batch(z1, z2)
        n, d = z1.shape
        if path == "auto":
            path = choose_path(n, d)
        a, b = standardize(z1, eps), standardize(z2, eps)
        diag = (a * b).sum(dim=0) / n
        on_diag = (1 - diag).square().sum()
        if path == "correlation":
            c = a.T @ (b / n)  # scaling the (N, D) factor avoids a second D×D array
            frobenius_sq = _SquaredFrobeniusNorm.apply(c)
        else:
            frobenius_sq = _GramInnerProduct.apply(a, b) / n**2
        off_diag = frobenius_sq - diag.square().sum()
        loss = on_diag + lambd * off_diag
    return BarlowTwinsLossOutput(loss, on_diag, off_diag)


class _SquaredFrobeniusNorm(torch.autograd.Function):
    """‖C‖²_F = Σ_ij C_ij² of a (D, D) matrix, holding at most one more D×D array (the gradient).

    Plain autograd of ``c.square().sum()`` or of ``vector_norm`` keeps two or three D×D
    temporaries alive (256 MiB each at D = 8192).
    """

    @staticmethod
    def forward(ctx: Any, c: Tensor) -> Tensor:
        ctx.save_for_backward(c)
        # Norms of rows, then a sum: a single vector_norm over all D² entries accumulates in
        # float32 too coarsely (1 % off at D = 8192 on CPU with torch 2.14).
        return torch.linalg.vector_norm(c, dim=1).square().sum()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (c,) = ctx.saved_tensors
        return c * (2 * grad)


class _GramInnerProduct(torch.autograd.Function):
    """⟨A·Aᵀ, B·Bᵀ⟩ for A, B of shape (N, D), i.e. ‖AᵀB‖²_F, with a one-product backward.

    ∂/∂A = 2·(B·Bᵀ)·A and ∂/∂B = 2·(A·Aᵀ)·B because both Gram matrices are symmetric. Plain
    autograd would differentiate each A·Aᵀ through both of its operands: twice the products.
    """

    @staticmethod
    def forward(ctx: Any, a: Tensor, b: Tensor) -> Tensor:
        gram_a, gram_b = a @ a.T, b @ b.T
        ctx.save_for_backward(a, b, gram_a, gram_b)
        return (gram_a * gram_b).sum()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        a, b, gram_a, gram_b = ctx.saved_tensors
        grad_a = (gram_b @ a) * (2 * grad) if ctx.needs_input_grad[0] else None
        grad_b = (gram_a @ b) * (2 * grad) if ctx.needs_input_grad[1] else None
        return grad_a, grad_b


def _check_arguments(z1: Tensor, z2: Tensor, lambd: float, path: str, eps: float) -> None:
    if path not in LOSS_PATHS:
        raise ValueError(f"unknown path={path!r}; choose one of {', '.join(LOSS_PATHS)}")
    if not lambd >= 0:
        raise ValueError(f"lambd must be >= 0 (the paper uses 0.0051), got {lambd}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0 (BatchNorm's default is 1e-5), got {eps}")
    for name, z in (("z1", z1), ("z2", z2)):
        if z.ndim != 2:
            raise ValueError(
                f"{name} must be 2-D (batch, dim) embeddings, got shape {tuple(z.shape)}; "
                "flatten the projector output to (N, D)"
            )
    if z1.shape != z2.shape:
        raise ValueError(
            f"z1 and z2 must have the same shape, got {tuple(z1.shape)} and {tuple(z2.shape)}; "
            "pass the two views of the same images through the same projector"
        )


def _check_global_batch(z1: Tensor, z2: Tensor) -> None:
    if z1.shape[0] < 2:
        raise ValueError(
            f"the global batch has {z1.shape[0]} sample(s) but batch statistics need at least 2; "
            "increase batch_size (and drop a last batch of one with drop_last=True)"
        )
    # One host sync for both views; after the gather, so every rank raises together.
    finite = torch.stack([torch.isfinite(z1).all(), torch.isfinite(z2).all()]).tolist()
    for name, ok in zip(("z1", "z2"), finite, strict=True):
        if not ok:
            raise ValueError(
                f"{name} contains NaN or Inf values; training has diverged or the input is "
                "corrupt: lower the learning rate, use bf16/fp32 instead of fp16, or check the data"
            )


def _autocast_disabled(device_type: str) -> contextlib.AbstractContextManager[Any]:
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()
