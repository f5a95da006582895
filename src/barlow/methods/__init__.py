"""The registry of self-supervised methods (one line per method), their parameters and factory.

The registry is the one home of what is known about a method from outside it: its legal
hyper-parameters and their defaults (the keyword arguments of its class, read from the
signature), and how to build it around a backbone. Adding a method = one file in this package,
one line in :data:`METHODS`, and a recipe.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Mapping
from typing import Any

from torch import nn

from barlow.methods.barlow_twins import BarlowTwins
from barlow.methods.base import Method, StepOutput
from barlow.methods.byol import BYOL
from barlow.methods.cmc import CMC
from barlow.methods.moco import MoCo
from barlow.methods.simclr import SimCLR
from barlow.methods.simsiam import SimSiam
from barlow.methods.vicreg import VICReg

METHODS: dict[str, type[Method]] = {
    "barlow_twins": BarlowTwins,
    "byol": BYOL,
    "cmc": CMC,
    "moco": MoCo,
    "simclr": SimCLR,
    "simsiam": SimSiam,
    "vicreg": VICReg,
}


def method_class(name: str) -> type[Method]:
    """``METHODS[name]``, or a ValueError naming the closest registered method."""
    if name not in METHODS:
        match = difflib.get_close_matches(name, list(METHODS), n=1, cutoff=0.5)
        hint = f"; did you mean {match[0]!r}?" if match else ""
        raise ValueError(f"unknown method {name!r}{hint} (valid: {', '.join(METHODS)})")
    return METHODS[name]


def method_parameters(name: str) -> dict[str, inspect.Parameter]:
    """The legal ``[method]`` keys: keyword arguments of the method class after ``backbone``."""
    # signature of the class, not of __init__: binds self, and mypy accepts it
    params = inspect.signature(method_class(name)).parameters
    return {k: p for k, p in params.items() if k != "backbone"}


def method_defaults(name: str) -> dict[str, Any]:
    """The method's hyper-parameters that have a default, with it (the paper's values)."""
    return {
        key: p.default
        for key, p in method_parameters(name).items()
        if p.default is not inspect.Parameter.empty
    }


def resolved_params(name: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """``params`` with the method's defaults filled in for the keys left out."""
    return {**method_defaults(name), **params}


def create_method(name: str, params: Mapping[str, Any], backbone: nn.Module) -> Method:
    """The method ``name`` with hyper-parameters ``params`` around ``backbone``."""
    return method_class(name)(backbone, **params)


__all__ = [
    "BYOL",
    "CMC",
    "METHODS",
    "BarlowTwins",
    "Method",
    "MoCo",
    "SimCLR",
    "SimSiam",
    "StepOutput",
    "VICReg",
    "create_method",
    "method_class",
    "method_defaults",
    "method_parameters",
    "resolved_params",
]
