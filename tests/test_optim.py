import copy
import itertools
import math

import pytest
import torch
from torch import nn

from barlow.optim import (
    LARS,
    build_optimizer,
    parameter_groups,
    scaled_lr,
    set_learning_rate,
    warmup_cosine,
)


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.Flatten(),
        nn.Linear(4 * 2 * 2, 5),
    )


def reference_lars_step(p, grad, mu, *, lr, wd, momentum, eta, decay, adapt):
    """The Barlow Twins LARS update written out by hand (returns new p and new mu)."""
    if decay:
        grad = grad + wd * p
    if adapt:
        p_norm, g_norm = p.norm().item(), grad.norm().item()
        q = eta * p_norm / g_norm if p_norm > 0 and g_norm > 0 else 1.0
        grad = q * grad
    mu = momentum * mu + grad
    return p - lr * mu, mu


@pytest.mark.parametrize("filters", [True, False])
def test_lars_matches_hand_written_update_over_three_steps(filters):
    gen = torch.Generator().manual_seed(1)
    weight = nn.Parameter(torch.randn(4, 3, dtype=torch.float64, generator=gen))
    bias = nn.Parameter(torch.randn(4, dtype=torch.float64, generator=gen))
    hyper = {"lr": 0.3, "wd": 0.05, "momentum": 0.9, "eta": 0.02}
    optimizer = LARS(
        [weight, bias],
        lr=hyper["lr"],
        weight_decay=hyper["wd"],
        momentum=hyper["momentum"],
        eta=hyper["eta"],
        weight_decay_filter=filters,
        lars_adaptation_filter=filters,
    )
    expected = {"w": (weight.detach().clone(), 0.0), "b": (bias.detach().clone(), 0.0)}
    for _ in range(3):
        grads = {"w": torch.randn(4, 3, dtype=torch.float64, generator=gen)}
        grads["b"] = torch.randn(4, dtype=torch.float64, generator=gen)
        weight.grad, bias.grad = grads["w"].clone(), grads["b"].clone()
        optimizer.step()
        # the weight is always decayed and adapted; the bias only when the filters are off
        for key, plain in (("w", True), ("b", not filters)):
            p, mu = expected[key]
            expected[key] = reference_lars_step(
                p, grads[key], mu, **hyper, decay=plain, adapt=plain
            )
    # float64 both ways: measured 5.6e-15 relative, 4.7e-17 absolute
    torch.testing.assert_close(weight.detach(), expected["w"][0], rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(bias.detach(), expected["b"][0], rtol=1e-13, atol=1e-15)


def test_official_split_via_build_optimizer():
    model = small_model().double()
    optimizer = build_optimizer(
        "lars", model, lr=0.4, weight_decay=0.1, bias_lr_scale=0.024, momentum=0.9
    )
    before = copy.deepcopy(model)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    for (name, new), old in zip(model.named_parameters(), before.parameters(), strict=True):
        if new.ndim == 1:  # no decay, no adaptation, lr × 0.024
            torch.testing.assert_close(new.detach(), old.detach() - 0.4 * 0.024)
        else:
            g = 1 + 0.1 * old.detach()
            q = 0.001 * old.detach().norm() / g.norm()
            torch.testing.assert_close(new.detach(), old.detach() - 0.4 * q * g, msg=name)


def test_zero_weight_or_zero_grad_gives_trust_ratio_one_and_no_nan():
    zero_weight = nn.Parameter(torch.zeros(3, 3))
    zero_grad = nn.Parameter(torch.ones(3, 3))
    optimizer = LARS([zero_weight, zero_grad], lr=0.5, momentum=0.0, eta=0.001)
    zero_weight.grad = torch.full((3, 3), 2.0)
    zero_grad.grad = torch.zeros(3, 3)
    optimizer.step()
    torch.testing.assert_close(zero_weight.detach(), torch.full((3, 3), -1.0))  # q = 1
    torch.testing.assert_close(zero_grad.detach(), torch.ones(3, 3))
    for state in optimizer.state.values():
        assert torch.isfinite(state["momentum_buffer"]).all()


def test_step_never_reads_tensor_values_on_the_host(monkeypatch):
    model = small_model()
    optimizer = build_optimizer("lars", model, lr=0.1, weight_decay=1e-3)
    model(torch.randn(2, 3, 4, 4)).sum().backward()
    before = [p.detach().clone() for p in model.parameters()]

    def host_sync(*args, **kwargs):
        raise AssertionError("LARS.step synchronised with the device")

    for method in ("item", "tolist", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, method, host_sync)
    optimizer.step()
    optimizer.step()
    monkeypatch.undo()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_skips_parameters_without_gradient():
    used, unused = nn.Parameter(torch.ones(2, 2)), nn.Parameter(torch.ones(2, 2))
    optimizer = LARS([used, unused], lr=1.0)
    used.grad = torch.ones(2, 2)
    optimizer.step()
    assert torch.equal(unused.detach(), torch.ones(2, 2))
    assert unused not in optimizer.state
    assert not torch.equal(used.detach(), torch.ones(2, 2))


def test_closure_is_evaluated_and_returned():
    p = nn.Parameter(torch.ones(2, 2))
    optimizer = LARS([p], lr=0.1)

    def closure():
        optimizer.zero_grad()
        loss = (p**2).sum()
        loss.backward()
        return loss

    loss = optimizer.step(closure)
    assert loss is not None and float(loss.detach()) == 4.0
    assert (p.detach() < 1).all()


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [
        ({"lr": -0.1}, "lr"),
        ({"lr": 0.1, "weight_decay": -1.0}, "weight_decay"),
        ({"lr": 0.1, "momentum": 1.0}, "momentum"),
        ({"lr": 0.1, "momentum": -0.1}, "momentum"),
        ({"lr": 0.1, "eta": 0.0}, "eta"),
    ],
)
def test_lars_rejects_invalid_hyperparameters(kwargs, word):
    with pytest.raises(ValueError, match=word):
        LARS([nn.Parameter(torch.ones(2))], **kwargs)


