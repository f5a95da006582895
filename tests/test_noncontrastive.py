"""BYOL, SimSiam and VICReg: their losses against the formulas, invariances, EMA, stop-gradient."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from barlow.augment import RECIPES, recipe_for
from barlow.backbones import create_backbone
from barlow.config import load_config
from barlow.losses import negative_cosine, normalized_mse, vicreg_loss
from barlow.methods import BYOL, METHODS, SimSiam, VICReg

N, D = 12, 7


def pair(seed: int = 0, n: int = N, d: int = D) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d, generator=gen)
    return a, a + 0.7 * torch.randn(n, d, generator=gen)


# --- BYOL / SimSiam losses -----------------------------------------------------------------


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
    assert torch.allclose(expected, (p_hat - z_hat).square().sum(1).mean())
    assert torch.allclose(normalized_mse(p, z).double(), expected, rtol=1e-6)


def test_negative_cosine_is_the_formula() -> None:
    p, z = pair(1)
    assert torch.allclose(negative_cosine(p, z).double(), -cosines(p, z).mean(), rtol=1e-6)


def test_cosine_losses_at_their_extremes() -> None:
    p, _ = pair(2)
    assert normalized_mse(p, p).abs() < 1e-6
    assert normalized_mse(p, -p).sub(4).abs() < 1e-6
    assert negative_cosine(p, 3 * p).add(1).abs() < 1e-6


@pytest.mark.parametrize("loss_fn", [normalized_mse, negative_cosine])
@pytest.mark.parametrize("scale_p, scale_z", [(3.0, 1.0), (1.0, 0.01), (250.0, 7.0)])
def test_cosine_losses_ignore_positive_scales(loss_fn, scale_p: float, scale_z: float) -> None:  # type: ignore[no-untyped-def]
    p, z = pair(3)
    per_row = torch.linspace(0.5, 4.0, N).unsqueeze(1)  # also a different scale per image
    scaled = loss_fn(scale_p * per_row * p, scale_z * z)
    assert torch.allclose(scaled, loss_fn(p, z), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loss_fn", [normalized_mse, negative_cosine])
def test_cosine_losses_stop_the_gradient_at_z(loss_fn) -> None:  # type: ignore[no-untyped-def]
    p, z = pair(4)
    p.requires_grad_(True)
    z.requires_grad_(True)
    grad_p, grad_z = torch.autograd.grad(loss_fn(p, z), [p, z], allow_unused=True)
    assert grad_z is None
    assert grad_p is not None and grad_p.abs().sum() > 0
    # Scale invariance in p means the gradient is orthogonal to p, image by image.
    assert (grad_p * p).sum(1).abs().max() < 1e-6


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
    assert torch.allclose(out, normalized_mse(p.bfloat16().float(), z.bfloat16().float()))


# --- VICReg loss ---------------------------------------------------------------------------


def vicreg_reference(z1: Tensor, z2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Bardes et al. (2022), Eq. 1–6 with the released code's ½ on the variance, in float64."""
    z1, z2 = z1.double(), z2.double()
    n, d = z1.shape
    invariance = ((z1 - z2) ** 2).sum() / (n * d)
    variance = torch.zeros((), dtype=torch.float64)
    covariance = torch.zeros((), dtype=torch.float64)
    off = ~torch.eye(d, dtype=torch.bool)
    for z in (z1, z2):
        centred = z - z.sum(0) / n
        cov = torch.einsum("ni,nj->ij", centred, centred) / (n - 1)
        std = torch.sqrt(cov.diagonal() + 1e-4)
        variance += torch.clamp(1 - std, min=0).sum() / d / 2
        covariance += cov[off].square().sum() / d
    return invariance, variance, covariance


