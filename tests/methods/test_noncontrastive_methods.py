"""BYOL, SimSiam and VICReg as methods: EMA, stop-gradient, heads, recipes (their losses are
tested in tests/losses/)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from barlow.augment import RECIPES, recipe_for
from barlow.backbones import create_backbone
from barlow.config import load_config
from barlow.losses import negative_cosine, vicreg_loss
from barlow.methods import BYOL, METHODS, SimSiam, VICReg


def cosines(p: Tensor, z: Tensor) -> Tensor:
    """cos(p_n, z_n) written out, in float64."""
    p, z = p.double(), z.double()
    return (p * z).sum(1) / (p.square().sum(1).sqrt() * z.square().sum(1).sqrt())


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
    assert torch.allclose(out.loss.double(), expected, rtol=1e-6)  # measured 3.8e-9
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
        # the EMA rounds two products and their sum: three float32 ulps at |w| = 1 (the
        # BatchNorm weights); measured 6.0e-8
        assert torch.allclose(t.double(), expected, rtol=0, atol=3.6e-7)
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
    assert torch.allclose(loss.double(), expected.detach(), rtol=1e-6)  # measured 3.5e-8
    assert torch.allclose(simsiam([x1, x2]).loss, loss, rtol=1e-6)  # measured 0

    grad_z1, grad_p1 = torch.autograd.grad(loss, [z1, p1], retain_graph=True)
    (through_p1,) = torch.autograd.grad(p1, z1, grad_outputs=grad_p1, retain_graph=True)
    assert torch.allclose(grad_z1, through_p1, rtol=1e-6, atol=0)  # measured 0
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
    assert torch.allclose(out.loss, expected.loss, rtol=1e-6)  # measured 0 (and below)
    for name in ("invariance", "variance", "covariance"):
        assert torch.allclose(out.logs[name], getattr(expected, name), rtol=1e-6)
    with pytest.raises(ValueError, match="std_coeff"):
        VICReg(create_backbone("small_cnn", in_channels=1), std_coeff=-1.0)


def test_view_recipes() -> None:
    """Each method names the views it draws: BYOL and VICReg the Barlow Twins pair (BYOL's),
    SimSiam MoCo v2's symmetric views."""
    assert BYOL.views == VICReg.views == "barlow" and SimSiam.views == "moco"
    for variant in ("", "-small", "-gray"):
        a, b = RECIPES[SimSiam.views + variant]
        assert a == b and a.solarize_p == 0 and a.crop_scale == (0.2, 1.0)
    assert RECIPES[SimSiam.views][0].blur_p == 0.5
    assert recipe_for(SimSiam.views, channels=1, image_size=28) == "moco-gray"
    assert recipe_for(BYOL.views, channels=3, image_size=32) == "barlow-small"


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