def test_lars_validates_per_group_overrides_and_accepts_zero_lr():
    LARS([nn.Parameter(torch.ones(2))], lr=0.0)
    with pytest.raises(ValueError, match="momentum"):
        LARS([{"params": [nn.Parameter(torch.ones(2))], "momentum": 1.5}], lr=0.1)


def test_per_group_filter_override():
    weight = nn.Parameter(torch.ones(2))  # 1-D, so excluded unless its group turns the filter off
    other = nn.Parameter(torch.ones(2))
    optimizer = LARS(
        [{"params": [weight], "weight_decay_filter": False}, {"params": [other]}],
        lr=1.0,
        weight_decay=0.5,
        momentum=0.0,
    )
    weight.grad, other.grad = torch.zeros(2), torch.zeros(2)
    optimizer.step()
    torch.testing.assert_close(weight.detach(), torch.full((2,), 0.5))  # decayed: 1 − 1·0.5
    torch.testing.assert_close(other.detach(), torch.ones(2))  # filtered out


def test_parameter_groups_split_weights_from_biases_and_norm():
    model = small_model()
    model[0].bias.requires_grad_(False)  # frozen parameters are left out
    groups = parameter_groups(model, weight_decay=1e-6, bias_lr_scale=0.024)
    by_name = {group["name"]: group for group in groups}
    assert list(by_name) == ["weights", "biases"]
    ids = {name: {id(p) for p in group["params"]} for name, group in by_name.items()}
    assert ids["weights"] == {id(model[0].weight), id(model[3].weight)}
    assert ids["biases"] == {id(model[1].weight), id(model[1].bias), id(model[3].bias)}
    assert by_name["weights"]["weight_decay"] == 1e-6 and by_name["weights"]["lr_scale"] == 1.0
    assert by_name["biases"]["weight_decay"] == 0.0 and by_name["biases"]["lr_scale"] == 0.024


def test_parameter_groups_omits_empty_groups_and_validates():
    groups = parameter_groups(nn.Linear(3, 3, bias=False), weight_decay=0.0)
    assert [group["name"] for group in groups] == ["weights"]
    with pytest.raises(ValueError, match="weight_decay"):
        parameter_groups(nn.Linear(3, 3), weight_decay=-1.0)
    with pytest.raises(ValueError, match="bias_lr_scale"):
        parameter_groups(nn.Linear(3, 3), weight_decay=0.0, bias_lr_scale=-1.0)


