"""The contrastive losses (barlow.losses.contrastive) against their formulas: NT-Xent (SimCLR),
InfoNCE with a queue (MoCo), the full-graph multi-view InfoNCE (CMC)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from barlow.backbones import create_backbone
from barlow.losses import info_nce_loss, multiview_info_nce_loss, nt_xent_loss
from barlow.methods.cmc import CMC
from barlow.methods.moco import MoCo
from barlow.methods.simclr import SimCLR
from comparisons import rel_err
from references import naive_full_graph, unit


def naive_nt_xent(z1: Tensor, z2: Tensor, t: float) -> float:
    """SimCLR's Eq. 1 with loops: 2N anchors, each against the other 2N − 1 views."""
    u = unit(torch.cat([z1, z2])).double()
    n = z1.shape[0]
    total = 0.0
    for i in range(2 * n):
        positive = (i + n) % (2 * n)
        numerator = math.exp(float(u[i] @ u[positive]) / t)
        denominator = sum(math.exp(float(u[i] @ u[k]) / t) for k in range(2 * n) if k != i)
        total += -math.log(numerator / denominator)
    return total / (2 * n)


def naive_info_nce(q: Tensor, k: Tensor, queue: Tensor, t: float) -> float:
    qh, kh, qu = unit(q).double(), unit(k).double(), unit(queue).double()
    total = 0.0
    for n in range(q.shape[0]):
        positive = math.exp(float(qh[n] @ kh[n]) / t)
        negatives = sum(math.exp(float(qh[n] @ qu[j]) / t) for j in range(queue.shape[0]))
        total += -math.log(positive / (positive + negatives))
    return total / q.shape[0]


def embeddings(n: int = 6, d: int = 5, seed: int = 0) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    z1 = torch.randn(n, d, generator=gen)
    return z1, z1 + 0.7 * torch.randn(n, d, generator=gen)


# --- NT-Xent ---------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.1, 0.5, 2.0])
def test_nt_xent_matches_its_formula(temperature: float) -> None:
    z1, z2 = embeddings()
    out = nt_xent_loss(z1, z2, temperature)
    assert out.loss.dtype == torch.float32
    # float32 against float64: measured 8.2e-8
    assert out.loss.item() == pytest.approx(naive_nt_xent(z1, z2, temperature), rel=1e-6)


def test_nt_xent_is_symmetric_and_scale_invariant() -> None:
    z1, z2 = embeddings()
    loss = nt_xent_loss(z1, z2).loss
    # other summation orders: measured 9.7e-8 both
    assert torch.allclose(loss, nt_xent_loss(z2, z1).loss, rtol=1e-6)
    assert torch.allclose(loss, nt_xent_loss(3.0 * z1, 0.2 * z2).loss, rtol=1e-6)


def test_nt_xent_logs() -> None:
    z1, z2 = embeddings()
    out = nt_xent_loss(z1, z2, 0.5)
    u1, u2 = unit(z1), unit(z2)
    assert out.positive_similarity.item() == pytest.approx((u1 * u2).sum(1).mean().item(), 1e-6)
    u = torch.cat([u1, u2])
    sim = (u @ u.T).fill_diagonal_(-2.0)
    n = z1.shape[0]
    expected = (sim.argmax(1) == torch.cat([torch.arange(n) + n, torch.arange(n)])).float().mean()
    assert out.accuracy.item() == pytest.approx(expected.item())
    assert not out.positive_similarity.requires_grad and not out.accuracy.requires_grad
    # Identical views: the positive is the other view of the same image and always wins.
    assert nt_xent_loss(z1, z1).accuracy.item() == 1.0


def test_nt_xent_gradient_is_the_formulas() -> None:
    z1, z2 = (z.double().requires_grad_() for z in embeddings(n=4, d=3))
    assert torch.autograd.gradcheck(lambda a, b: nt_xent_loss(a, b, 0.3).loss, (z1, z2))


def test_nt_xent_stays_float32_under_autocast() -> None:
    z1, z2 = embeddings()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = nt_xent_loss(z1.bfloat16(), z2.bfloat16())
    assert out.loss.dtype == torch.float32
    reference = nt_xent_loss(z1.bfloat16().float(), z2.bfloat16().float()).loss
    assert torch.equal(out.loss, reference)  # the loss upcasts before it computes


@pytest.mark.parametrize("temperature", [0.0, -0.5, float("inf"), float("nan")])
def test_losses_reject_bad_temperatures(temperature: float) -> None:
    z1, z2 = embeddings()
    with pytest.raises(ValueError, match="temperature"):
        nt_xent_loss(z1, z2, temperature)
    with pytest.raises(ValueError, match="temperature"):
        info_nce_loss(z1, z2, torch.randn(8, 5), temperature)
    with pytest.raises(ValueError, match="temperature"):
        multiview_info_nce_loss([z1, z2], temperature)
    for cls in (SimCLR, MoCo, CMC):
        with pytest.raises(ValueError, match="temperature"):
            cls(create_backbone("small_cnn", in_channels=1), temperature=temperature)


