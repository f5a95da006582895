"""Projector / predictor MLPs built from spec strings, and the EMA update for target networks."""

from __future__ import annotations

import itertools

from torch import nn


def parse_spec(spec: str) -> list[int]:
    """Parse a layer-width spec such as ``"8192-8192-8192"`` into ``[8192, 8192, 8192]``."""
    parts = spec.split("-") if isinstance(spec, str) else [""]
    widths: list[int] = []
    for part in parts:
        # isdecimal, not isdigit: "²" is a digit that int() refuses
        if not part.strip().isdecimal() or int(part) <= 0:
            raise ValueError(
                f"invalid layer spec {spec!r}: expected positive integers joined by '-', "
                f"e.g. '8192-8192-8192' or '2048-128'"
            )
        widths.append(int(part))
    return widths


def mlp(
    in_dim: int,
    spec: str,
    *,
    last_bn: bool = False,
    bias: bool = False,
    batch_norm: bool = True,
) -> nn.Sequential:
    """The Barlow Twins projector: ``in_dim → w1 → … → wk``.

    Hidden blocks are Linear(bias=False)-BatchNorm1d-ReLU; the last Linear has no bias (Zbontar et
    al., 2021, §2). ``last_bn`` appends a BatchNorm1d (SimCLR/MoCo-style heads); ``bias`` gives the
    last Linear a bias (predictors). ``batch_norm=False`` makes the hidden blocks Linear-ReLU (the
    paper's "No BN in MLP" ablation, Table 5); their Linear then has a bias, the shift BatchNorm
    provided.
    """
    widths = [in_dim, *parse_spec(spec)]
    layers: list[nn.Module] = []
    for d_in, d_out in itertools.pairwise(widths[:-1]):
        if not batch_norm:
            layers += [nn.Linear(d_in, d_out), nn.ReLU(inplace=True)]
            continue
        layers += [nn.Linear(d_in, d_out, bias=False), nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)]
    layers.append(nn.Linear(widths[-2], widths[-1], bias=bias))
    if last_bn:
        layers.append(nn.BatchNorm1d(widths[-1], affine=False))
    return nn.Sequential(*layers)


def mlp_num_parameters(in_dim: int, spec: str) -> int:
    """Parameter count of ``mlp(in_dim, spec)`` without building it (memory preflight)."""
    widths = [in_dim, *parse_spec(spec)]
    linear = sum(a * b for a, b in itertools.pairwise(widths))
    return linear + sum(2 * w for w in widths[1:-1])