@pytest.mark.parametrize(
    ("name", "cls"),
    [("lars", LARS), ("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW)],
)
def test_build_optimizer_uses_the_same_groups(name, cls):
    model = small_model()
    optimizer = build_optimizer(name, model, lr=0.2, weight_decay=1e-4, bias_lr_scale=0.5)
    assert isinstance(optimizer, cls)
    expected = parameter_groups(model, weight_decay=1e-4, bias_lr_scale=0.5)
    assert len(optimizer.param_groups) == len(expected) == 2
    for group, reference in zip(optimizer.param_groups, expected, strict=True):
        assert group["name"] == reference["name"]
        assert [id(p) for p in group["params"]] == [id(p) for p in reference["params"]]
        assert group["weight_decay"] == reference["weight_decay"]
        assert group["lr"] == pytest.approx(0.2 * reference["lr_scale"])


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_sgd_and_adamw_are_fused_and_update_as_the_plain_kernels(name):
    """fused=True on CPU/CUDA parameters; three steps equal PyTorch's unfused update.

    No BatchNorm here: a bias before BN has a gradient of pure rounding noise, which Adam's
    normalisation turns into lr-sized steps that differ between any two kernels.
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 6), nn.ReLU(), nn.Linear(6, 3))
    optimizer = build_optimizer(name, model, lr=0.1, weight_decay=1e-3, bias_lr_scale=0.5)
    assert all(group["fused"] for group in optimizer.param_groups)
    reference_model = copy.deepcopy(model)
    groups = parameter_groups(reference_model, weight_decay=1e-3, bias_lr_scale=0.5)
    cls = torch.optim.SGD if name == "sgd" else torch.optim.AdamW
    extra = {"momentum": 0.9} if name == "sgd" else {}
    reference = cls(groups, lr=0.1, fused=False, foreach=False, **extra)
    set_learning_rate(reference, 0.1)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = torch.randn(4, 3, 4, 4, generator=gen)
        for m, opt in ((model, optimizer), (reference_model, reference)):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
    for a, b in zip(model.parameters(), reference_model.parameters(), strict=True):
        # three steps of two kernels: measured 8.9e-8 absolute (near-zero weights, where the
        # relative error is meaningless) on weights of ~0.3
        torch.testing.assert_close(a, b, rtol=1e-6, atol=5e-7)


def test_parameters_off_cpu_and_cuda_are_not_fused():
    model = small_model().to("meta")
    optimizer = build_optimizer("sgd", model, lr=0.1, weight_decay=0.0)
    assert not any(group["fused"] for group in optimizer.param_groups)


def test_build_optimizer_errors():
    with pytest.raises(ValueError, match="lars, sgd, adamw"):
        build_optimizer("adam", small_model(), lr=0.1, weight_decay=0.0)  # type: ignore[arg-type]
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer("lars", frozen, lr=0.1, weight_decay=0.0)


@pytest.mark.parametrize("name", ["lars", "sgd", "adamw"])
def test_optimizer_state_dict_round_trip(name):
    def train(model, optimizer, steps, seed):
        gen = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            optimizer.zero_grad()
            model(torch.randn(4, 3, 4, 4, generator=gen)).square().mean().backward()
            optimizer.step()

    model = small_model()
    optimizer = build_optimizer(name, model, lr=0.1, weight_decay=1e-3, bias_lr_scale=0.1)
    train(model, optimizer, steps=2, seed=0)
    resumed_model = copy.deepcopy(model)
    resumed = build_optimizer(name, resumed_model, lr=0.0, weight_decay=1e-3, bias_lr_scale=0.1)
    resumed.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    assert resumed.param_groups[1]["lr"] == optimizer.param_groups[1]["lr"]
    train(model, optimizer, steps=2, seed=1)
    train(resumed_model, resumed, steps=2, seed=1)
    for a, b in zip(model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_warmup_cosine_shape():
    kwargs = {"total_steps": 100, "warmup_steps": 10, "base_lr": 2.0, "final_lr_ratio": 0.001}
    lrs = [warmup_cosine(step, **kwargs) for step in range(101)]
    assert lrs[0] == 0.0
    assert lrs[5] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(2.0)
    assert all(a < b for a, b in itertools.pairwise(lrs[:11]))
    assert all(a > b for a, b in itertools.pairwise(lrs[10:]))
    assert lrs[100] == pytest.approx(0.002)
    midpoint = 0.002 + (2.0 - 0.002) / 2  # cosine halfway through the decay
    assert lrs[55] == pytest.approx(midpoint)


def test_warmup_cosine_without_warmup_and_all_warmup():
    assert warmup_cosine(0, total_steps=10, warmup_steps=0, base_lr=1.0) == 1.0
    assert warmup_cosine(10, total_steps=10, warmup_steps=10, base_lr=1.0) == pytest.approx(0.001)


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [
        ({"step": 0, "total_steps": 0, "warmup_steps": 0}, "total_steps"),
        ({"step": 0, "total_steps": 10, "warmup_steps": 11}, "warmup_steps"),
        ({"step": 11, "total_steps": 10, "warmup_steps": 1}, "step"),
        ({"step": -1, "total_steps": 10, "warmup_steps": 1}, "step"),
        ({"step": 1, "total_steps": 10, "warmup_steps": 1, "base_lr": -1.0}, "base_lr"),
        ({"step": 1, "total_steps": 10, "warmup_steps": 1, "final_lr_ratio": 2.0}, "final_lr"),
    ],
)
def test_warmup_cosine_rejects_invalid_arguments(kwargs, word):
    kwargs = {"base_lr": 1.0, **kwargs}
    step = kwargs.pop("step")
    with pytest.raises(ValueError, match=word):
        warmup_cosine(step, **kwargs)


def test_set_learning_rate_applies_group_scales():
    a, b = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([{"params": [a], "lr_scale": 0.5}, {"params": [b]}], lr=1.0)
    set_learning_rate(optimizer, 0.4)
    assert [group["lr"] for group in optimizer.param_groups] == [0.2, 0.4]
    with pytest.raises(ValueError, match="learning rate"):
        set_learning_rate(optimizer, -1.0)


def test_scaled_lr_linear_rule():
    assert scaled_lr(0.2, 2048) == pytest.approx(1.6)
    assert math.isclose(scaled_lr(0.0048, 256), 0.0048)
    with pytest.raises(ValueError, match="global_batch_size"):
        scaled_lr(0.2, 0)
