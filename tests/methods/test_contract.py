"""The method contract, checked for every entry of METHODS (docs/architecture.md, "How to add a
method"): a finite float32 scalar loss with detached scalar logs, a gradient for every trainable
parameter and none for target parameters, which move only in ``after_step``, a state_dict round
trip, backbone features from ``embed``, typed keyword hyper-parameters with defaults."""

from __future__ import annotations

import inspect

import pytest
import torch

from barlow.backbones import create_backbone
from barlow.methods import METHODS, Method, StepOutput


def small_method(name: str) -> Method:
    torch.manual_seed(0)
    cls = METHODS[name]
    kwargs = {}
    if "projector" in inspect.signature(cls.__init__).parameters:
        kwargs["projector"] = "32-32"
    return cls(create_backbone("small_cnn", in_channels=1), **kwargs)


def random_views(method: Method, batch: int = 8) -> list[torch.Tensor]:
    return [torch.randn(batch, 1, 16, 16) for _ in range(method.num_views)]


@pytest.fixture(params=sorted(METHODS))
def method_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_forward_gives_finite_float32_scalar_loss(method_name: str) -> None:
    method = small_method(method_name)
    out = method(random_views(method))
    assert isinstance(out, StepOutput)
    assert out.loss.dtype == torch.float32 and out.loss.ndim == 0
    assert torch.isfinite(out.loss)
    for name, value in out.logs.items():
        assert not value.requires_grad, name
        assert value.ndim == 0, name


def test_every_trainable_parameter_gets_a_gradient(method_name: str) -> None:
    method = small_method(method_name)
    method(random_views(method)).loss.backward()
    for name, p in method.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
            assert p.grad.abs().sum() > 0, f"{name} got an all-zero gradient"
        else:
            assert p.grad is None, f"target parameter {name} must not get a gradient"


def test_target_parameters_move_only_in_after_step(method_name: str) -> None:
    method = small_method(method_name)
    frozen = {n: p.detach().clone() for n, p in method.named_parameters() if not p.requires_grad}
    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.1)
    method(random_views(method)).loss.backward()
    opt.step()
    for name, before in frozen.items():
        assert torch.equal(dict(method.named_parameters())[name], before), name
    method.after_step(0.5)
    for name, before in frozen.items():
        assert not torch.equal(dict(method.named_parameters())[name], before), (
            f"{name} did not move"
        )


def test_state_dict_round_trip_gives_the_same_loss(method_name: str) -> None:
    method, copy = small_method(method_name), small_method(method_name)
    with torch.no_grad():
        for p in copy.parameters():
            p.add_(1.0)  # make sure the load, not the seed, makes them equal
    copy.load_state_dict(method.state_dict())
    views = random_views(method)
    method.eval(), copy.eval()
    assert torch.equal(method(views).loss, copy(views).loss)


def test_embed_gives_backbone_features(method_name: str) -> None:
    method = small_method(method_name)
    h = method.embed(torch.randn(4, 1, 16, 16))
    assert h.shape == (4, method.backbone.num_features)


def test_wrong_number_of_views_is_refused(method_name: str) -> None:
    method = small_method(method_name)
    with pytest.raises(ValueError, match="views"):
        method([torch.randn(4, 1, 16, 16)] * (method.num_views + 1))


def test_hyper_parameters_are_typed_keyword_arguments(method_name: str) -> None:
    params = inspect.signature(METHODS[method_name].__init__).parameters
    for name, p in params.items():
        if name in ("self", "backbone"):
            continue
        assert p.kind is inspect.Parameter.KEYWORD_ONLY, name
        assert p.annotation is not inspect.Parameter.empty, name
        assert p.default is not inspect.Parameter.empty, name


def test_barlow_twins_rejects_negative_lambda() -> None:
    with pytest.raises(ValueError, match="lambd"):
        METHODS["barlow_twins"](create_backbone("small_cnn", in_channels=1), lambd=-1.0)
