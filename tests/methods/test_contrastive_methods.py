"""SimCLR, MoCo and CMC as methods: CMC's views and L / ab split, MoCo's queue and key encoder,
views and logs (their losses are tested in tests/losses/test_contrastive.py)."""

from __future__ import annotations

import itertools

import pytest
import torch

from barlow.augment import RECIPES, recipe_for
from barlow.backbones import create_backbone
from barlow.methods import METHODS
from barlow.methods.cmc import CMC, LabEncoders, rgb_to_lab
from barlow.methods.moco import MoCo
from barlow.methods.simclr import SimCLR
from references import naive_cross_view, naive_full_graph, unit

# --- CMC with several views ---------------------------------------------------------------


def test_cmc_with_three_views_uses_all_three_pairs() -> None:
    torch.manual_seed(0)
    method = CMC(create_backbone("small_cnn", in_channels=1), projector="16", num_views=3)
    views = [torch.randn(6, 1, 16, 16) for _ in range(3)]
    loss = method(views).loss
    with torch.no_grad():
        zs = list(method.projectors[0](method.backbone(torch.cat(views))).chunk(3))
    expected = naive_full_graph(zs, method.temperature)
    assert loss.item() == pytest.approx(expected, rel=2e-6)  # float32 vs 64: measured 1.1e-7
    # Each pair matters: leaving any one out changes the value.
    for i, j in itertools.combinations(range(3), 2):
        pair = naive_cross_view(zs[i], zs[j], 0.07) + naive_cross_view(zs[j], zs[i], 0.07)
        assert abs(loss.item() - (expected - pair)) > 1e-3


def test_cmc_num_views_is_per_instance_and_checked() -> None:
    backbone = create_backbone("small_cnn", in_channels=1)
    assert CMC(backbone, num_views=4).num_views == 4
    assert CMC.num_views == 2  # the class default is untouched
    method = CMC(create_backbone("small_cnn", in_channels=1), num_views=3)
    with pytest.raises(ValueError, match="3 views"):
        method([torch.randn(4, 1, 16, 16)] * 2)
    with pytest.raises(ValueError, match="num_views"):
        CMC(create_backbone("small_cnn", in_channels=1), num_views=1)
    with pytest.raises(ValueError, match="split"):
        CMC(create_backbone("small_cnn", in_channels=1), split="yuv")  # type: ignore[arg-type]


# --- CMC's L / ab split --------------------------------------------------------------------


def test_rgb_to_lab_known_colours() -> None:
    colours = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.5, 0.5, 0.5]])
    lab = rgb_to_lab(colours.T.reshape(1, 3, 4, 1)).reshape(3, 4).T
    # Reference values for sRGB under D65 (white, black, red, mid grey).
    expected = torch.tensor(
        [[100.0, 0.0, 0.0], [0.0, 0.0, 0.0], [53.24, 80.09, 67.20], [53.39, 0.0, 0.0]]
    )
    # the reference values are rounded to 0.01 (their own error up to 0.005): measured 3.2e-3
    assert torch.allclose(lab, expected, rtol=0, atol=0.01)


def lab_method(num_views: int = 1) -> CMC:
    torch.manual_seed(0)
    backbone = create_backbone("small_cnn", in_channels=3)
    return CMC(backbone, projector="16", split="lab", num_views=num_views, rgb_stats="cifar10")


def test_lab_split_shapes_encoders_and_embedding() -> None:
    method = lab_method()
    assert isinstance(method.backbone, LabEncoders)
    first = [
        next(m for m in e.modules() if isinstance(m, torch.nn.Conv2d))
        for e in (method.backbone.l_encoder, method.backbone.ab_encoder)
    ]
    assert (first[0].in_channels, first[1].in_channels) == (1, 2)
    x = torch.randn(4, 3, 16, 16)
    lightness, ab = method.backbone.split(x)
    assert lightness.shape == (4, 1, 16, 16) and ab.shape == (4, 2, 16, 16)
    assert lightness.abs().max() <= 1.0 and ab.abs().max() <= 1.0
    h = method.embed(x)
    assert h.shape == (4, 2 * 256) == (4, method.backbone.num_features)
    with torch.no_grad():
        assert torch.equal(h[:, :256], method.backbone.l_encoder(lightness))
        assert torch.equal(h[:, 256:], method.backbone.ab_encoder(ab))


@pytest.mark.parametrize("num_views", [1, 2])
def test_lab_split_trains_both_encoders(num_views: int) -> None:
    method = lab_method(num_views)
    views = [torch.randn(6, 3, 16, 16) for _ in range(num_views)]
    out = method(views)
    out.loss.backward()
    for name, p in method.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # num_views augmented images give 2·num_views views: L and ab of each, all pairs.
    with torch.no_grad():
        lightness, ab = method.backbone.split(torch.cat(views))
        z_l = method.projectors[0](method.backbone.l_encoder(lightness)).chunk(num_views)
        z_ab = method.projectors[1](method.backbone.ab_encoder(ab)).chunk(num_views)
    zs = [z for pair in zip(z_l, z_ab, strict=True) for z in pair]
    assert out.loss.item() == pytest.approx(naive_full_graph(zs, 0.07), rel=1e-6)  # 9.0e-8


