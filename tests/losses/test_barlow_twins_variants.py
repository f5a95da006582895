"""The Barlow Twins paper's ablations (Zbontar et al. 2021, §4, Tables 5 and 6) in one process:
each loss variant on every computation path against its formula written out in float64, the
defaults unchanged, bad values refused, and the method's architecture options (``projector_bn``,
``predictor``, ``stop_gradient``) down to the CLI's ``--set``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from barlow.cli import main
from barlow.config import load_config
from barlow.heads import mlp
from barlow.losses import barlow_twins_loss
from barlow.methods import BarlowTwins
from comparisons import rel_err
from runs import FAST, records, sets

LAMBD = 0.0051
ALL_PATHS = ("correlation", "gram", "reduce_c", "sharded_gram", "auto")
MATRIX_PATHS = ("correlation", "reduce_c", "auto")  # the paths that form C: a temperature's
VARIANTS: dict[str, dict[str, Any]] = {
    "invariance": {"terms": "invariance"},
    "redundancy": {"terms": "redundancy"},
    "feature": {"normalize": "feature"},
    "none": {"normalize": "none"},
    "redundancy+none": {"terms": "redundancy", "normalize": "none"},
    "temperature": {"temperature": 0.5},
    "temperature+feature": {"temperature": 0.1, "normalize": "feature"},
    "temperature+invariance": {"temperature": 0.2, "terms": "invariance"},
}


def reference(
    z1: Tensor,
    z2: Tensor,
    *,
    terms: str = "both",
    normalize: str = "batch",
    temperature: float | None = None,
    clamp: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, on_diag, off_diag) in float64 with a plain D×D matrix C and a boolean mask.

    batch: (z − mean) / sqrt(var + 1e-5), biased var; feature: then each row times √D / its norm;
    none: z − mean. C = AᵀB / N. Temperature τ (the paper's §4 formula):
    on = −log Σ_i exp(C_ii/τ), off = log Σ_{i≠j} exp(max(C_ij, 0)/τ); else on = Σ (1 − C_ii)²,
    off = Σ_{i≠j} C_ij². ``clamp=False`` leaves out the max(·, 0), for a negative control.
    """
    a, b = z1.double(), z2.double()
    n, d = a.shape
    a, b = a - a.mean(dim=0), b - b.mean(dim=0)
    if normalize != "none":
        a = a / torch.sqrt((a**2).mean(dim=0) + 1e-5)
        b = b / torch.sqrt((b**2).mean(dim=0) + 1e-5)
    if normalize == "feature":
        a = a / a.norm(dim=1, keepdim=True) * d**0.5
        b = b / b.norm(dim=1, keepdim=True) * d**0.5
    c = a.T @ b / n
    off_mask = ~torch.eye(d, dtype=torch.bool)
    if temperature is None:
        on, off = ((1 - c.diagonal()) ** 2).sum(), (c[off_mask] ** 2).sum()
    else:
        positive = c[off_mask].clamp(min=0) if clamp else c[off_mask]
        on = -torch.log(torch.exp(c.diagonal() / temperature).sum())
        off = torch.log(torch.exp(positive / temperature).sum())
    loss = {"both": on + LAMBD * off, "invariance": on, "redundancy": LAMBD * off}[terms]
    return loss, on, off


