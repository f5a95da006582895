"""Projector MLPs from spec strings and their parameter count."""

import pytest
import torch
from torch import nn

from barlow.heads import mlp, mlp_num_parameters, parse_spec


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