def test_lab_split_errors() -> None:
    with pytest.raises(ValueError, match="RGB images"):
        lab_method()([torch.randn(4, 1, 16, 16)])
    with pytest.raises(ValueError, match="rgb_stats"):
        CMC(create_backbone("small_cnn", in_channels=3), split="lab", rgb_stats="fashion-mnist")


# --- MoCo queue and key encoder ------------------------------------------------------------


def small_moco(queue_size: int = 10) -> MoCo:
    torch.manual_seed(0)
    return MoCo(
        create_backbone("small_cnn", in_channels=1),
        projector="16-8",
        queue_size=queue_size,
        key_momentum=0.9,
    )


def test_queue_starts_as_random_unit_keys_and_is_saved() -> None:
    method = small_moco()
    assert method.queue.shape == (10, 8)
    assert torch.allclose(method.queue.norm(dim=1), torch.ones(10), rtol=1e-6)  # 1 ulp
    assert method.queue.std() > 0.1
    state = method.state_dict()
    assert {"queue", "queue_ptr"} <= state.keys()
    assert any(k.startswith("key_backbone.") for k in state)
    assert any(k.startswith("key_projector.") for k in state)


def test_queue_holds_the_last_k_keys_in_order() -> None:
    method = small_moco(queue_size=10)
    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.1)
    keys = []
    for step in range(4):  # 4 batches of 4 keys: the ring of 10 wraps around
        views = [torch.randn(4, 1, 16, 16) for _ in range(2)]
        with torch.no_grad():
            k = method.key_projector(method.key_backbone(views[1]))
        keys.append(unit(k))
        opt.zero_grad()
        method(views).loss.backward()
        opt.step()
        method.after_step((step + 1) / 4)
    assert method.queue_ptr.item() == 16 % 10
    oldest_first = torch.roll(method.queue, -int(method.queue_ptr), dims=0)
    assert torch.equal(oldest_first, torch.cat(keys)[-10:])  # the keys are copied in


def test_eval_forward_does_not_enqueue() -> None:
    method = small_moco()
    before = method.queue.clone()
    method.eval()
    method([torch.randn(4, 1, 16, 16) for _ in range(2)])
    method.after_step(0.5)
    assert torch.equal(method.queue, before) and method.queue_ptr.item() == 0


def test_key_encoder_moves_by_the_ema_rule_and_gets_no_gradient() -> None:
    method = small_moco()
    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.5)
    method([torch.randn(4, 1, 16, 16) for _ in range(2)]).loss.backward()
    opt.step()
    online = dict(method.backbone.named_parameters()) | {
        f"p.{k}": v for k, v in method.projector.named_parameters()
    }
    keys = dict(method.key_backbone.named_parameters()) | {
        f"p.{k}": v for k, v in method.key_projector.named_parameters()
    }
    before = {name: p.detach().clone() for name, p in keys.items()}
    for name, p in keys.items():
        assert not p.requires_grad and p.grad is None, name
    method.after_step(0.5)
    for name, p in keys.items():
        expected = 0.9 * before[name] + 0.1 * online[name].detach()
        assert not torch.equal(p, before[name]), name
        # the EMA rounds two products and their sum: three float32 ulps at |w| = 1 (the
        # BatchNorm weights); measured 1.2e-7
        assert torch.allclose(p, expected, rtol=0, atol=3.6e-7), name


def test_moco_refuses_a_batch_larger_than_the_queue() -> None:
    with pytest.raises(ValueError, match="queue_size"):
        small_moco(queue_size=3)([torch.randn(4, 1, 16, 16) for _ in range(2)])
    with pytest.raises(ValueError, match="key_momentum"):
        MoCo(create_backbone("small_cnn", in_channels=1), key_momentum=1.5)


# --- registry and views ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["simclr", "moco", "cmc"])
@pytest.mark.parametrize(("channels", "size"), [(1, 28), (3, 32), (3, 224)])
def test_default_views_fit_the_method(name: str, channels: int, size: int) -> None:
    cls = METHODS[name]
    recipe = recipe_for(cls.views, channels=channels, image_size=size)
    assert recipe.startswith(name) and len(RECIPES[recipe]) == cls.num_views
    if channels == 1:
        assert recipe.endswith("-gray")


def test_cmc_view_recipes() -> None:
    assert len(RECIPES["cmc3-gray"]) == 3 and len(set(RECIPES["cmc3-gray"])) == 1
    (lab,) = RECIPES["cmc-lab"]
    assert lab.jitter_p == lab.grayscale_p == lab.blur_p == 0.0


def test_simclr_logs() -> None:
    torch.manual_seed(0)
    method = SimCLR(create_backbone("small_cnn", in_channels=1), projector="16-8")
    out = method([torch.randn(6, 1, 16, 16)] * 2)  # identical views: positives are perfect
    assert out.logs["positive_similarity"].item() == pytest.approx(1.0, abs=1e-6)  # measured 0
    assert out.logs["accuracy"].item() == 1.0
