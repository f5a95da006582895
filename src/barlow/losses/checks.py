"""Input checks shared by the loss families, and who owns the NaN/Inf check.

Shape, batch-size and hyper-parameter checks are always on: they read only Python values. The
NaN/Inf check reads every element and costs a device-to-host sync (and, where ranks hold
different data, a small all-reduce); inside :func:`finite_checks_by_caller` the losses skip it
and a non-finite input gives a non-finite loss, which the caller checks once per step.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from barlow import distributed

_FINITE_CHECKS_BY_CALLER: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "barlow_finite_checks_by_caller", default=False
)


@contextlib.contextmanager
def finite_checks_by_caller() -> Iterator[None]:
    """Inside this block the losses skip their NaN/Inf input checks (and the host sync each costs):
    the caller checks the loss itself. A non-finite input then gives a non-finite loss."""
    token = _FINITE_CHECKS_BY_CALLER.set(True)
    try:
        yield
    finally:
        _FINITE_CHECKS_BY_CALLER.reset(token)


def finite_checks_on() -> bool:
    """Whether the losses check their inputs for NaN/Inf: False inside the block above."""
    return not _FINITE_CHECKS_BY_CALLER.get()


def non_finite_flags(tensors: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
    """(len(tensors),) flags of ``dtype``, 1 where a tensor holds a NaN or Inf.

    All 0 without reading the tensors inside :func:`finite_checks_by_caller`, so that a caller
    that folds the flags into a collective of its own sends the same shape either way.
    """
    if not finite_checks_on():
        return torch.zeros(len(tensors), dtype=dtype, device=tensors[0].device)
    return torch.stack([~torch.isfinite(t).all() for t in tensors]).to(dtype)


def raise_if_non_finite(counts: Mapping[str, float]) -> None:
    """Raise for the first name whose count of non-finite tensors (host values) is not 0."""
    for name, count in counts.items():
        if count:
            raise non_finite_error(name)


def check_finite(tensors: Mapping[str, Tensor], *, across_ranks: bool) -> None:
    """ValueError naming the first tensor holding a NaN or Inf; nothing inside the block above.

    ``across_ranks``: the flags are summed over ranks (one small all-reduce) so that every rank
    raises together instead of one leaving the others waiting in the next collective; not
    needed for tensors gathered from every rank, which are the same everywhere.
    """
    if not finite_checks_on():
        return
    flags = non_finite_flags(list(tensors.values()), torch.int32)
    if across_ranks:
        flags = distributed.all_reduce_sum(flags)
    raise_if_non_finite(dict(zip(tensors, flags.tolist(), strict=True)))  # one host sync


def non_finite_error(name: str) -> ValueError:
    return ValueError(
        f"{name} contains NaN or Inf values; training has diverged or the input is "
        "corrupt: lower the learning rate, use bf16/fp32 instead of fp16, or check the data"
    )


def check_pair(a: Tensor, b: Tensor, names: tuple[str, str], *, empty_ok: bool = False) -> None:
    """Both 2-D (batch, dim), of one shape, and (unless ``empty_ok``) holding samples."""
    for name, x in zip(names, (a, b), strict=True):
        if x.ndim != 2:
            raise ValueError(
                f"{name} must be 2-D (batch, dim) embeddings, got shape {tuple(x.shape)}; "
                "flatten the head's output to (N, D)"
            )
    if a.shape != b.shape:
        raise ValueError(
            f"{names[0]} and {names[1]} must have the same shape, got {tuple(a.shape)} and "
            f"{tuple(b.shape)}; give both the same output width and the same images"
        )
    if a.shape[0] == 0 and not empty_ok:
        raise ValueError(f"{names[0]} and {names[1]} hold no samples; pass a non-empty batch")


def check_global_batch(z1: Tensor, z2: Tensor) -> None:
    """The gathered views: at least 2 samples, and finite (unless the caller checks the loss)."""
    check_batch_size(z1.shape[0])
    # After the gather every rank holds the same rows and raises together: no all-reduce.
    check_finite({"z1": z1, "z2": z2}, across_ranks=False)


def check_batch_size(n: int) -> None:
    if n < 2:
        raise ValueError(
            f"the global batch has {n} sample(s) but batch statistics need at least 2; "
            "increase batch_size (and drop a last batch of one with drop_last=True)"
        )


def check_temperature(temperature: float, *, paper: str) -> None:
    if not 0 < temperature < float("inf"):
        raise ValueError(
            f"temperature must be a finite number > 0 (paper: {paper}), got {temperature}"
        )


def check_negatives(global_batch: int) -> None:
    if global_batch < 2:
        raise ValueError(
            f"the global batch has {global_batch} image(s), so there are no negatives to "
            "contrast with; increase batch_size (and drop a last batch of one with drop_last)"
        )


def autocast_disabled(device_type: str) -> contextlib.AbstractContextManager[Any]:
    """Autocast off inside the losses: fp16 sums over a D×D matrix overflow."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()
