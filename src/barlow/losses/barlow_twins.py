"""Barlow Twins: the loss, its four computations and their cost model.

Zbontar, Jing, Misra, LeCun, Deny, "Barlow Twins: Self-Supervised Learning via Redundancy
Reduction", ICML 2021, arXiv:2103.03230. Its four computations (one process or W) and their cost
model (flops, bytes communicated and memory per rank): :func:`barlow_loss_cost`,
:func:`choose_path` and docs/loss_cost_model.md.

The paper's loss ablations (§4, Table 5; docs/variants.md), options of :func:`barlow_twins_loss`:

- ``terms``: "both" (default), "invariance" (L = Σ_i (1 − C_ii)²) or "redundancy"
  (L = λ Σ_{i≠j} C_ij²). Both terms are still returned; the left-out one carries no gradient.
- ``normalize``: how C is formed. "batch" (default): Ẑ standardised over the batch,
  C = Ẑ1ᵀẐ2 / N, the cross-correlation. "feature", the paper's "normalization along feature
  dim.": Ẑ as for "batch", then each row onto the sphere of radius √D,
  z̃_n = √D·ẑ_n / ‖ẑ_n‖₂ (no mean subtraction along the features), and C = Z̃1ᵀZ̃2 / N, an
  unnormalised covariance. The radius √D is our choice, the paper gives none: ‖ẑ_n‖² ≈ D
  already, so C keeps the scale of the cross-correlation and C = I stays reachable (rows of
  norm 1 would cap tr C at 1). "none": the cross-covariance C = (Z1 − μ1)ᵀ(Z2 − μ2) / N,
  centred along the batch (the paper's Z are centred, §2) but not scaled by the std.
- ``temperature`` τ (default None): the paper's "cross-entropy with temp.", as printed in §4,
  L = −log Σ_i exp(C_ii/τ) + λ·log Σ_i Σ_{j≠i} exp(max(C_ij, 0)/τ); on_diag and off_diag are
  its two log terms (off_diag without λ), and ``terms`` keeps one or both. It needs every C_ij:
  "auto" takes "correlation" (across ranks "reduce_c"); "gram" and "sharded_gram" are refused.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from barlow import distributed
from barlow.losses.checks import (
    autocast_disabled,
    check_batch_size,
    check_global_batch,
    check_pair,
    non_finite_flags,
    raise_if_non_finite,
)

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
# The paper's loss ablations (Zbontar et al. 2021, §4, Table 5); the first of each is the default.
BarlowTwinsTerms = Literal["both", "invariance", "redundancy"]
BarlowTwinsNormalize = Literal["batch", "feature", "none"]
BARLOW_TWINS_TERMS: tuple[BarlowTwinsTerms, ...] = ("both", "invariance", "redundancy")
BARLOW_TWINS_NORMALIZE: tuple[BarlowTwinsNormalize, ...] = ("batch", "feature", "none")
# Machine balance for choose_path: matrix flops per second / interconnect bytes per second.
FLOPS_PER_BYTE = 500.0


class BarlowTwinsLossOutput(NamedTuple):
    """Result of :func:`barlow_twins_loss`: 0-d float32 tensors (float64 for float64 input)."""

    loss: Tensor  # on_diag + λ·off_diag (``terms`` may keep one of them)
    on_diag: Tensor  # Σ_i (1 − C_ii)²; with a temperature −log Σ_i exp(C_ii/τ)
    off_diag: Tensor  # Σ_{i≠j} C_ij², not multiplied by λ; with a temperature, see the loss


class _Variant(NamedTuple):
    """The loss ablations of :func:`barlow_twins_loss`, checked."""

    terms: BarlowTwinsTerms = "both"
    normalize: BarlowTwinsNormalize = "batch"
    temperature: float | None = None


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
    terms: BarlowTwinsTerms = "both",
    normalize: BarlowTwinsNormalize = "batch",
    temperature: float | None = None,
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

    ``terms``, ``normalize``, ``temperature``: the paper's loss ablations, defined in the module
    docstring (and docs/variants.md), exact on every path they allow and across ranks; their
    defaults give the loss above bit for bit.

    Returns ``BarlowTwinsLossOutput(loss, on_diag, off_diag)``, 0-d tensors; ``off_diag`` is not
    multiplied by λ. Raises ``ValueError`` on bad shapes, a global batch < 2, NaN/Inf input, a
    negative ``lambd``, an unknown ``path``, ``terms`` or ``normalize``, a temperature that is not
    > 0 or on a Gram path, or shards of different sizes for "sharded_gram";
    the NaN/Inf check costs one device-to-host sync. Inside
    :func:`~barlow.losses.checks.finite_checks_by_caller` that check is skipped and a NaN/Inf
    input gives a non-finite loss.
    """
    _check_arguments(z1, z2, lambd, path, eps)
    variant = _check_variant(z1, terms, normalize, temperature, path)
    dtype = torch.promote_types(z1.dtype, torch.float32)
    with autocast_disabled(z1.device.type):
        z1, z2 = z1.to(dtype), z2.to(dtype)
        world = distributed.world_size()
        if path in ("reduce_c", "sharded_gram") or (path == "auto" and world > 1):
            n, path = _sharded_path(z1, z2, path, variant)
            if path in ("reduce_c", "sharded_gram"):
                return _sharded_loss(z1, z2, n, lambd, path, eps, variant)
        return _gathered_loss(z1, z2, lambd, path, eps, variant)


