"""Pure-Python reference computations the contrastive tests compare the library against."""

from __future__ import annotations

import itertools
import math

from torch import Tensor


def unit(x: Tensor) -> Tensor:
    return x / x.norm(dim=1, keepdim=True)


def naive_cross_view(a: Tensor, b: Tensor, t: float) -> float:
    """mean_n −log softmax over the other view's images, anchor a_n, positive b_n."""
    ua, ub = unit(a).double(), unit(b).double()
    total = 0.0
    for n in range(a.shape[0]):
        logits = [float(ua[n] @ ub[m]) / t for m in range(b.shape[0])]
        total += -math.log(math.exp(logits[n]) / sum(math.exp(x) for x in logits))
    return total / a.shape[0]


def naive_full_graph(zs: list[Tensor], t: float) -> float:
    return sum(
        naive_cross_view(zs[i], zs[j], t) + naive_cross_view(zs[j], zs[i], t)
        for i, j in itertools.combinations(range(len(zs)), 2)
    )
