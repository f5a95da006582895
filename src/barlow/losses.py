"""Loss functions on embeddings: pure functions, float32 inside, exact across processes.

Barlow Twins: Zbontar, Jing, Misra, LeCun, Deny, "Barlow Twins: Self-Supervised Learning via
Redundancy Reduction", ICML 2021, arXiv:2103.03230. Its four computations (one process or W) and
their cost model (flops, bytes communicated and memory per rank): :func:`barlow_loss_cost`,
:func:`choose_path` and docs/loss_cost_model.md.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from barlow import distributed

LossPath = Literal["auto", "correlation", "gram"]
LOSS_PATHS: tuple[LossPath, ...] = ("auto", "correlation", "gram")
# Barlow Twins also has the two distributed forms; VICReg keeps LossPath.
BarlowTwinsComputation = Literal["correlation", "gram", "reduce_c", "sharded_gram"]
BarlowTwinsPath = Literal["auto", "correlation", "gram", "reduce_c", "sharded_gram"]
BARLOW_TWINS_COMPUTATIONS: tuple[BarlowTwinsComputation, ...] = (
    "correlation",
    "gram",
    "reduce_c",
    "sharded_gram",
)
BARLOW_TWINS_PATHS: tuple[BarlowTwinsPath, ...] = ("auto", *BARLOW_TWINS_COMPUTATIONS)
# Machine balance for choose_path: matrix flops per second / interconnect bytes per second.
FLOPS_PER_BYTE = 500.0


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


def choose_path(
    n: int, d: int, world_size: int = 1, *, flops_per_byte: float = FLOPS_PER_BYTE
) -> BarlowTwinsComputation:
    """The cheapest computation of the Barlow Twins loss: global batch N, dimension D, W ranks.

    Minimises the per-rank estimate ``flops + flops_per_byte · comm_bytes`` of
    :func:`barlow_loss_cost` over "correlation", "gram", "reduce_c", "sharded_gram" (the first
    in that order wins a tie). ``flops_per_byte`` is the machine balance, matrix flops per
    second over interconnect bytes per second per rank: ~100–300 inside a GPU node (float32
    matmul over NVLink), ~1000 across nodes, ~10–50 for CPUs with gloo; default 500. Latency of
    the collectives and memory are not part of the estimate.

    - One process (nothing communicated): "gram" when 8·N²·D < 6·N·D², i.e. N < 3·D/4, else
      "correlation". A batch of 256–2048 with the paper's D = 8192 takes the Gram path.
    - W > 1: the distributed forms do 1/W of the products. "sharded_gram" when N < 3·D/4 (fewer
      flops, and fewer bytes while 2·N·D < 4·D²), "reduce_c" when N ≥ 2·D (fewer of both), the
      balance decides in between. The gathered "correlation" and "gram" repeat every rank's
      work and move more bytes than "sharded_gram" (6·N·D vs 2·N·D words): from N ≥ 8 on
      they are never the cheapest.
    """
    flops_per_byte = float(flops_per_byte)
    if not 0 <= flops_per_byte < float("inf"):
        raise ValueError(f"flops_per_byte must be a finite number >= 0, got {flops_per_byte}")

    def estimate(path: BarlowTwinsComputation) -> float:
        cost = barlow_loss_cost(n, d, world_size, path)
        return cost["flops"] + flops_per_byte * cost["comm_bytes"]

    _check_sizes(n, d, world_size, "choose_path")
    return min(BARLOW_TWINS_COMPUTATIONS, key=estimate)  # min keeps the first of equal keys


def barlow_loss_cost(n: int, d: int, world_size: int, path: str) -> dict[str, int]:
    """Per-rank cost of one forward + backward of :func:`barlow_twins_loss` along ``path``.

    N = ``n`` the global batch, D = ``d``, W = ``world_size``, n_r = N / W rows per rank,
    float32 embeddings. Returns a dict of ints:

    ``flops``, matrix products only (the O(N·D + D²) element-wise work is left out):

    - correlation:  6·N·D²     C = Ẑ1ᵀẐ2 and its two backward products, whole batch, every rank
    - gram:         8·N²·D     Ẑ1Ẑ1ᵀ, Ẑ2Ẑ2ᵀ and two backward products, whole batch, every rank
    - reduce_c:     6·n_r·D²   this rank's C_r = Ẑ1_rᵀẐ2_r / N and its backward products
    - sharded_gram: 8·n_r·N·D  this rank's (n_r, N) row blocks of both Grams, and backward

    ``comm_bytes``, what each rank sends (and receives) with the bandwidth-optimal ring
    algorithms: an all-gather of M elements in all moves (W − 1)/W·M per rank, an all-reduce
    2·(W − 1)/W·M (reduce-scatter, then all-gather); 4 bytes an element, 0 when W = 1:

    - correlation, gram: 4·(W − 1)/W·6·N·D. Forward all-gathers z1 and z2 (N·D each); backward
      all-reduces both (N, D) gradients (``distributed.gather_with_grad``).
    - reduce_c: 4·(W − 1)/W·4·(D² + 5·D) + 64·(W − 1)/W. All-reduces of C (D²), diag C (D),
      both views' column sums (2·D) and centred sums of squares (2·D), forward and again
      backward; plus the shard check (4 float64 values, forward only).
    - sharded_gram: 4·(W − 1)/W·(2·N·D + 4·(5·D + 1)) + 64·(W − 1)/W. All-gathers of Ẑ1, Ẑ2
      (forward only); the same D-vector all-reduces as reduce_c and one scalar, forward and
      backward; the shard check.

    ``memory_bytes``, the largest arrays the loss allocates and holds (inputs excluded):
    4·(product term + 4·rows·D + g), where rows·D counts the centred and the standardised copy
    of each view and g = 2·N·D for the gathered copies of the two views when W > 1, else 0:

    - correlation: 4·(2·D² + 4·N·D + g)      C and its gradient (or the all-reduce's copy)
    - gram:        4·(2·N² + 4·N·D + g)      the two Gram matrices
    - reduce_c:    4·(2·D² + 4·n_r·D)        C and its gradient; no gather
    - sharded_gram: 4·(2·n_r·N + 4·n_r·D + g)  two (n_r, N) Gram row blocks

    ``collectives``, calls per step (each costs a latency the byte count does not show):
    4 for the gathered paths, 9 for reduce_c, 11 for sharded_gram; 0 when W = 1.
    """
    _check_sizes(n, d, world_size, "barlow_loss_cost")
    if path not in BARLOW_TWINS_COMPUTATIONS:
        raise ValueError(
            f"unknown path={path!r}; choose one of {', '.join(BARLOW_TWINS_COMPUTATIONS)}"
        )
    w, rows = world_size, n // world_size
    gathered = 2 * n * d if w > 1 else 0
    # Elements all-gathered and float32 / float64 elements all-reduced, forward + backward.
    small = 5 * d  # diag C, column sums and centred sums of squares of both views
    if path in ("correlation", "gram"):
        gather, reduce32, reduce64, calls = 2 * n * d, 2 * n * d, 0, 4
    elif path == "reduce_c":
        gather, reduce32, reduce64, calls = 0, 2 * (d * d + small), 4, 9
    else:
        gather, reduce32, reduce64, calls = 2 * n * d, 2 * (small + 1), 4, 11
    words = 4 * gather + 2 * (4 * reduce32 + 8 * reduce64)  # bytes, before the (W − 1)/W
    comm_bytes = -(-(w - 1) * words // w)  # ceil
    flops = {
        "correlation": 6 * n * d * d,
        "gram": 8 * n * n * d,
        "reduce_c": 6 * rows * d * d,
        "sharded_gram": 8 * rows * n * d,
    }[path]
    memory = {
        "correlation": 2 * d * d + 4 * n * d + gathered,
        "gram": 2 * n * n + 4 * n * d + gathered,
        "reduce_c": 2 * d * d + 4 * rows * d,
        "sharded_gram": 2 * rows * n + 4 * rows * d + gathered,
    }[path]
    return {
        "flops": flops,
        "comm_bytes": comm_bytes,
        "memory_bytes": 4 * memory,
        "collectives": calls if w > 1 else 0,
    }


def _check_sizes(n: int, d: int, world_size: int, caller: str) -> None:
    if n < 1 or d < 1 or world_size < 1:
        raise ValueError(
            f"{caller} needs n >= 1 and d >= 1 and world_size >= 1, got n={n}, d={d}, "
            f"world_size={world_size}"
        )
    if n % world_size:
        raise ValueError(
            f"{caller}: the global batch n={n} does not split evenly over world_size="
            f"{world_size}; use a global batch that is a multiple of the world size"
        )


def barlow_twins_loss(
    z1: Tensor,
    z2: Tensor,
    lambd: float = 0.0051,
    *,
    path: BarlowTwinsPath = "auto",
    eps: float = 1e-5,
) -> BarlowTwinsLossOutput:
    """Barlow Twins redundancy-reduction loss (Zbontar et al., 2021, arXiv:2103.03230).

    z1, z2: (N_local, D) projector outputs of the two views of the same images, row n of z1 and
    of z2 from the same image. Each view is standardised over the *global* batch of N images
    (biased variance, ``eps``, as ``BatchNorm1d(affine=False)`` in training mode), and

        C = Ẑ1ᵀ Ẑ2 / N                                    (D, D) cross-correlation
        L = Σ_i (1 − C_ii)² + λ Σ_{i≠j} C_ij²              λ = ``lambd``

    ``path`` picks how ‖C‖²_F (hence the off-diagonal sum ‖C‖²_F − Σ_i C_ii²) is computed; all
    give the same loss and gradients up to float32 rounding. C_ii = Σ_n Ẑ1[n, i] Ẑ2[n, i] / N
    is O(N·D), summed once over the global batch in every path. Costs per rank, formulas in
    :func:`barlow_loss_cost`:

    - "correlation": from the D×D matrix C. Cost ~N·D², memory ~D².
    - "gram": ‖C‖²_F = ⟨Ẑ1Ẑ1ᵀ, Ẑ2Ẑ2ᵀ⟩ / N² from the two N×N Gram matrices (trace cyclicity:
      tr(Ẑ2ᵀẐ1Ẑ1ᵀẐ2) = tr(Ẑ1Ẑ1ᵀ·Ẑ2Ẑ2ᵀ)). Cost ~N²·D, memory ~N² + N·D.
    - "reduce_c": C = Σ_r Ẑ1_rᵀẐ2_r / N, each rank r multiplying only its own rows (Ẑ_r
      standardised with global statistics: all-reduced column sums, then centred sums of
      squares), summed by :func:`barlow.distributed.all_reduce_with_grad`. Cost ~N·D²/W, D²
      words all-reduced forward and backward, nothing gathered. Shards may differ in size.
    - "sharded_gram": Ẑ1, Ẑ2 all-gathered (standardised as for "reduce_c"); each rank forms
      only its own (N_local, N) row blocks of the two Gram matrices, and the partial inner
      products are summed over ranks (:class:`_ShardedGramInnerProduct`). Cost ~N²·D/W, N·D
      words gathered, no (N, D) gradient all-reduced.
    - "auto": :func:`choose_path` for (N, D, W). One process: the Gram path when N < 3·D/4;
      W > 1: "sharded_gram" or "reduce_c" (the latter also when shard sizes differ).

    With one process "reduce_c" is "correlation" and "sharded_gram" is "gram".

    Distributed: under ``torchrun`` each rank passes its local shard and every rank must call
    the loss. "correlation" and "gram" gather both views with
    :func:`barlow.distributed.gather_with_grad` and compute L on the whole batch on every rank;
    the distributed forms share the work. Either way every rank returns the same L, and each
    rank's gradient w.r.t. its own rows is W·∂L/∂z (the backward of every collective sums the
    incoming gradients of all ranks); DDP then averages parameter gradients over the W ranks,
    and the W and 1/W cancel: loss and gradients equal one process on the concatenated batch.
    All paths but "reduce_c" need the same (N_local, D) on every rank.

    Precision: inputs are upcast to float32 (float64 stays float64) and autocast is disabled
    inside, because fp16 sums over a D×D matrix overflow. The off-diagonal sum is a difference
    of two sums: in float32 its absolute error is ~1e-7·‖C‖²_F, negligible unless C is close to
    diagonal with N > D, a regime where "auto" uses the D×D path anyway.

    Returns ``BarlowTwinsLossOutput(loss, on_diag, off_diag)``, 0-d tensors; ``off_diag`` is not
    multiplied by λ. Raises ``ValueError`` on bad shapes, a global batch < 2, NaN/Inf input, a
    negative ``lambd``, an unknown ``path``, or shards of different sizes for "sharded_gram";
    the NaN/Inf check costs one device-to-host sync.
    """
    _check_arguments(z1, z2, lambd, path, eps)
    dtype = torch.promote_types(z1.dtype, torch.float32)
    with _autocast_disabled(z1.device.type):
        z1, z2 = z1.to(dtype), z2.to(dtype)
        world = distributed.world_size()
        if path in ("reduce_c", "sharded_gram") or (path == "auto" and world > 1):
            n, equal_shards = _check_shards(z1, z2)
            if path == "auto":
                path = choose_path(n, z1.shape[1], world) if equal_shards else "reduce_c"
            if path == "sharded_gram" and not equal_shards:
                raise ValueError(
                    f"path='sharded_gram' gathers equal shards, but the {world} ranks hold "
                    f"different numbers of the {n} samples; give every rank the same batch size "
                    "(drop_last=True) or use path='reduce_c'"
                )
            if path in ("reduce_c", "sharded_gram"):
                a, b = _standardize_over_ranks(z1, z2, n, eps)
                diag = distributed.all_reduce_with_grad((a * b).sum(dim=0)) / n
                if path == "reduce_c":
                    c = distributed.all_reduce_with_grad(a.T @ (b / n))
                    frobenius_sq = _SquaredFrobeniusNorm.apply(c)
                else:
                    frobenius_sq = _ShardedGramInnerProduct.apply(a, b) / n**2
                return _barlow_twins_terms(diag, frobenius_sq, lambd)
        z1, z2 = distributed.gather_with_grad(z1), distributed.gather_with_grad(z2)
        _check_global_batch(z1, z2)
        n, d = z1.shape
        if path == "auto":
            path = choose_path(n, d)
        a, b = standardize(z1, eps), standardize(z2, eps)
        diag = (a * b).sum(dim=0) / n
        if path == "correlation":
            c = a.T @ (b / n)  # scaling the (N, D) factor avoids a second D×D array
            frobenius_sq = _SquaredFrobeniusNorm.apply(c)
        else:
            frobenius_sq = _GramInnerProduct.apply(a, b) / n**2
        return _barlow_twins_terms(diag, frobenius_sq, lambd)


def _barlow_twins_terms(diag: Tensor, frobenius_sq: Tensor, lambd: float) -> BarlowTwinsLossOutput:
    """L from diag C (D,) and ‖C‖²_F: on_diag = Σ (1 − C_ii)², off_diag = ‖C‖²_F − Σ C_ii²."""
    on_diag = (1 - diag).square().sum()
    off_diag = frobenius_sq - diag.square().sum()
    return BarlowTwinsLossOutput(on_diag + lambd * off_diag, on_diag, off_diag)


def _standardize_over_ranks(z1: Tensor, z2: Tensor, n: int, eps: float) -> tuple[Tensor, Tensor]:
    """This rank's rows of both views standardised with the statistics of the global batch of n.

    Two passes, mean = Σ z / n, then var = Σ (z − mean)² / n, each an all-reduce with gradient:
    Σ z² / n − mean² would cancel catastrophically in float32 when |mean| ≫ std. The gradient
    through both sums is exact (see :func:`barlow.distributed.all_reduce_with_grad`).
    """
    sums = distributed.all_reduce_with_grad(torch.stack([z1.sum(dim=0), z2.sum(dim=0)]))
    mean = sums / n
    centred1, centred2 = z1 - mean[0], z2 - mean[1]
    squares = torch.stack([centred1.square().sum(dim=0), centred2.square().sum(dim=0)])
    inv_std = torch.rsqrt(distributed.all_reduce_with_grad(squares) / n + eps)
    return centred1 * inv_std[0], centred2 * inv_std[1]


def _check_shards(z1: Tensor, z2: Tensor) -> tuple[int, bool]:
    """The global batch size and whether all shards have one size; checks N >= 2 and finiteness.

    One small float64 all-reduce (exact counts) and one host sync, so every rank raises together.
    """
    if distributed.world_size() == 1:
        _check_global_batch(z1, z2)
        return z1.shape[0], True
    local = z1.shape[0]
    bad = torch.stack([~torch.isfinite(z1).all(), ~torch.isfinite(z2).all()])
    counts = torch.tensor([local, local * local], dtype=torch.float64, device=z1.device)
    flags = distributed.all_reduce_sum(torch.cat([bad.to(torch.float64), counts])).tolist()
    bad1, bad2, n, n_sq = flags
    _check_batch_size(int(n))
    for name, count in (("z1", bad1), ("z2", bad2)):
        if count:
            raise _non_finite(name)
    # Σ n_r² = (Σ n_r)² / W exactly when every n_r is the same (Cauchy–Schwarz).
    return int(n), n_sq * distributed.world_size() == n * n


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


class _ShardedGramInnerProduct(torch.autograd.Function):
    """⟨Ẑ1Ẑ1ᵀ, Ẑ2Ẑ2ᵀ⟩ over the global batch, each rank forming only its own rows of the Grams.

    a, b: this rank's (n_r, D) rows of Ẑ1, Ẑ2. With A, B the (N, D) all-gathered views and
    G1_r = a·Aᵀ, G2_r = b·Bᵀ this rank's (n_r, N) row blocks of the two Gram matrices,

        S = Σ_r ⟨G1_r, G2_r⟩ = ⟨AAᵀ, BBᵀ⟩        (a scalar all-reduce; the same on every rank)

    Backward: ∂S/∂A = 2·(BBᵀ)·A as BBᵀ is symmetric, and its rows of rank r are 2·G2_r·A:
    a rank has all it needs for the gradient of its own rows. Every rank s has a loss L_s(S);
    DDP needs rank r to give its rows ∂(Σ_s L_s)/∂a = (Σ_s ∂L_s/∂S)·2·G2_r·A, so the incoming
    gradient is all-reduced (one scalar) and multiplied in. No (N, D) gradient crosses ranks
    (``gather_with_grad``'s backward all-reduces one per view) and no rank repeats another's
    products: 4·n_r·N·D flops forward and 4·n_r·N·D backward, 1/W of the Gram path. The
    collectives go through :mod:`barlow.distributed`.
    """

    @staticmethod
    def forward(ctx: Any, a: Tensor, b: Tensor) -> Tensor:
        all_a, all_b = distributed.all_gather_no_grad(a), distributed.all_gather_no_grad(b)
        gram_a, gram_b = a @ all_a.T, b @ all_b.T
        ctx.save_for_backward(all_a, all_b, gram_a, gram_b)
        return distributed.all_reduce_sum((gram_a * gram_b).sum())

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        all_a, all_b, gram_a, gram_b = ctx.saved_tensors
        # Every rank takes part in the all-reduce, whichever inputs need a gradient.
        scale = 2 * distributed.all_reduce_sum(grad)
        grad_a = (gram_b @ all_a) * scale if ctx.needs_input_grad[0] else None
        grad_b = (gram_a @ all_b) * scale if ctx.needs_input_grad[1] else None
        return grad_a, grad_b


def _check_arguments(z1: Tensor, z2: Tensor, lambd: float, path: str, eps: float) -> None:
    if path not in BARLOW_TWINS_PATHS:
        raise ValueError(f"unknown path={path!r}; choose one of {', '.join(BARLOW_TWINS_PATHS)}")
    if not lambd >= 0:
        raise ValueError(f"lambd must be >= 0 (the paper uses 0.0051), got {lambd}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0 (BatchNorm's default is 1e-5), got {eps}")
    # An empty local shard is checked after the gather: the global batch is what must be >= 2.
    _check_pair(z1, z2, ("z1", "z2"), empty_ok=True)


def _check_global_batch(z1: Tensor, z2: Tensor) -> None:
    _check_batch_size(z1.shape[0])
    # One host sync for both views; after the gather, so every rank raises together.
    finite = torch.stack([torch.isfinite(z1).all(), torch.isfinite(z2).all()]).tolist()
    for name, ok in zip(("z1", "z2"), finite, strict=True):
        if not ok:
            raise _non_finite(name)


def _check_batch_size(n: int) -> None:
    if n < 2:
        raise ValueError(
            f"the global batch has {n} sample(s) but batch statistics need at least 2; "
            "increase batch_size (and drop a last batch of one with drop_last=True)"
        )


def _non_finite(name: str) -> ValueError:
    return ValueError(
        f"{name} contains NaN or Inf values; training has diverged or the input is "
        "corrupt: lower the learning rate, use bf16/fp32 instead of fp16, or check the data"
    )


def _autocast_disabled(device_type: str) -> contextlib.AbstractContextManager[Any]:
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


# --- non-contrastive losses ---
# BYOL: Grill et al., "Bootstrap Your Own Latent", NeurIPS 2020, arXiv:2006.07733.
# SimSiam: Chen & He, "Exploring Simple Siamese Representation Learning", CVPR 2021,
# arXiv:2011.10566.
# VICReg: Bardes, Ponce & LeCun, "VICReg: Variance-Invariance-Covariance Regularization for
# Self-Supervised Learning", ICLR 2022, arXiv:2105.04906.


class VICRegLossOutput(NamedTuple):
    """Result of :func:`vicreg_loss`: 0-d float32 tensors (float64 for float64 input); the three
    terms are not multiplied by their coefficients."""

    loss: Tensor  # sim_coeff·invariance + std_coeff·variance + cov_coeff·covariance
    invariance: Tensor  # mean over N·D of (z1 − z2)²
    variance: Tensor  # ½ Σ_views mean_j max(0, γ − sqrt(Var z_j + ε))
    covariance: Tensor  # Σ_views Σ_{i≠j} C_ij² / D


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
    Raises ``ValueError`` for non-2-D or mismatched shapes, an empty batch or NaN/Inf input.
    """
    return 2 - 2 * _global_mean_cosine(p, z)


def negative_cosine(p: Tensor, z: Tensor) -> Tensor:
    """SimSiam's D(p, z) = −cos(p, stopgrad(z)), averaged over the batch; a value in [−1, 1].

    p: (N_local, D) predictor outputs; z: (N_local, D) projector outputs of the *other* view. The
    loss detaches z. SimSiam's symmetric loss is ``½·D(p1, z2) + ½·D(p2, z1)`` (Chen & He, 2021,
    Eq. 2–4). Distributed, precision and errors: as :func:`normalized_mse` (global-batch mean).
    """
    return -_global_mean_cosine(p, z)


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
    input, negative coefficients, γ ≤ 0, ε ≤ 0 or an unknown ``path``.
    """
    _check_vicreg_arguments(sim_coeff, std_coeff, cov_coeff, gamma, eps, path)
    _check_pair(z1, z2, ("z1", "z2"))
    dtype = torch.promote_types(z1.dtype, torch.float32)
    with _autocast_disabled(z1.device.type):
        z1 = distributed.gather_with_grad(z1.to(dtype))
        z2 = distributed.gather_with_grad(z2.to(dtype))
        _check_global_batch(z1, z2)
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


def _global_mean_cosine(p: Tensor, z: Tensor) -> Tensor:
    """Mean over the global batch of cos(p_n, stopgrad(z_n)), float32, differentiable in p."""
    _check_pair(p, z, ("p", "z"))
    dtype = torch.promote_types(p.dtype, torch.float32)
    with _autocast_disabled(p.device.type):
        p, z = p.to(dtype), z.detach().to(dtype)
        _check_finite_on_every_rank({"p": p, "z": z})
        p_hat = p / torch.linalg.vector_norm(p, dim=1, keepdim=True).clamp_min(1e-12)
        z_hat = z / torch.linalg.vector_norm(z, dim=1, keepdim=True).clamp_min(1e-12)
        # Gathering N scalars is all it takes for the global mean; no embeddings cross ranks.
        cosine = distributed.gather_with_grad((p_hat * z_hat).sum(dim=1))
        return cosine.mean()


def _check_pair(a: Tensor, b: Tensor, names: tuple[str, str], *, empty_ok: bool = False) -> None:
    """Both 2-D (batch, dim), of one shape, and (unless ``empty_ok``) holding samples."""
    for name, x in zip(names, (a, b), strict=True):
        if x.ndim != 2:
            raise ValueError(
                f"{name} must be 2-D (batch, dim) embeddings, got shape {tuple(x.shape)}; "
                "flatten the head's output to (N, D)"
            )
    if a.shape != b.shape:
        raise ValueError(
            f"{names[0]} and {names[1]} must have the same shape, got {tuple(a.shape)} and "
            f"{tuple(b.shape)}; give both the same output width and the same images"
        )
    if a.shape[0] == 0 and not empty_ok:
        raise ValueError(f"{names[0]} and {names[1]} hold no samples; pass a non-empty batch")


def _check_finite_on_every_rank(tensors: dict[str, Tensor]) -> None:
    # Counted over ranks (one small all-reduce, one host sync) so that every rank raises together
    # instead of one leaving the others waiting in the next collective.
    flags = torch.stack([~torch.isfinite(t).all() for t in tensors.values()]).to(torch.int32)
    bad = distributed.all_reduce_sum(flags).tolist()
    for name, count in zip(tensors, bad, strict=True):
        if count:
            raise ValueError(
                f"{name} contains NaN or Inf values; training has diverged or the input is "
                "corrupt: lower the learning rate, use bf16/fp32 instead of fp16, or check the data"
            )


def _check_vicreg_arguments(
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


# --- contrastive losses ---
# SimCLR: Chen, Kornblith, Norouzi & Hinton, "A Simple Framework for Contrastive Learning of
# Visual Representations", ICML 2020, arXiv:2002.05709.
# MoCo v2: Chen, Fan, Girshick & He, "Improved Baselines with Momentum Contrastive Learning",
# arXiv:2003.04297 (MoCo: He et al., CVPR 2020, arXiv:1911.05722).
# CMC: Tian, Krishnan & Isola, "Contrastive Multiview Coding", ECCV 2020, arXiv:1906.05849.
#
# Distributed convention, shared by the three: each rank scores only its own anchors against the
# candidates it needs (gathered with gradient where they come from the batch), and returns
# loss = local mean + (global mean − local mean).detach(). The value is the global-batch loss on
# every rank (so every rank logs, and stops on, the same number); the gradient is the local
# mean's. A rank's rows then get Σ_ranks ∂L_rank/∂rows (the gather's backward sums the candidate
# terms), i.e. W·∂L/∂rows as for barlow_twins_loss, and DDP's averaging makes it exact.


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
    above this function). Float32 inside, also under autocast. Raises ``ValueError`` for bad
    shapes, a global batch < 2 (no negatives), NaN/Inf input or a temperature that is not > 0.
    """
    _check_temperature(temperature, paper="0.5, or 0.1 at batch 4096")
    _check_pair(z1, z2, ("z1", "z2"))
    world, n_local = distributed.world_size(), z1.shape[0]
    _check_negatives(n_local * world)
    dtype = torch.promote_types(z1.dtype, torch.float32)
    with _autocast_disabled(z1.device.type):
        u1, u2 = _unit(z1.to(dtype)), _unit(z2.to(dtype))
        g1, g2 = distributed.gather_with_grad(u1), distributed.gather_with_grad(u2)
        _check_finite_on_every_rank({"z1": g1, "z2": g2})
        n = g1.shape[0]
        anchors = torch.cat([u1, u2])  # (2·N_local, D)
        candidates = torch.cat([g1, g2])  # (2N, D): all views of rank 0, rank 1, …, then again
        logits = anchors @ candidates.T / temperature
        own = torch.arange(n_local, device=z1.device) + distributed.rank() * n_local
        self_column = torch.cat([own, own + n])
        positive_column = torch.cat([own + n, own])
        rows = torch.arange(2 * n_local, device=z1.device)
        logits = logits.index_put((rows, self_column), logits.new_tensor(float("-inf")))
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
    nothing is gathered: the value is made the global-batch mean (see the convention above
    :func:`nt_xent_loss`). Float32 inside, also under autocast. Raises ``ValueError`` for bad
    shapes, an empty queue, NaN/Inf input or a temperature that is not > 0.
    """
    _check_temperature(temperature, paper="0.2 (MoCo v2), 0.07 (MoCo v1)")
    _check_pair(q, k, ("q", "k"))
    if queue.ndim != 2 or queue.shape[0] == 0 or queue.shape[1] != q.shape[1]:
        raise ValueError(
            f"queue must be (K, D) with K >= 1 keys of the queries' width D = {q.shape[1]}, "
            f"got shape {tuple(queue.shape)}; build it with the projector's output width"
        )
    dtype = torch.promote_types(q.dtype, torch.float32)
    with _autocast_disabled(q.device.type):
        q, k, queue = q.to(dtype), k.to(dtype), queue.to(dtype)
        _check_finite_on_every_rank({"q": q, "k": k, "queue": queue})
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
    _check_temperature(temperature, paper="0.07")
    if len(views) < 2:
        raise ValueError(f"CMC contrasts at least 2 views, got {len(views)}; pass V >= 2 tensors")
    for v, z in enumerate(views[1:], start=1):
        _check_pair(views[0], z, ("views[0]", f"views[{v}]"))
    n_local = views[0].shape[0]
    _check_negatives(n_local * distributed.world_size())
    dtype = torch.promote_types(views[0].dtype, torch.float32)
    with _autocast_disabled(views[0].device.type):
        units = [_unit(z.to(dtype)) for z in views]
        gathered = [distributed.gather_with_grad(u) for u in units]
        _check_finite_on_every_rank({f"views[{v}]": g for v, g in enumerate(gathered)})
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


def _check_temperature(temperature: float, *, paper: str) -> None:
    if not 0 < temperature < float("inf"):
        raise ValueError(
            f"temperature must be a finite number > 0 (paper: {paper}), got {temperature}"
        )


def _check_negatives(global_batch: int) -> None:
    if global_batch < 2:
        raise ValueError(
            f"the global batch has {global_batch} image(s), so there are no negatives to "
            "contrast with; increase batch_size (and drop a last batch of one with drop_last)"
        )
