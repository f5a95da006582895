"""The EMA machinery of target networks: the momentum schedule and the EMA update."""

import copy
import itertools

import pytest
import torch
from torch import nn

from barlow.methods.momentum import ema_update, momentum_schedule


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
        # float32 rounding of the EMA: measured 1.2e-7 absolute, 1.4e-7 relative
        torch.testing.assert_close(t, m * t0 + (1 - m) * o, rtol=2e-6, atol=0)
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
