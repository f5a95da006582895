"""barlow.losses.barlow_twins in one process: both computation paths against the formula written
out plainly, properties, precision, gradients and input validation."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from barlow.losses import (
    BarlowTwinsLossOutput,
    barlow_twins_loss,
    choose_path,
    off_diagonal,
    standardize,
)
from comparisons import rel_err

PATHS = ("correlation", "gram")
LAMBD = 0.0051


def reference_loss(z1: Tensor, z2: Tensor, lambd: float = LAMBD) -> tuple[Tensor, Tensor, Tensor]:
    """The paper's formula in float64: BatchNorm1d(affine=False), C = ẐᵀẐ/N, masked sums.

    C is built a block of rows at a time so that D = 8192 fits in memory.
    """
    n, d = z1.shape
    bn = torch.nn.BatchNorm1d(d, affine=False, eps=1e-5, dtype=torch.float64).train()
    a, b = bn(z1.double()), bn(z2.double())
    on_diag = off_diag = torch.zeros((), dtype=torch.float64)
    for start in range(0, d, 1024):
        rows = torch.arange(start, min(start + 1024, d))
        c_rows = a[:, rows].T @ b / n  # rows `rows` of C, shape (len(rows), D)
        diagonal = (torch.arange(len(rows)), rows)
        without_diagonal = c_rows.clone()
        without_diagonal[diagonal] = 0
        on_diag = on_diag + ((1 - c_rows[diagonal]) ** 2).sum()
        off_diag = off_diag + (without_diagonal**2).sum()
    return on_diag + lambd * off_diag, on_diag, off_diag


def correlated_views(n: int, d: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    z1 = torch.randn(n, d, generator=gen) * 3 + 1
    z2 = 0.7 * z1 + torch.randn(n, d, generator=gen)
    return z1, z2


def test_reference_matches_explicit_loops() -> None:
    # The reference itself, against the definition with nothing but Python loops.
    z1, z2 = correlated_views(5, 3)
    n, d = z1.shape
    x, y = z1.double().tolist(), z2.double().tolist()

    def standardized(rows: list[list[float]], j: int) -> list[float]:
        col = [row[j] for row in rows]
        mean = sum(col) / n
        var = sum((v - mean) ** 2 for v in col) / n
        return [(v - mean) / (var + 1e-5) ** 0.5 for v in col]

    a = [standardized(x, j) for j in range(d)]
    b = [standardized(y, j) for j in range(d)]
    c = [[sum(a[i][k] * b[j][k] for k in range(n)) / n for j in range(d)] for i in range(d)]
    on = sum((1 - c[i][i]) ** 2 for i in range(d))
    off = sum(c[i][j] ** 2 for i in range(d) for j in range(d) if i != j)
    expected = torch.tensor([on + LAMBD * off, on, off], dtype=torch.float64)
    # float64 both ways, other summation orders: measured 1.1e-15
    assert torch.allclose(torch.stack(reference_loss(z1, z2)), expected, rtol=1e-14)


@pytest.mark.parametrize(("n", "d"), [(3, 5), (16, 4), (300, 32), (64, 64), (32, 256), (8, 8192)])
def test_paths_match_reference(n: int, d: int) -> None:
    # N > D, N = D, N < D, and D = 8192 where ‖C‖²_F − Σ C_ii² is a difference of large sums.
    z1, z2 = correlated_views(n, d)
    expected = reference_loss(z1, z2)
    for path in PATHS:
        out = barlow_twins_loss(z1, z2, LAMBD, path=path)  # type: ignore[arg-type]
        assert isinstance(out, BarlowTwinsLossOutput)
        for actual, value in zip(out, expected, strict=True):
            assert actual.dtype == torch.float32 and actual.ndim == 0
            assert rel_err(actual, value) < 1e-5, path  # float32 vs float64: measured 8.4e-7


@pytest.mark.parametrize(("n", "d"), [(300, 32), (32, 256), (16, 8192)])
def test_paths_match_each_other(n: int, d: int) -> None:
    z1, z2 = correlated_views(n, d, seed=1)
    correlation = barlow_twins_loss(z1, z2, path="correlation")
    gram = barlow_twins_loss(z1, z2, path="gram")
    for a, b in zip(correlation, gram, strict=True):
        # bit-equal on this CPU; each path is within 8.4e-7 of float64 (above), so the bound
        # of that test holds for their difference too
        assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize(("n", "d", "chosen"), [(8, 12, "gram"), (40, 12, "correlation")])
def test_auto_uses_the_chosen_path(n: int, d: int, chosen: str) -> None:
    assert choose_path(n, d) == chosen
    z1, z2 = correlated_views(n, d)
    auto = barlow_twins_loss(z1, z2, path="auto")
    explicit = barlow_twins_loss(z1, z2, path=choose_path(n, d))
    assert torch.equal(auto.loss, explicit.loss)


def test_choose_path_follows_the_cost_model() -> None:
    assert choose_path(256, 8192) == "gram"
    assert choose_path(2048, 8192) == "gram"
    assert choose_path(8192, 256) == "correlation"
    assert choose_path(1024, 1024) == "correlation"


@pytest.mark.parametrize("path", PATHS)
def test_identical_views_have_no_on_diagonal_loss(path: str) -> None:
    z, _ = correlated_views(64, 16)
    out = barlow_twins_loss(z, z, path=path)  # type: ignore[arg-type]
    # Σ_j (ε / (var_j + ε))², from eps alone: 1.9e-11 here
    assert out.on_diag < 2e-10
    assert out.off_diag > 0.1  # random features are correlated in a finite batch


@pytest.mark.parametrize("path", PATHS)
def test_invariant_to_per_view_affine_maps(path: str) -> None:
    z1, z2 = correlated_views(32, 24)
    base = barlow_twins_loss(z1, z2, path=path)  # type: ignore[arg-type]
    moved = barlow_twins_loss(z1, 2 * z2 + 4, path=path)  # type: ignore[arg-type]
    # Not bit-exact: eps = 1e-5 is added to var, which scaling by 2 multiplies by 4 (measured
    # 8.7e-6, from eps, not rounding).
    assert rel_err(moved.loss, base.loss) < 1e-4


@pytest.mark.parametrize("path", PATHS)
def test_invariant_to_batch_order(path: str) -> None:
    z1, z2 = correlated_views(40, 24)
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(3))
    base = barlow_twins_loss(z1, z2, path=path)  # type: ignore[arg-type]
    shuffled = barlow_twins_loss(z1[perm], z2[perm], path=path)  # type: ignore[arg-type]
    assert rel_err(shuffled.loss, base.loss) < 5e-6  # other summation order: measured 2.4e-7
    # The two views must stay paired: shuffling only one of them changes the loss.
    unpaired = barlow_twins_loss(z1, z2[perm], path=path)  # type: ignore[arg-type]
    assert rel_err(unpaired.loss, base.loss) > 1e-2


@pytest.mark.parametrize("path", PATHS)
def test_zero_loss_when_correlation_is_identity(path: str) -> None:
    # Columns that are zero-mean, orthogonal and of variance 1 standardise to C = I (up to eps).
    n, d = 64, 16
    centered = torch.randn(n, d, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    centered -= centered.mean(dim=0)
    q, _ = torch.linalg.qr(centered)  # orthonormal columns in the zero-mean subspace
    z1 = (q * n**0.5).float()
    z2 = 3 * z1 - 2  # another affine view: same standardised embedding
    out = barlow_twins_loss(z1, z2, path=path)  # type: ignore[arg-type]
    # float32 rounding of C ≈ I (up to eps): measured 2.5e-8 and 4.8e-6 at worst over 20 seeds
    assert abs(float(out.loss)) < 5e-7
    assert abs(float(out.off_diag)) < 5e-5
    # Control: one swapped pair of columns gives a visibly non-zero loss.
    swapped = z2[:, [1, 0, *range(2, d)]]
    assert barlow_twins_loss(z1, swapped, path=path).loss > 1.9  # type: ignore[arg-type]


@pytest.mark.parametrize("path", PATHS)
def test_constant_feature_gives_finite_loss_and_gradients(path: str) -> None:
    z1, z2 = correlated_views(16, 8)
    z1[:, 0] = 5.0  # a dead unit: zero variance, eps keeps the standardisation finite
    z1.requires_grad_(True)
    z2.requires_grad_(True)
    out = barlow_twins_loss(z1, z2, path=path)  # type: ignore[arg-type]
    grads = torch.autograd.grad(out.loss, (z1, z2))
    assert torch.isfinite(out.loss)
    assert all(torch.isfinite(g).all() for g in grads)
    assert out.on_diag >= 1.0  # C_00 = 0 contributes (1 − 0)²


def loss_in_the_input_dtype(z1: Tensor, z2: Tensor) -> BarlowTwinsLossOutput:
    """Deliberately broken, for the negative cases: the loss computed wholly in the dtype of its
    input (fp16 / bf16 products and sums), then cast to float32."""
    a, b = standardize(z1), standardize(z2)
    c = a.T @ b / a.shape[0]
    on_diag = (1 - torch.diagonal(c)).square().sum()
    off_diag = off_diagonal(c).square().sum()
    terms = (on_diag + LAMBD * off_diag, on_diag, off_diag)
    return BarlowTwinsLossOutput(*(t.float() for t in terms))


def along(path: str, z1: Tensor, z2: Tensor) -> BarlowTwinsLossOutput:
    return barlow_twins_loss(z1, z2, path=path)  # type: ignore[arg-type]


HALF_LOSSES = {
    "barlow_twins_loss": along,
    "broken: computed in the input dtype": lambda path, z1, z2: loss_in_the_input_dtype(
        z1, z2.to(z1.dtype)
    ),
}


@pytest.mark.parametrize("loss", HALF_LOSSES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("path", PATHS)
def test_half_precision_inputs_are_upcast_before_anything_is_computed(
    dtype: torch.dtype, path: str, loss: str
) -> None:
    """fp16/bf16 embeddings give exactly the float32 loss of the same values upcast: the loss
    upcasts first. The old check, allclose(rtol=1e-2) to the fp32 loss, let a loss computed
    wholly in bf16 through (0.28 % off); it is kept to show that the negative case passed it."""
    z1, z2 = correlated_views(64, 512)
    half = HALF_LOSSES[loss](path, z1.to(dtype), z2.to(dtype))
    upcast = along(path, z1.to(dtype).float(), z2.to(dtype).float())
    for value in half:
        assert value.dtype == torch.float32 and torch.isfinite(value)
    assert torch.allclose(half.loss, along(path, z1, z2).loss, rtol=1e-2)  # the old check
    exact = all(torch.equal(a, b) for a, b in zip(half, upcast, strict=True))
    assert exact == (loss == "barlow_twins_loss")


@pytest.mark.parametrize("loss", HALF_LOSSES)
@pytest.mark.parametrize("path", PATHS)
def test_autocast_is_disabled_inside(path: str, loss: str) -> None:
    """Under CPU bf16 autocast the loss is bit-equal to the loss without autocast; on bf16
    projector output it is bit-equal to the loss of that output upcast to float32. (The old
    check of the second was dtype and finiteness only, which the broken loss passes.)"""
    z1, z2 = correlated_views(64, 96)
    expected = along(path, z1, z2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = along(path, z1, z2)
        # bf16 embeddings as a projector under autocast would produce them.
        projected = torch.nn.functional.linear(z1, torch.eye(96))
        assert projected.dtype == torch.bfloat16
        from_bf16 = HALF_LOSSES[loss](path, projected, z2)
    upcast = along(path, projected.float(), z2)
    assert all(torch.equal(a, b) for a, b in zip(inside, expected, strict=True))
    assert from_bf16.loss.dtype == torch.float32 and torch.isfinite(from_bf16.loss)
    exact = all(torch.equal(a, b) for a, b in zip(from_bf16, upcast, strict=True))
    assert exact == (loss == "barlow_twins_loss")


def test_float64_inputs_stay_float64() -> None:
    z1, z2 = correlated_views(16, 8)
    out = barlow_twins_loss(z1.double(), z2.double())
    assert out.loss.dtype == torch.float64
    assert rel_err(out.loss, reference_loss(z1, z2)[0]) < 2e-14  # measured 1.5e-15


@pytest.mark.parametrize(("n", "d"), [(32, 256), (256, 48), (4, 1024)])
def test_gradients_of_both_paths_match_float64_reference(n: int, d: int) -> None:
    z1, z2 = correlated_views(n, d, seed=2)
    ref_inputs = (z1.double().requires_grad_(), z2.double().requires_grad_())
    expected = torch.autograd.grad(reference_loss(*ref_inputs)[0], ref_inputs)
    grads = {}
    for path in PATHS:
        inputs = (z1.clone().requires_grad_(), z2.clone().requires_grad_())
        loss = barlow_twins_loss(*inputs, path=path).loss  # type: ignore[arg-type]
        grads[path] = torch.autograd.grad(loss, inputs)
        for g, g_ref in zip(grads[path], expected, strict=True):
            assert g.dtype == torch.float32
            assert rel_err(g, g_ref) < 1e-5, path  # float32 vs float64: measured 7.1e-7
    for g_corr, g_gram in zip(grads["correlation"], grads["gram"], strict=True):
        assert rel_err(g_gram, g_corr) < 5e-6  # measured 4.1e-7


def test_gradients_of_both_paths_agree_in_float64() -> None:
    z1, z2 = correlated_views(24, 40, seed=4)
    grads = []
    for path in PATHS:
        inputs = (z1.double().requires_grad_(), z2.double().requires_grad_())
        loss = barlow_twins_loss(*inputs, path=path).loss  # type: ignore[arg-type]
        grads.append(torch.autograd.grad(loss, inputs))
    for g_corr, g_gram in zip(*grads, strict=True):
        assert rel_err(g_gram, g_corr) < 2e-15  # float64: measured 1.7e-16


@pytest.mark.parametrize("path", PATHS)
def test_custom_backward_passes_gradcheck(path: str) -> None:
    gen = torch.Generator().manual_seed(5)
    z1 = torch.randn(6, 9, dtype=torch.float64, generator=gen, requires_grad=True)
    z2 = torch.randn(6, 9, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b: barlow_twins_loss(a, b, path=path).loss,  # type: ignore[arg-type]
        (z1, z2),
    )


def test_lambda_weights_only_the_off_diagonal_term() -> None:
    z1, z2 = correlated_views(16, 8)
    zero = barlow_twins_loss(z1, z2, lambd=0.0)
    one = barlow_twins_loss(z1, z2, lambd=1.0)
    assert torch.equal(zero.loss, zero.on_diag)
    assert torch.equal(one.loss, one.on_diag + one.off_diag)  # the same float32 sum


def test_off_diagonal_and_standardize() -> None:
    x = torch.arange(16.0).view(4, 4)
    expected = torch.tensor([v for v in range(16) if v % 5 != 0], dtype=torch.float32)
    assert torch.equal(off_diagonal(x), expected)
    z, _ = correlated_views(50, 6)
    bn = torch.nn.BatchNorm1d(6, affine=False).train()
    # BatchNorm's own variance kernel: measured 4.8e-7, one float32 ulp at |x| in [2, 4)
    assert torch.allclose(standardize(z), bn(z), rtol=0, atol=2e-6)
    with pytest.raises(ValueError, match="square 2-D matrix"):
        off_diagonal(torch.zeros(3, 4))
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        standardize(torch.zeros(3))


@pytest.mark.parametrize(
    ("z1", "z2", "kwargs", "match"),
    [
        (torch.randn(8), torch.randn(8), {}, r"z1 must be 2-D .* got shape \(8,\)"),
        (torch.randn(8, 4), torch.randn(8, 4, 1), {}, r"z2 must be 2-D"),
        (torch.randn(8, 4), torch.randn(8, 5), {}, r"same shape, got \(8, 4\) and \(8, 5\)"),
        (torch.randn(1, 4), torch.randn(1, 4), {}, r"has 1 sample.*increase batch_size"),
        (torch.randn(0, 4), torch.randn(0, 4), {}, r"has 0 sample.*batch_size"),
        (torch.randn(8, 4), torch.randn(8, 4), {"lambd": -0.1}, r"lambd must be >= 0.*-0\.1"),
        (torch.randn(8, 4), torch.randn(8, 4), {"lambd": float("nan")}, r"lambd must be >= 0"),
        (torch.randn(8, 4), torch.randn(8, 4), {"path": "svd"}, r"unknown path='svd'.*gram"),
        (torch.randn(8, 4), torch.randn(8, 4), {"eps": -1.0}, r"eps must be >= 0"),
    ],
)
def test_bad_input_raises(z1: Tensor, z2: Tensor, kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        barlow_twins_loss(z1, z2, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("view", ["z1", "z2"])
def test_non_finite_input_names_the_view(bad: float, view: str) -> None:
    views = {"z1": torch.randn(8, 4), "z2": torch.randn(8, 4)}
    views[view][3, 2] = bad
    with pytest.raises(ValueError, match=rf"^{view} contains NaN or Inf.*lower the learning rate"):
        barlow_twins_loss(views["z1"], views["z2"])


def test_choose_path_rejects_empty_sizes() -> None:
    with pytest.raises(ValueError, match="n >= 1 and d >= 1"):
        choose_path(0, 8)