def test_losses_reject_bad_input() -> None:
    z1, z2 = embeddings()
    with pytest.raises(ValueError, match="same shape"):
        nt_xent_loss(z1, z2[:, :3])
    with pytest.raises(ValueError, match="2-D"):
        nt_xent_loss(z1[0], z2[0])
    with pytest.raises(ValueError, match="no negatives"):
        nt_xent_loss(z1[:1], z2[:1])
    with pytest.raises(ValueError, match="NaN or Inf"):
        nt_xent_loss(z1, z2.clone().index_fill_(0, torch.tensor([2]), float("nan")))
    with pytest.raises(ValueError, match="queue"):
        info_nce_loss(z1, z2, torch.randn(8, 4))
    with pytest.raises(ValueError, match="queue"):
        info_nce_loss(z1, z2, torch.randn(0, 5))
    with pytest.raises(ValueError, match="NaN or Inf"):
        info_nce_loss(z1, z2, torch.full((8, 5), float("inf")))
    with pytest.raises(ValueError, match="at least 2 views"):
        multiview_info_nce_loss([z1])
    with pytest.raises(ValueError, match="same shape"):
        multiview_info_nce_loss([z1, z2, z2[:3]])


# --- InfoNCE with a queue (MoCo) ---------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.07, 0.2, 1.0])
def test_info_nce_matches_its_formula(temperature: float) -> None:
    q, k = embeddings()
    queue = torch.randn(11, 5, generator=torch.Generator().manual_seed(3))
    out = info_nce_loss(q, k, queue, temperature)
    assert out.loss.dtype == torch.float32
    # float32 against float64: measured 1.4e-7
    assert out.loss.item() == pytest.approx(naive_info_nce(q, k, queue, temperature), rel=2e-6)
    assert out.positive_similarity.item() == pytest.approx(
        (unit(q) * unit(k)).sum(1).mean().item(), rel=1e-6
    )


def info_nce_in_float64(q: Tensor, k: Tensor, queue: Tensor, t: float) -> Tensor:
    """InfoNCE written out with torch ops in float64, differentiable (the reference gradient)."""
    qh, kh, qu = (F.normalize(x.double(), dim=1) for x in (q, k, queue))
    logits = torch.cat([(qh * kh).sum(1, keepdim=True), qh @ qu.T], dim=1) / t
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long))


def info_nce_without_gradient_through_the_negatives(
    q: Tensor, k: Tensor, queue: Tensor, t: float
) -> Tensor:
    """Deliberately broken, for the negative case: the query–queue logits cut from the graph.
    Its value is right and its gradient non-zero, which is all the old test asserted."""
    qh, kh, qu = F.normalize(q, dim=1), F.normalize(k, dim=1), F.normalize(queue, dim=1)
    logits = torch.cat([(qh * kh).sum(1, keepdim=True), qh.detach() @ qu.T], dim=1) / t
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long))


INFO_NCE = {
    "info_nce_loss": lambda q, k, queue, t: info_nce_loss(q, k, queue, t).loss,
    "broken: no gradient through the negatives": info_nce_without_gradient_through_the_negatives,
}


@pytest.mark.parametrize("loss", INFO_NCE)
def test_info_nce_sends_gradient_to_the_queries_only_when_keys_are_detached(loss: str) -> None:
    """With detached keys the queries get exactly the formula's gradient and the keys none; keys
    passed with their graph get one (the loss does not detach them: MoCo must)."""
    q, k = embeddings()
    queue = unit(torch.randn(9, 5, generator=torch.Generator().manual_seed(4)))
    queries, keys = q.clone().requires_grad_(), k.clone().requires_grad_()
    INFO_NCE[loss](queries, keys.detach(), queue, 0.2).backward()
    assert keys.grad is None
    assert queries.grad is not None and queries.grad.abs().sum() > 0  # the old check
    reference = q.double().requires_grad_()
    (expected,) = torch.autograd.grad(info_nce_in_float64(reference, k, queue, 0.2), reference)
    # float32 against float64: measured 1.9e-7; the broken loss is 0.63 off
    assert (rel_err(queries.grad, expected) < 2e-6) == (loss == "info_nce_loss")
    attached = k.clone().requires_grad_()
    INFO_NCE[loss](q, attached, queue, 0.2).backward()
    assert attached.grad is not None and attached.grad.abs().sum() > 0


# --- CMC full graph ------------------------------------------------------------------------


@pytest.mark.parametrize("num_views", [2, 3, 4])
def test_multiview_info_nce_is_the_sum_over_all_pairs(num_views: int) -> None:
    gen = torch.Generator().manual_seed(num_views)
    zs = [torch.randn(5, 4, generator=gen) for _ in range(num_views)]
    loss = multiview_info_nce_loss(zs, 0.2).loss
    assert loss.item() == pytest.approx(naive_full_graph(zs, 0.2), rel=2e-6)  # measured 1.2e-7
