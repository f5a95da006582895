"""Projector MLPs from spec strings, their parameter count, and the EMA machinery."""

import copy
import itertools

import pytest
import torch
from torch import nn

from barlow.heads import mlp, mlp_num_parameters, parse_spec
from barlow.methods.momentum import ema_update, momentum_schedule


@pytest.mark.parametrize(
    ("spec", "widths"),
    [("8192-8192-8192", [8192, 8192, 8192]), ("2048-128", [2048, 128]), ("64", [64])],
)
def test_parse_spec_reads_widths(spec: str, widths: list[int]) -> None:
    assert parse_spec(spec) == widths


@pytest.mark.parametrize(
    "spec", ["8192-abc", "", "0-5", "-5", "5-", "8192--8192", "2.5-3", "8192-²", "1e3"]
)
def test_parse_spec_rejects_and_names_the_bad_spec(spec: str) -> None:
    with pytest.raises(ValueError, match="invalid layer spec") as info:
        parse_spec(spec)
    assert repr(spec) in str(info.value)


def test_mlp_is_bias_free_linear_bn_relu_blocks() -> None:
    head = mlp(16, "32-24-8")
    kinds = [type(layer) for layer in head]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU] * 2 + [nn.Linear]
    linears = [layer for layer in head if isinstance(layer, nn.Linear)]
    assert [(lin.in_features, lin.out_features) for lin in linears] == [(16, 32), (32, 24), (24, 8)]
    assert all(lin.bias is None for lin in linears)
    assert [bn.num_features for bn in head if isinstance(bn, nn.BatchNorm1d)] == [32, 24]
    assert head(torch.randn(4, 16)).shape == (4, 8)


def test_single_width_spec_is_one_linear_layer() -> None:
    head = mlp(16, "8")
    assert len(head) == 1 and isinstance(head[0], nn.Linear) and head[0].bias is None


def test_mlp_options_add_a_last_bias_or_batchnorm() -> None:
    head = mlp(16, "32-8", bias=True, last_bn=True)
    assert head[-2].bias is not None
    assert isinstance(head[-1], nn.BatchNorm1d) and not head[-1].affine


@pytest.mark.parametrize(("in_dim", "spec"), [(16, "8"), (16, "32-8"), (512, "64-64-32")])
def test_mlp_num_parameters_counts_the_built_module(in_dim: int, spec: str) -> None:
    built = sum(p.numel() for p in mlp(in_dim, spec).parameters())
    assert mlp_num_parameters(in_dim, spec) == built


def test_paper_projector_on_resnet50_has_about_151m_parameters() -> None:
    # 2048·8192 + 8192·8192 + 8192·8192 weights, plus BN scale and shift on two hidden layers
    expected = 2048 * 8192 + 2 * 8192 * 8192 + 2 * 2 * 8192
    assert mlp_num_parameters(2048, "8192-8192-8192") == expected
    assert round(expected / 1e6) == 151


def test_momentum_schedule_goes_from_base_to_one_monotonically() -> None:
    assert momentum_schedule(0.0) == pytest.approx(0.996)
    assert momentum_schedule(1.0) == pytest.approx(1.0)
    assert momentum_schedule(0.5) == pytest.approx(0.998)
    # cosine, not linear: τ(¼) = 1 − 0.004·(cos(π/4) + 1)/2
    assert momentum_schedule(0.25) == pytest.approx(1 - 0.004 * (2**-0.5 + 1) / 2)
    values = [momentum_schedule(i / 100) for i in range(101)]
    assert all(a < b for a, b in itertools.pairwise(values))
    # clamped outside [0, 1]
    assert momentum_schedule(-1.0) == momentum_schedule(0.0)
    assert momentum_schedule(2.0) == momentum_schedule(1.0)


def test_momentum_schedule_other_endpoints() -> None:
    assert momentum_schedule(0.0, base=0.99, final=0.999) == pytest.approx(0.99)
    assert momentum_schedule(1.0, base=0.99, final=0.999) == pytest.approx(0.999)


def small_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))
    with torch.no_grad():
        for p in net.parameters():  # BN starts at ones / zeros in every network alike
            p.normal_()
    net.train()(torch.randn(8, 5))  # move the BN running statistics away from their init
    return net


def test_ema_update_follows_the_ema_rule_and_copies_buffers() -> None:
    target, online = small_net(0), small_net(1)
    before = copy.deepcopy(target)
    m = 0.9
    ema_update(target, online, m)
    for t, t0, o in zip(target.parameters(), before.parameters(), online.parameters(), strict=True):
        torch.testing.assert_close(t, m * t0 + (1 - m) * o)
        assert not torch.equal(t, t0)
    for tb, ob in zip(target.buffers(), online.buffers(), strict=True):
        assert torch.equal(tb, ob)


def test_ema_update_endpoints() -> None:
    target, online = small_net(0), small_net(1)
    before = copy.deepcopy(target)
    ema_update(target, online, 1.0)  # momentum 1: parameters frozen
    for t, t0 in zip(target.parameters(), before.parameters(), strict=True):
        assert torch.equal(t, t0)
    ema_update(target, online, 0.0)  # momentum 0: a copy of the online network
    for t, o in zip(target.parameters(), online.parameters(), strict=True):
        assert torch.equal(t, o)


def test_ema_update_does_not_touch_the_online_network_or_build_a_graph() -> None:
    target, online = small_net(0), small_net(1)
    online_before = copy.deepcopy(online)
    ema_update(target, online, 0.5)
    for o, o0 in zip(online.parameters(), online_before.parameters(), strict=True):
        assert torch.equal(o, o0)
    assert all(t.grad_fn is None for t in target.parameters())