@pytest.mark.parametrize("path", ["correlation", "gram", "auto"])
@pytest.mark.parametrize("n, d", [(12, 7), (5, 9)])
def test_vicreg_loss_is_the_formula(path: str, n: int, d: int) -> None:
    z1, z2 = pair(7, n, d)
    z1, z2 = 0.6 * z1, 0.6 * z2  # stds below 1, so the hinge is active
    out = vicreg_loss(z1, z2, path=path)  # type: ignore[arg-type]
    invariance, variance, covariance = vicreg_reference(z1, z2)
    assert variance > 0
    for actual, expected in zip(out[1:], (invariance, variance, covariance), strict=True):
        assert torch.allclose(actual.double(), expected, rtol=1e-5)
    weighted = 25 * invariance + 25 * variance + 1 * covariance
    assert torch.allclose(out.loss.double(), weighted, rtol=1e-5)
    custom = vicreg_loss(z1, z2, 2.0, 3.0, 5.0, path=path)  # type: ignore[arg-type]
    assert torch.allclose(custom.loss.double(), 2 * invariance + 3 * variance + 5 * covariance)


@pytest.mark.parametrize("n, d", [(12, 7), (5, 9)])
def test_vicreg_paths_agree_in_value_and_gradient(n: int, d: int) -> None:
    results = []
    for path in ("correlation", "gram"):
        z1, z2 = pair(8, n, d)
        z1.requires_grad_(True)
        z2.requires_grad_(True)
        loss = vicreg_loss(z1, z2, path=path).loss  # type: ignore[arg-type]
        loss.backward()
        results.append((loss.detach(), z1.grad, z2.grad))
    for a, b in zip(*results, strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_vicreg_variance_term_is_zero_when_every_std_is_at_least_one() -> None:
    z1, z2 = pair(9)
    z1 = z1 / z1.std(0) * torch.linspace(1.0, 3.0, D)  # column stds from 1 (exactly) to 3
    z2 = z2 / z2.std(0) * 1.5
    assert vicreg_loss(z1, z2).variance == 0
    # One column shrunk below 1: the hinge is that column's shortfall / D / 2.
    z2[:, 4] *= 0.5 / 1.5
    expected = (1 - math.sqrt(0.25 + 1e-4)) / D / 2
    assert torch.allclose(vicreg_loss(z1, z2).variance, torch.tensor(expected), rtol=1e-5)


def test_vicreg_variance_term_of_a_collapsed_batch() -> None:
    z = torch.ones(N, D)
    out = vicreg_loss(z, z)
    assert torch.allclose(out.variance, torch.tensor(1 - math.sqrt(1e-4)))
    assert out.invariance == 0 and out.covariance == 0


@pytest.mark.parametrize("path", ["correlation", "gram"])
def test_vicreg_covariance_is_zero_for_decorrelated_dimensions(path: str) -> None:
    # Columns 1..7 of the 8×8 Hadamard matrix: centred and mutually orthogonal.
    h = torch.ones(1, 1)
    for _ in range(3):
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    z1 = h[:, 1:] * torch.arange(1.0, 8.0)  # any scale per dimension
    z2 = h[:, [3, 1, 2, 7, 5, 6, 4]]
    out = vicreg_loss(z1, z2, path=path)  # type: ignore[arg-type]
    if path == "correlation":  # the D×D path zeroes the diagonal: no cancellation
        assert out.covariance == 0
    else:  # ‖C‖²_F − Σ_j C_jj², with float32 rounding of ‖C‖²_F / D
        variances = z1.var(0)
        assert out.covariance.abs() < 1e-6 * variances.square().sum() / 7
    mixed = z1 + 0.5 * z1.roll(1, dims=1)  # correlated neighbours: the term must notice
    assert vicreg_loss(mixed, z2, path=path).covariance > 0.1  # type: ignore[arg-type]


def test_vicreg_statistics_ignore_a_shift() -> None:
    z1, z2 = pair(10)
    shift = torch.randn(D) * 5
    base, shifted = vicreg_loss(z1, z2), vicreg_loss(z1 + shift, z2 + shift)
    for a, b in zip(base, shifted, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)
    # Only the invariance term sees a shift of one view: it grows by ‖shift‖² / D.
    one = vicreg_loss(z1 + shift, z2)
    assert torch.allclose(one.variance, base.variance) and torch.allclose(
        one.covariance, base.covariance, rtol=1e-4
    )
    assert one.invariance > base.invariance


def test_vicreg_loss_rejects_bad_input() -> None:
    z1, z2 = pair(11)
    with pytest.raises(ValueError, match="2-D"):
        vicreg_loss(z1.flatten(), z2.flatten())
    with pytest.raises(ValueError, match="same shape"):
        vicreg_loss(z1, z2[:-1])
    with pytest.raises(ValueError, match="at least 2"):
        vicreg_loss(z1[:1], z2[:1])
    broken = z1.clone()
    broken[0, 0] = math.nan
    with pytest.raises(ValueError, match="z1 contains NaN or Inf"):
        vicreg_loss(broken, z2)
    for kwargs, name in [
        ({"sim_coeff": -1.0}, "sim_coeff"),
        ({"std_coeff": math.inf}, "std_coeff"),
        ({"cov_coeff": -0.1}, "cov_coeff"),
        ({"gamma": 0.0}, "gamma"),
        ({"eps": 0.0}, "eps"),
        ({"path": "fast"}, "path"),
    ]:
        with pytest.raises(ValueError, match=name):
            vicreg_loss(z1, z2, **kwargs)  # type: ignore[arg-type]


def test_vicreg_loss_is_float32_under_autocast() -> None:
    z1, z2 = pair(12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = vicreg_loss(z1.bfloat16(), z2.bfloat16())
    assert all(t.dtype == torch.float32 for t in out)
    expected = vicreg_loss(z1.bfloat16().float(), z2.bfloat16().float())
    assert torch.allclose(out.loss, expected.loss)


# --- methods -------------------------------------------------------------------------------


def views(seed: int = 0, batch: int = 8) -> list[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 1, 16, 16, generator=gen) for _ in range(2)]


def small_byol(**kwargs: object) -> BYOL:
    torch.manual_seed(0)
    backbone = create_backbone("small_cnn", in_channels=1)
    return BYOL(backbone, projector="32-16", predictor_hidden="24", **kwargs)  # type: ignore[arg-type]


def test_byol_target_starts_as_a_frozen_copy_of_the_online_network() -> None:
    byol = small_byol()
    online = [*byol.backbone.parameters(), *byol.projector.parameters()]
    target = [*byol.target_backbone.parameters(), *byol.target_projector.parameters()]
    assert len(online) == len(target)
    for o, t in zip(online, target, strict=True):
        assert torch.equal(o, t) and o.data_ptr() != t.data_ptr()
        assert o.requires_grad and not t.requires_grad
    keys = byol.state_dict().keys()
    assert any(k.startswith("target_backbone.") for k in keys)
    assert any(k.startswith("target_projector.") for k in keys)


def test_byol_loss_is_the_symmetric_normalized_mse_and_target_gets_no_gradient() -> None:
    byol = small_byol()
    x1, x2 = views()
    out = byol([x1, x2])
    out.loss.backward()
    for name, p in byol.named_parameters():
        assert (p.grad is None) == name.startswith("target_"), name
    with torch.no_grad():
        p1 = byol.predictor(byol.projector(byol.backbone(x1)))
        p2 = byol.predictor(byol.projector(byol.backbone(x2)))
        t1 = byol.target_projector(byol.target_backbone(x1))
        t2 = byol.target_projector(byol.target_backbone(x2))
    expected = (2 - 2 * cosines(p1, t2)).mean() + (2 - 2 * cosines(p2, t1)).mean()
    assert torch.allclose(out.loss.double(), expected, rtol=1e-5)
    assert p1.shape == t1.shape == (8, 16)
    assert out.logs["momentum"] == pytest.approx(0.996)
    assert 0 < out.logs["z_std"] <= 1


@pytest.mark.parametrize("progress", [0.0, 0.3, 1.0])
def test_byol_after_step_is_the_ema_with_the_cosine_schedule(progress: float) -> None:
    byol = small_byol(target_momentum=0.99)
    opt = torch.optim.SGD([p for p in byol.parameters() if p.requires_grad], lr=0.5)
    byol(views()).loss.backward()
    opt.step()
    online = [*byol.backbone.parameters(), *byol.projector.parameters()]
    target = [*byol.target_backbone.parameters(), *byol.target_projector.parameters()]
    before = [t.detach().clone() for t in target]
    assert any(not torch.equal(o, b) for o, b in zip(online, before, strict=True))

    byol.after_step(progress)
    tau = 1 - (1 - 0.99) * (math.cos(math.pi * progress) + 1) / 2
    for t, b, o in zip(target, before, online, strict=True):
        expected = tau * b.double() + (1 - tau) * o.detach().double()
        assert torch.allclose(t.double(), expected, rtol=0, atol=1e-7)
    for t, o in zip(byol.target_backbone.buffers(), byol.backbone.buffers(), strict=True):
        assert torch.equal(t, o)  # BatchNorm statistics are copied
    assert byol(views(1)).logs["momentum"] == pytest.approx(tau)
    if progress == 1.0:  # τ = 1: the target stays where it was
        assert all(torch.equal(t, b) for t, b in zip(target, before, strict=True))


def test_byol_state_holds_the_current_momentum() -> None:
    byol, resumed = small_byol(), small_byol()
    byol.after_step(0.5)
    resumed.load_state_dict(byol.state_dict())
    assert resumed(views()).logs["momentum"] == pytest.approx(1 - 0.004 / 2)


def test_byol_rejects_a_momentum_outside_the_unit_interval() -> None:
    with pytest.raises(ValueError, match="target_momentum"):
        small_byol(target_momentum=1.5)


def test_simsiam_gradient_reaches_z_only_through_p() -> None:
    torch.manual_seed(0)
    simsiam = SimSiam(create_backbone("small_cnn", in_channels=1), projector="32-16")
    x1, x2 = views(2)
    z1, z2 = simsiam.projector(simsiam.backbone(x1)), simsiam.projector(simsiam.backbone(x2))
    p1, p2 = simsiam.predictor(z1), simsiam.predictor(z2)
    loss = (negative_cosine(p1, z2) + negative_cosine(p2, z1)) / 2
    expected = -(cosines(p1, z2).mean() + cosines(p2, z1).mean()) / 2
    assert torch.allclose(loss.double(), expected.detach(), rtol=1e-5)
    assert torch.allclose(simsiam([x1, x2]).loss, loss, rtol=1e-6)

    grad_z1, grad_p1 = torch.autograd.grad(loss, [z1, p1], retain_graph=True)
    (through_p1,) = torch.autograd.grad(p1, z1, grad_outputs=grad_p1, retain_graph=True)
    assert torch.allclose(grad_z1, through_p1, rtol=1e-5, atol=1e-8)
    # Without the stop-gradient z1 would also get the direct term of D(p2, z1): it differs.
    direct = -(cosines(p1, z2).mean() + cosines(p2, z1).mean()) / 2
    (grad_z1_no_stop,) = torch.autograd.grad(direct.float(), z1)
    assert not torch.allclose(grad_z1_no_stop, grad_z1, rtol=1e-3)


def test_simsiam_heads_follow_the_paper() -> None:
    simsiam = SimSiam(create_backbone("small_cnn", in_channels=1))
    linears = [m for m in simsiam.projector if isinstance(m, nn.Linear)]
    assert [m.out_features for m in linears] == [2048, 2048, 2048]
    last_bn = simsiam.projector[-1]
    assert isinstance(last_bn, nn.BatchNorm1d) and not last_bn.affine
    pred = [m for m in simsiam.predictor if isinstance(m, nn.Linear)]
    assert [(m.out_features, m.bias is not None) for m in pred] == [(512, False), (2048, True)]


def test_vicreg_method_uses_the_loss_and_logs_its_terms() -> None:
    torch.manual_seed(0)
    vicreg = VICReg(create_backbone("small_cnn", in_channels=1), projector="32-16")
    x1, x2 = views(3)
    out = vicreg([x1, x2])
    z1, z2 = vicreg.projector(vicreg.backbone(x1)), vicreg.projector(vicreg.backbone(x2))
    expected = vicreg_loss(z1, z2)
    assert torch.allclose(out.loss, expected.loss, rtol=1e-6)
    for name in ("invariance", "variance", "covariance"):
        assert torch.allclose(out.logs[name], getattr(expected, name), rtol=1e-6)
    with pytest.raises(ValueError, match="std_coeff"):
        VICReg(create_backbone("small_cnn", in_channels=1), std_coeff=-1.0)


def test_view_recipes() -> None:
    assert BYOL.views == "byol" and SimSiam.views == "simsiam" and VICReg.views == "vicreg"
    for family in ("byol", "vicreg"):
        for variant in ("", "-small", "-gray"):
            assert RECIPES[family + variant] == RECIPES["barlow" + variant]
    for variant in ("", "-small", "-gray"):
        assert RECIPES["simsiam" + variant] == RECIPES["moco" + variant]  # MoCo v2's views
        a, b = RECIPES["simsiam" + variant]
        assert a == b and a.solarize_p == 0 and a.crop_scale == (0.2, 1.0)
    assert RECIPES["simsiam"][0].blur_p == 0.5
    assert recipe_for("simsiam", channels=1, image_size=28) == "simsiam-gray"
    assert recipe_for("byol", channels=3, image_size=32) == "byol-small"


@pytest.mark.parametrize("method", ["byol", "simsiam", "vicreg"])
def test_shipped_recipes_name_the_method(method: str) -> None:
    small = load_config(f"{method}-fashion-mnist")
    assert (small.method.name, small.model.backbone) == (method, "small_cnn")
    assert small.data.dataset == "fashion-mnist"
    paper = load_config(f"{method}-imagenet")
    assert (paper.method.name, paper.model.backbone, paper.data.dataset) == (
        method,
        "resnet50",
        "imagenet",
    )
    assert method in METHODS


def test_imagenet_recipes_hold_the_paper_numbers() -> None:
    byol = load_config("byol-imagenet")
    assert byol.method.params == {
        "projector": "4096-256",
        "predictor_hidden": "4096",
        "target_momentum": 0.996,
    }
    assert (byol.optim.name, byol.optim.lr, byol.optim.weight_decay) == ("lars", 0.2, 1.5e-6)
    assert (byol.train.batch_size, byol.train.epochs, byol.optim.warmup_epochs) == (4096, 1000, 10)
    simsiam = load_config("simsiam-imagenet")
    assert simsiam.method.params == {"projector": "2048-2048-2048", "predictor_hidden": "512"}
    assert (simsiam.optim.name, simsiam.optim.lr, simsiam.optim.weight_decay) == (
        "sgd",
        0.05,
        1e-4,
    )
    assert (simsiam.train.batch_size, simsiam.train.epochs) == (512, 100)
    vicreg = load_config("vicreg-imagenet")
    assert vicreg.method.params["projector"] == "8192-8192-8192"
    assert [vicreg.method.params[k] for k in ("sim_coeff", "std_coeff", "cov_coeff")] == [
        25.0,
        25.0,
        1.0,
    ]
    assert (vicreg.optim.name, vicreg.optim.lr, vicreg.optim.weight_decay) == ("lars", 0.2, 1e-6)
    assert (vicreg.train.batch_size, vicreg.train.epochs) == (2048, 1000)
