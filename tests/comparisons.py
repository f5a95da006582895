"""How the tests compare tensors: relative errors where results agree to rounding (one process
against several), bit-identity of state dicts where they must be exact (resume, skipped steps)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor


def rel_err(actual: Tensor, expected: Tensor) -> float:
    """‖actual − expected‖ / ‖expected‖, in float64."""
    return float((actual.double() - expected.double()).norm() / expected.double().norm())


def max_rel_err(result: Mapping[str, Tensor], reference: Mapping[str, Tensor]) -> float:
    """The worst :func:`rel_err` over the named tensors; both hold the same names."""
    assert result.keys() == reference.keys()
    return max(rel_err(result[k], reference[k]) for k in reference)


def differing(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> list[str]:
    """The names whose tensors are not bit-identical (``torch.equal``); both hold the same names."""
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


def same(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> bool:
    """The same names, and every tensor bit-identical."""
    return a.keys() == b.keys() and not differing(a, b)


def assert_identical(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> None:
    different = differing(a, b)
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