def _gathered_loss(
    z1: Tensor, z2: Tensor, lambd: float, path: BarlowTwinsPath, eps: float, variant: _Variant
) -> BarlowTwinsLossOutput:
    """The "correlation" or "gram" path ("auto" resolved here) on the batch of all ranks."""
    z1, z2 = distributed.gather_with_grad(z1), distributed.gather_with_grad(z2)
    check_global_batch(z1, z2)
    n, d = z1.shape
    if path == "auto":
        path = "correlation" if variant.temperature is not None else choose_path(n, d)
    a, b = _normalized(z1, eps, variant.normalize), _normalized(z2, eps, variant.normalize)
    if variant.temperature is not None:
        return _cross_entropy_terms(a.T @ (b / n), lambd, variant)
    diag = (a * b).sum(dim=0) / n
    if path == "correlation":
        c = a.T @ (b / n)  # scaling the (N, D) factor avoids a second D×D array
        frobenius_sq = _SquaredFrobeniusNorm.apply(c)
    else:
        frobenius_sq = _GramInnerProduct.apply(a, b) / n**2
    return _barlow_twins_terms(diag, frobenius_sq, lambd, variant.terms)


def _sharded_loss(
    z1: Tensor,
    z2: Tensor,
    n: int,
    lambd: float,
    path: BarlowTwinsPath,
    eps: float,
    variant: _Variant,
) -> BarlowTwinsLossOutput:
    """The "reduce_c" or "sharded_gram" path: own rows, global statistics, sums over ranks."""
    a, b = _standardize_over_ranks(z1, z2, n, eps, variant.normalize)
    if variant.temperature is not None:  # "reduce_c": _sharded_path refuses "sharded_gram"
        c = distributed.all_reduce_with_grad(a.T @ (b / n))
        return _cross_entropy_terms(c, lambd, variant)
    diag = distributed.all_reduce_with_grad((a * b).sum(dim=0)) / n
    if path == "reduce_c":
        c = distributed.all_reduce_with_grad(a.T @ (b / n))
        frobenius_sq = _SquaredFrobeniusNorm.apply(c)
    else:
        frobenius_sq = _ShardedGramInnerProduct.apply(a, b) / n**2
    return _barlow_twins_terms(diag, frobenius_sq, lambd, variant.terms)


def _sharded_path(
    z1: Tensor, z2: Tensor, path: BarlowTwinsPath, variant: _Variant
) -> tuple[int, BarlowTwinsPath]:
    """The global batch size and the computation for a distributed (or ``reduce_c`` /
    ``sharded_gram``) call: "auto" resolved ("reduce_c" for a temperature, which needs C),
    "sharded_gram" refused for shards of unequal size."""
    world = distributed.world_size()
    n, equal_shards = _check_shards(z1, z2)
    if path == "auto":
        needs_c = variant.temperature is not None or not equal_shards
        path = "reduce_c" if needs_c else choose_path(n, z1.shape[1], world)
    if path == "sharded_gram" and not equal_shards:
        raise ValueError(
            f"path='sharded_gram' gathers equal shards, but the {world} ranks hold "
            f"different numbers of the {n} samples; give every rank the same batch size "
            "(drop_last=True) or use path='reduce_c'"
        )
    return n, path


def _barlow_twins_terms(
    diag: Tensor, frobenius_sq: Tensor, lambd: float, terms: BarlowTwinsTerms = "both"
) -> BarlowTwinsLossOutput:
    """L from diag C (D,) and ‖C‖²_F: on_diag = Σ (1 − C_ii)², off_diag = ‖C‖²_F − Σ C_ii²."""
    on_diag = (1 - diag).square().sum()
    off_diag = frobenius_sq - diag.square().sum()
    return BarlowTwinsLossOutput(_combined(on_diag, off_diag, lambd, terms), on_diag, off_diag)


def _cross_entropy_terms(c: Tensor, lambd: float, variant: _Variant) -> BarlowTwinsLossOutput:
    """The paper's cross-entropy with temperature τ from the (D, D) matrix C (§4, Table 5):
    on_diag = −log Σ_i exp(C_ii/τ), off_diag = log Σ_{i≠j} exp(max(C_ij, 0)/τ)."""
    tau = float(variant.temperature)  # type: ignore[arg-type]
    on_diag = -torch.logsumexp(torch.diagonal(c) / tau, dim=0)
    off_diag = torch.logsumexp(off_diagonal(c).clamp(min=0) / tau, dim=0)
    return BarlowTwinsLossOutput(
        _combined(on_diag, off_diag, lambd, variant.terms), on_diag, off_diag
    )


