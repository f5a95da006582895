"""The tests' own comparison helpers (tests/comparisons.py): a non-finite value anywhere fails.

The distributed tests assert ``max_rel_err(result, reference) < 1e-5``. Taking Python's ``max()``
over per-name errors skipped a NaN unless it came first (``max(0.0, nan)`` is 0.0), so a result
whose gradient held a NaN scored 0.0 and passed. The old helper is kept here as the negative
case: it passes the poisoned results below, the current one fails every one of them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import pytest
import torch
from torch import Tensor

from comparisons import max_rel_err, rel_err, worst

NAMES = ("loss", "grad/w", "grad/b")
BAD = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}
Helper = Callable[[Mapping[str, Tensor], Mapping[str, Tensor]], float]


def max_rel_err_before(result: Mapping[str, Tensor], reference: Mapping[str, Tensor]) -> float:
    """The helper as it was: max() over the raw per-name errors."""
    return max(
        float((result[k].double() - reference[k].double()).norm() / reference[k].double().norm())
        for k in reference
    )


HELPERS: dict[str, tuple[Helper, bool]] = {  # name: (helper, whether it catches every case)
    "max_rel_err": (max_rel_err, True),
    "broken: max() over raw errors": (max_rel_err_before, False),
}


def results() -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """A reference and a result within rounding of it (rel. error 1e-7 on every name)."""
    gen = torch.Generator().manual_seed(0)
    reference = {"loss": torch.tensor(2.5), "grad/w": torch.randn(4, 3, generator=gen)}
    reference["grad/b"] = torch.randn(3, generator=gen)
    return {k: v * (1 + 1e-7) for k, v in reference.items()}, reference


@pytest.mark.parametrize("helper", HELPERS)
@pytest.mark.parametrize("bad", BAD)
@pytest.mark.parametrize("side", ["result", "reference"])
@pytest.mark.parametrize("position", NAMES)
def test_a_non_finite_value_in_any_position_fails_the_comparison(
    helper: str, bad: str, side: str, position: str
) -> None:
    function, catches_all = HELPERS[helper]
    result, reference = results()
    poisoned = result if side == "result" else reference
    flat = poisoned[position].clone().view(-1)
    flat[0] = BAD[bad]
    poisoned[position] = flat.view_as(poisoned[position])
    error = function(result, reference)
    if catches_all:
        assert error == math.inf, (error, position)
    else:
        # The bug: a NaN error after the first name is skipped by max() and the result passes;
        # an inf in the reference gives inf / inf = NaN, skipped the same way.
        skipped = position != NAMES[0] and (bad == "nan" or side == "reference")
        assert (error < 1e-5) == skipped, error


def test_a_result_within_rounding_passes() -> None:
    result, reference = results()
    assert 0 < max_rel_err(result, reference) < 2e-7
    assert max_rel_err(reference, reference) == 0.0


def test_rel_err_edge_cases() -> None:
    zero = torch.zeros(3)
    assert rel_err(zero, zero) == 0.0
    assert rel_err(torch.tensor([0.0, 1e-30, 0.0]), zero) == math.inf  # nothing to scale by
    with pytest.raises(AssertionError, match="shapes differ"):
        rel_err(torch.ones(3), torch.ones(1))  # no broadcasting
    assert worst([]) == math.inf  # nothing compared is no pass
    assert worst([1e-9, float("nan"), 1e-8]) == math.inf
    assert worst([1e-9, 3e-8]) == 3e-8
