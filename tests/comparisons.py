"""How the tests compare tensors: relative errors where results agree to rounding (one process
against several), bit-identity of state dicts where they must be exact (resume, skipped steps).

A non-finite value never passes: :func:`rel_err` is inf when either side holds a NaN or an inf,
and :func:`worst` is inf when any error is NaN (Python's ``max()`` skips a NaN unless it comes
first, so a NaN gradient would otherwise score 0 and pass a ``< bound`` check).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor


def rel_err(actual: Tensor, expected: Tensor) -> float:
    """‖actual − expected‖ / ‖expected‖, in float64; inf when either holds a NaN or an inf, or
    when ``expected`` is zero and ``actual`` is not. The shapes must match (no broadcasting)."""
    assert actual.shape == expected.shape, f"shapes differ: {actual.shape} vs {expected.shape}"
    a, e = actual.detach().double(), expected.detach().double()
    if not (torch.isfinite(a).all() and torch.isfinite(e).all()):
        return math.inf
    difference, norm = float((a - e).norm()), float(e.norm())
    if norm == 0.0:
        return 0.0 if difference == 0.0 else math.inf
    return difference / norm


def worst(errors: Iterable[float]) -> float:
    """The largest error; inf if any is NaN or there is none (nothing compared is no pass)."""
    errors = list(errors)
    if not errors or any(math.isnan(e) for e in errors):
        return math.inf
    return max(errors)


def rel_errs(result: Mapping[str, Tensor], reference: Mapping[str, Tensor]) -> dict[str, float]:
    """:func:`rel_err` of each named tensor; both hold the same names."""
    assert result.keys() == reference.keys(), sorted(result.keys() ^ reference.keys())
    return {k: rel_err(result[k], reference[k]) for k in reference}


def max_rel_err(result: Mapping[str, Tensor], reference: Mapping[str, Tensor]) -> float:
    """The worst :func:`rel_err` over the named tensors; both hold the same names."""
    return worst(rel_errs(result, reference).values())


def differing(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> list[str]:
    """The names whose tensors are not bit-identical (``torch.equal``); both hold the same
    names."""
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


def same(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> bool:
    """The same names, and every tensor bit-identical."""
    return a.keys() == b.keys() and not differing(a, b)


def assert_identical(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> None:
    different = differing(a, b)
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