def _combined(on_diag: Tensor, off_diag: Tensor, lambd: float, terms: BarlowTwinsTerms) -> Tensor:
    if terms == "invariance":
        return on_diag
    if terms == "redundancy":
        return lambd * off_diag
    return on_diag + lambd * off_diag


def _normalized(z: Tensor, eps: float, normalize: BarlowTwinsNormalize) -> Tensor:
    """z (N, D) of the whole batch as ``normalize`` says (see :func:`barlow_twins_loss`)."""
    if normalize == "none":
        return z - z.mean(dim=0)
    a = standardize(z, eps)
    return _onto_sphere(a) if normalize == "feature" else a


def _onto_sphere(a: Tensor) -> Tensor:
    """Each row of a (N, D) on the sphere of radius √D: √D·a_n / ‖a_n‖₂ (a zero row stays 0)."""
    return torch.nn.functional.normalize(a, dim=1) * a.shape[1] ** 0.5


def _standardize_over_ranks(
    z1: Tensor, z2: Tensor, n: int, eps: float, normalize: BarlowTwinsNormalize = "batch"
) -> tuple[Tensor, Tensor]:
    """This rank's rows of both views standardised with the statistics of the global batch of n
    (normalised as ``normalize`` says: "none" only centres, "feature" puts rows on the sphere).

    Two passes, mean = Σ z / n, then var = Σ (z − mean)² / n, each an all-reduce with gradient:
    Σ z² / n − mean² would cancel catastrophically in float32 when |mean| ≫ std. The gradient
    through both sums is exact (see :func:`barlow.distributed.all_reduce_with_grad`).
    """
    sums = distributed.all_reduce_with_grad(torch.stack([z1.sum(dim=0), z2.sum(dim=0)]))
    mean = sums / n
    centred1, centred2 = z1 - mean[0], z2 - mean[1]
    if normalize == "none":
        return centred1, centred2
    squares = torch.stack([centred1.square().sum(dim=0), centred2.square().sum(dim=0)])
    inv_std = torch.rsqrt(distributed.all_reduce_with_grad(squares) / n + eps)
    a, b = centred1 * inv_std[0], centred2 * inv_std[1]
    # Row norms need no collective: each row lives on one rank.
    return (_onto_sphere(a), _onto_sphere(b)) if normalize == "feature" else (a, b)


def _check_shards(z1: Tensor, z2: Tensor) -> tuple[int, bool]:
    """The global batch size and whether all shards have one size; checks N >= 2 and finiteness.

    One small float64 all-reduce (exact counts) and one host sync, so every rank raises together;
    the sync stays inside :func:`~barlow.losses.checks.finite_checks_by_caller` (N is needed on
    the host), only the NaN/Inf flags are then 0 without reading z1, z2.
    """
    if distributed.world_size() == 1:
        check_global_batch(z1, z2)
        return z1.shape[0], True
    local = z1.shape[0]
    bad = non_finite_flags([z1, z2], torch.float64)
    counts = torch.tensor([local, local * local], dtype=torch.float64, device=z1.device)
    flags = distributed.all_reduce_sum(torch.cat([bad, counts])).tolist()
    bad1, bad2, n, n_sq = flags
    check_batch_size(int(n))
    raise_if_non_finite({"z1": bad1, "z2": bad2})
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
    check_pair(z1, z2, ("z1", "z2"), empty_ok=True)


def _check_variant(
    z1: Tensor,
    terms: BarlowTwinsTerms,
    normalize: BarlowTwinsNormalize,
    temperature: float | None,
    path: BarlowTwinsPath,
) -> _Variant:
    check_variant(terms, normalize, temperature, path)
    if temperature is not None and z1.shape[1] < 2:
        raise ValueError(f"temperature needs D >= 2 (off-diagonal entries), got D={z1.shape[1]}")
    return _Variant(terms, normalize, None if temperature is None else float(temperature))


def check_variant(
    terms: str,
    normalize: str,
    temperature: float | None,
    path: str = "auto",
    *,
    path_key: str = "path",
) -> None:
    """``ValueError`` naming the option and its valid values unless ``terms``, ``normalize``,
    ``temperature`` and ``path`` (called ``path_key`` in the message) make a loss
    :func:`barlow_twins_loss` can compute."""
    if terms not in BARLOW_TWINS_TERMS:
        raise ValueError(f"unknown terms={terms!r}; choose one of {', '.join(BARLOW_TWINS_TERMS)}")
    if normalize not in BARLOW_TWINS_NORMALIZE:
        raise ValueError(
            f"unknown normalize={normalize!r}; choose one of {', '.join(BARLOW_TWINS_NORMALIZE)}"
        )
    if temperature is None:
        return
    if isinstance(temperature, bool) or not 0 < temperature < float("inf"):
        raise ValueError(
            f"temperature must be a finite number > 0 (e.g. 0.1), or None for the paper's loss; "
            f"got {temperature!r}"
        )
    if path in ("gram", "sharded_gram"):
        raise ValueError(
            f"temperature={temperature} needs every entry of the D×D matrix C, which "
            f"{path_key}={path!r} never forms; use {path_key}='auto', 'correlation' or 'reduce_c'"
        )