def correlated_views(n: int, d: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    z1 = torch.randn(n, d, generator=gen) * 3 + 1
    z2 = 0.7 * z1 + torch.randn(n, d, generator=gen)
    return z1, z2


def loss_and_grads(z1: Tensor, z2: Tensor, **kwargs: Any) -> list[Tensor]:
    a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    out = barlow_twins_loss(a, b, LAMBD, **kwargs)
    out.loss.backward()
    return [*(t.detach() for t in out), torch.as_tensor(a.grad), torch.as_tensor(b.grad)]


def reference_and_grads(z1: Tensor, z2: Tensor, **kwargs: Any) -> list[Tensor]:
    a, b = z1.double().requires_grad_(), z2.double().requires_grad_()
    out = reference(a, b, **kwargs)
    grads = torch.autograd.grad(out[0], (a, b))
    return [*(t.detach() for t in out), *grads]


def paths_of(variant: dict[str, Any]) -> tuple[str, ...]:
    return MATRIX_PATHS if variant.get("temperature") is not None else ALL_PATHS


@pytest.mark.parametrize(("n", "d"), [(32, 24), (12, 40)])  # N > D ("auto": C), N < D (Gram)
@pytest.mark.parametrize("name", VARIANTS)
def test_variant_matches_its_formula_on_every_path(name: str, n: int, d: int) -> None:
    variant = VARIANTS[name]
    z1, z2 = correlated_views(n, d)
    expected = reference_and_grads(z1, z2, **variant)
    for path in paths_of(variant):
        actual = loss_and_grads(z1, z2, path=path, **variant)
        labels = ("loss", "on_diag", "off_diag", "grad z1", "grad z2")
        for label, value, want in zip(labels, actual, expected, strict=True):
            assert value.dtype == torch.float32
            # float32 against float64: measured at most 1.5e-6 (feature, on_diag)
            assert rel_err(value, want) < 1e-5, (path, label)


@pytest.mark.parametrize("name", VARIANTS)
def test_the_variant_changes_the_loss(name: str) -> None:
    # Control: each variant's formula differs from the default's, so the test above tells them
    # apart; and the temperature's max(C_ij, 0) matters on this data.
    z1, z2 = correlated_views(32, 24)
    assert rel_err(reference(z1, z2, **VARIANTS[name])[0], reference(z1, z2)[0]) > 1e-2
    t = VARIANTS["temperature"]["temperature"]
    unclamped = reference(z1, z2, temperature=t, clamp=False)[2]
    assert rel_err(unclamped, reference(z1, z2, temperature=t)[2]) > 1e-3


@pytest.mark.parametrize("path", ALL_PATHS)
def test_defaults_are_the_paper_loss_bit_for_bit(path: str) -> None:
    z1, z2 = correlated_views(20, 24)
    plain = loss_and_grads(z1, z2, path=path)
    explicit = loss_and_grads(z1, z2, path=path, terms="both", normalize="batch", temperature=None)
    assert all(torch.equal(a, b) for a, b in zip(plain, explicit, strict=True))
    for value, want in zip(plain, reference_and_grads(z1, z2), strict=True):
        assert rel_err(value, want) < 1e-5  # measured 4.3e-7


def test_feature_normalization_keeps_the_scale_of_the_correlation() -> None:
    # Rows of equal norm after standardisation (a ± pattern): the sphere of radius √D changes
    # nothing, so "feature" gives the default loss.
    signs = torch.tensor([[1.0, -1.0, 1.0, -1.0], [-1.0, 1.0, -1.0, 1.0]]).repeat(8, 1)
    z = signs * torch.tensor([1.0, 2.0, 3.0, 4.0]) + 5
    feature = barlow_twins_loss(z, z.flip(1), normalize="feature")
    batch = barlow_twins_loss(z, z.flip(1))
    # Not bit-exact: eps = 1e-5 leaves standardised rows of norm² D·var/(var + eps), not D
    # (measured 3.7e-6); a radius of 1 instead of √D would be off by a factor of ~D.
    assert rel_err(feature.loss, batch.loss) < 1e-4


def test_none_is_a_covariance_centred_but_not_scaled() -> None:
    z1, z2 = correlated_views(32, 8)
    base = barlow_twins_loss(z1, z2, normalize="none")
    shifted = barlow_twins_loss(z1 + 7, z2 - 3, normalize="none")
    assert rel_err(shifted.loss, base.loss) < 1e-5  # centred: shifts do not matter
    scaled = barlow_twins_loss(2 * z1, z2, normalize="none")
    assert rel_err(scaled.off_diag, 4 * base.off_diag) < 1e-5  # not scaled: C doubles


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"terms": "on_diag"}, r"unknown terms='on_diag'; choose one of both, invariance, redun"),
        ({"normalize": "layer"}, r"unknown normalize='layer'; choose one of batch, feature, none"),
        ({"temperature": 0.0}, r"temperature must be a finite number > 0.*got 0.0"),
        ({"temperature": -0.1}, r"temperature must be a finite number > 0"),
        ({"temperature": float("nan")}, r"temperature must be a finite number > 0"),
        ({"temperature": float("inf")}, r"temperature must be a finite number > 0"),
        ({"temperature": True}, r"temperature must be a finite number > 0"),
        (
            {"temperature": 0.1, "path": "gram"},
            r"path='gram' never forms; use path='auto', 'correlation' or 'reduce_c'",
        ),
        ({"temperature": 0.1, "path": "sharded_gram"}, r"path='sharded_gram' never forms"),
    ],
)
def test_bad_loss_options_are_refused(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        barlow_twins_loss(torch.randn(8, 4), torch.randn(8, 4), **kwargs)


# --- the method: projector_bn, predictor, stop_gradient ---


class TinyBackbone(nn.Module):
    """(B, 6) → (B, 10): a stand-in for an image encoder."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 10), nn.ReLU())
        self.num_features = 10

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.net(x)
        return out


def method(**kwargs: Any) -> BarlowTwins:
    torch.manual_seed(0)
    return BarlowTwins(TinyBackbone(), projector="16-12", **kwargs)


def views(n: int = 16) -> list[Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, 6, generator=gen)
    return [x, x + 0.3 * torch.randn(n, 6, generator=gen)]


def test_projector_bn_false_has_no_batchnorm() -> None:
    plain = method(projector_bn=False, predictor="20-12")
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in plain.modules())
    kinds = [type(layer) for layer in plain.projector]
    assert kinds == [nn.Linear, nn.ReLU, nn.Linear]
    assert plain.projector[0].bias is not None  # the shift BatchNorm gave
    assert plain.projector[-1].bias is None
    # The default keeps BatchNorm, in both heads.
    default = method(predictor="20-12")
    assert [type(m) for m in default.projector] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert isinstance(default.predictor[1], nn.BatchNorm1d)
    assert [type(m) for m in mlp(4, "8-8-3", batch_norm=False)] == [nn.Linear, nn.ReLU] * 2 + [
        nn.Linear
    ]


def test_predictor_is_on_branch_a_only() -> None:
    bt = method(predictor="20-12")
    assert bt.predictor is not None and bt.predictor[-1].bias is not None
    seen: list[Tensor] = []
    bt.predictor.register_forward_hook(lambda _m, inputs, _out: seen.append(inputs[0]))
    x1, x2 = views()
    out = bt([x1, x2])
    assert len(seen) == 1  # once per step: branch A only
    with torch.no_grad():
        z1, z2 = bt.projector(bt.backbone(x1)), bt.projector(bt.backbone(x2))
        assert torch.equal(seen[0], z1)
        expected = barlow_twins_loss(bt.predictor(z1), z2)
    assert torch.equal(out.loss.detach(), expected.loss)
    assert set(out.logs) == {"on_diag", "off_diag"}


@pytest.mark.parametrize("predictor", [None, "20-12"])
def test_stop_gradient_sends_nothing_back_through_branch_b(predictor: str | None) -> None:
    x1, x2 = (x.clone().requires_grad_() for x in views())
    bt = method(stop_gradient=True, predictor=predictor)
    loss = bt([x1, x2]).loss
    loss.backward()
    assert x2.grad is None  # nothing of branch B is on the graph
    assert x1.grad is not None and x1.grad.abs().sum() > 0
    # The value is the symmetric network's; only the gradient changes.
    both = method(predictor=predictor)
    assert torch.equal(both([x1, x2]).loss.detach(), loss.detach())


def test_method_gradients_with_both_asymmetries_match_the_formula() -> None:
    x1, x2 = views()
    bt = method(stop_gradient=True, predictor="20-12", normalize="feature", temperature=0.3)
    bt([x1, x2]).loss.backward()
    actual = {n: torch.as_tensor(p.grad) for n, p in bt.named_parameters()}
    ref = method(stop_gradient=True, predictor="20-12").double()
    assert ref.predictor is not None
    z1 = ref.predictor(ref.projector(ref.backbone(x1.double())))
    z2 = ref.projector(ref.backbone(x2.double())).detach()
    loss = reference(z1, z2, normalize="feature", temperature=0.3)[0]
    names, params = zip(*ref.named_parameters(), strict=True)
    expected = dict(zip(names, torch.autograd.grad(loss, params), strict=True))
    # The predictor's last bias: 0 in theory (the loss centres along the batch), rounding here.
    last_bias = "predictor.3.bias"
    assert actual.pop(last_bias).abs().max() < 1e-6
    expected.pop(last_bias)
    for name, grad in expected.items():
        assert rel_err(actual[name], grad) < 1e-5, name  # measured 5.9e-7


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"terms": "both_terms"}, r"unknown terms='both_terms'; choose one of both, invariance"),
        ({"normalize": "l2"}, r"unknown normalize='l2'; choose one of batch, feature, none"),
        ({"temperature": -1.0}, r"temperature must be a finite number > 0"),
        ({"temperature": 0.1, "loss_path": "gram"}, r"loss_path='gram' never forms; use loss_p"),
        ({"predictor": "20-x"}, r"predictor: invalid layer spec '20-x'"),
        ({"predictor": "20-8"}, r"predictor='20-8' ends at width 8.*projector's \(12\).*'12-12'"),
    ],
)
def test_bad_method_options_are_refused(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        method(**kwargs)


def test_temperature_preflight_names_the_d_by_d_matrix() -> None:
    # "auto" would pick the Gram path for N = 4 < D = 12; a temperature needs C.
    assert method().largest_loss_matrix(4, 1)[0] == "N×N Gram matrix"
    assert method(temperature=0.1).largest_loss_matrix(4, 1) == (
        "D×D matrix (correlation path)",
        (12, 12),
    )


# --- the configuration and the command line ---

OPTIONS = [
    ("method.terms=invariance", "terms", "invariance"),
    ("method.terms=redundancy", "terms", "redundancy"),
    ("method.normalize=feature", "normalize", "feature"),
    ("method.normalize=none", "normalize", "none"),
    ("method.projector_bn=false", "projector_bn", False),
    ("method.temperature=0.1", "temperature", 0.1),
    ("method.stop_gradient=true", "stop_gradient", True),
    ("method.predictor=1024-1024", "predictor", "1024-1024"),
]


@pytest.mark.parametrize(("override", "key", "value"), OPTIONS)
def test_set_overrides_reach_the_method(override: str, key: str, value: Any) -> None:
    cfg = load_config("digits", [override])
    assert cfg.method.params[key] == value


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("method.normalize=layer", r"method.normalize must be one of 'batch', 'feature', 'none'"),
        ("method.terms=all", r"method.terms must be one of 'both', 'invariance', 'redundancy'"),
        ("method.predictor=1024-x", r"method.predictor: invalid layer spec"),
        ("method.stop_gradient=1", r"method.stop_gradient must be true or false"),
    ],
)
def test_bad_overrides_are_refused_by_the_config(override: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        load_config("digits", [override])


def test_pretrain_accepts_every_option_from_the_command_line(tmp_path: Path) -> None:
    # `barlow pretrain digits --epochs 1 --set method.<option>=...`, two steps, every option.
    # Every option at once (of terms and normalize one value each): they combine.
    keep = ("terms=redundancy", "normalize=feature", "projector_bn", "temperature", "stop_grad")
    options = [o for o, _, _ in OPTIONS if any(k in o for k in keep)]
    args = sets(*FAST, "train.max_steps=2", "train.log_every=1", *options, "method.predictor=16-16")
    out = tmp_path / "run"
    assert main(["pretrain", "digits", "--out", str(out), "--epochs", "1", "--quiet", *args]) == 0
    steps = records(out, "train")
    assert len(steps) == 2
    assert all({"loss", "on_diag", "off_diag"} <= r.keys() for r in steps)
