"""barlow.losses.checks: who checks for NaN/Inf, for every loss and every single-process path.

Outside :func:`finite_checks_by_caller` a non-finite input raises a ValueError naming it; inside,
the same call returns a non-finite loss (nothing turns a NaN into a finite value) without a host
sync, and the shape, batch-size and hyper-parameter checks stay on.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import Tensor

from barlow.losses import (
    barlow_twins_loss,
    finite_checks_by_caller,
    info_nce_loss,
    multiview_info_nce_loss,
    negative_cosine,
    normalized_mse,
    nt_xent_loss,
    vicreg_loss,
)
from barlow.losses.checks import finite_checks_on

N, D, K = 8, 6, 10


def barlow(path: str) -> Callable[..., Tensor]:
    return lambda z1, z2: barlow_twins_loss(z1, z2, path=path).loss  # type: ignore[arg-type]


def vicreg(path: str) -> Callable[..., Tensor]:
    return lambda z1, z2: vicreg_loss(z1, z2, path=path).loss  # type: ignore[arg-type]


# name -> (the loss as a function of its inputs, the inputs' names, their shapes)
LOSSES: dict[str, tuple[Callable[..., Tensor], tuple[str, ...], tuple[tuple[int, int], ...]]] = {
    **{
        f"barlow_twins/{path}": (barlow(path), ("z1", "z2"), ((N, D), (N, D)))
        # One process: "reduce_c" and "sharded_gram" run their own code with identity collectives.
        for path in ("correlation", "gram", "auto", "reduce_c", "sharded_gram")
    },
    **{
        f"vicreg/{path}": (vicreg(path), ("z1", "z2"), ((N, D), (N, D)))
        for path in ("correlation", "gram", "auto")
    },
    "normalized_mse": (normalized_mse, ("p", "z"), ((N, D), (N, D))),
    "negative_cosine": (negative_cosine, ("p", "z"), ((N, D), (N, D))),
    "nt_xent": (lambda z1, z2: nt_xent_loss(z1, z2).loss, ("z1", "z2"), ((N, D), (N, D))),
    "info_nce": (
        lambda q, k, queue: info_nce_loss(q, k, queue).loss,
        ("q", "k", "queue"),
        ((N, D), (N, D), (K, D)),
    ),
    "multiview_info_nce": (
        lambda *views: multiview_info_nce_loss(views).loss,
        ("views[0]", "views[1]", "views[2]"),
        ((N, D), (N, D), (N, D)),
    ),
}
EACH_INPUT = [(loss, name) for loss, (_, names, _) in LOSSES.items() for name in names]
BAD_VALUES = [float("nan"), float("inf"), float("-inf")]


def inputs(loss: str, broken: str | None = None, bad: float = float("nan")) -> list[Tensor]:
    """Correlated finite inputs for ``loss``; ``broken`` (an input's name) gets one bad value."""
    _, names, shapes = LOSSES[loss]
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(N, D, generator=gen)
    tensors = [
        base + 0.5 * torch.randn(shape, generator=gen)
        if shape[0] == N
        else torch.randn(shape, generator=gen)
        for shape in shapes
    ]
    if broken is not None:
        tensors[names.index(broken)][3, 2] = bad
    return tensors


def call(loss: str, tensors: list[Tensor]) -> Tensor:
    return LOSSES[loss][0](*tensors)


class HostSync(Exception):
    pass


@contextlib.contextmanager
def host_syncs_refused() -> Iterator[None]:
    """Every way a loss could wait for the device raises HostSync: reading a value back, and
    copying a host value to the device (``torch.tensor``; on CUDA it waits for the stream)."""

    def refuse(what: str) -> Callable[..., None]:
        def raise_host_sync(*args: object, **kwargs: object) -> None:
            raise HostSync(what)

        return raise_host_sync

    with pytest.MonkeyPatch.context() as patch:
        for name in ("item", "tolist", "numpy", "cpu", "new_tensor"):
            patch.setattr(torch.Tensor, name, refuse(f"Tensor.{name}"))
        for name in ("__bool__", "__float__", "__int__", "__index__"):
            patch.setattr(torch.Tensor, name, refuse(f"Tensor.{name}"))
        for name in ("tensor", "as_tensor"):
            patch.setattr(torch, name, refuse(f"torch.{name}"))
        yield


@pytest.mark.parametrize("bad", BAD_VALUES)
@pytest.mark.parametrize(("loss", "name"), EACH_INPUT)
def test_non_finite_input_raises_naming_it(loss: str, name: str, bad: float) -> None:
    with pytest.raises(ValueError, match=rf"^{re.escape(name)} contains NaN or Inf"):
        call(loss, inputs(loss, name, bad))


@pytest.mark.parametrize("bad", BAD_VALUES)
@pytest.mark.parametrize(("loss", "name"), EACH_INPUT)
def test_inside_the_block_a_non_finite_input_gives_a_non_finite_loss(
    loss: str, name: str, bad: float
) -> None:
    with finite_checks_by_caller():
        value = call(loss, inputs(loss, name, bad))
    assert value.ndim == 0 and not torch.isfinite(value)


@pytest.mark.parametrize("loss", LOSSES)
def test_inside_the_block_a_finite_input_gives_the_same_loss(loss: str) -> None:
    with finite_checks_by_caller():
        inside = call(loss, inputs(loss))
    assert torch.isfinite(inside) and torch.equal(inside, call(loss, inputs(loss)))


@pytest.mark.parametrize("loss", LOSSES)
def test_inside_the_block_the_forward_has_no_host_sync(loss: str) -> None:
    finite, broken = inputs(loss), inputs(loss, LOSSES[loss][1][0])
    with finite_checks_by_caller(), host_syncs_refused():
        call(loss, finite)
        call(loss, broken)
    # Control: outside the block the finite check's sync is seen.
    with host_syncs_refused(), pytest.raises(HostSync):
        call(loss, finite)


@pytest.mark.parametrize("loss", LOSSES)
def test_the_check_is_on_again_after_the_block(loss: str) -> None:
    name = LOSSES[loss][1][0]
    with finite_checks_by_caller():
        assert not finite_checks_on()
    assert finite_checks_on()
    with pytest.raises(ValueError, match="NaN or Inf"):
        call(loss, inputs(loss, name))
    with pytest.raises(RuntimeError, match="inside"), finite_checks_by_caller():
        raise RuntimeError("inside")
    assert finite_checks_on()
    with pytest.raises(ValueError, match="NaN or Inf"):
        call(loss, inputs(loss, name))


def test_nested_blocks_restore_the_outer_one() -> None:
    with finite_checks_by_caller():
        with finite_checks_by_caller():
            assert not finite_checks_on()
        assert not finite_checks_on()
        value = call("nt_xent", inputs("nt_xent", "z1"))
    assert not torch.isfinite(value) and finite_checks_on()


@pytest.mark.parametrize("loss", LOSSES)
def test_shape_and_batch_errors_still_raise_inside_the_block(loss: str) -> None:
    with finite_checks_by_caller():
        flat = inputs(loss, LOSSES[loss][1][0], float("nan"))
        flat[0] = flat[0].flatten()
        with pytest.raises(ValueError, match="must be 2-D"):
            call(loss, flat)
        mismatched = inputs(loss)
        mismatched[1] = mismatched[1][:, :-1]
        with pytest.raises(ValueError, match="same shape"):
            call(loss, mismatched)
        empty = [t[:0] if t.shape[0] == N else t for t in inputs(loss)]
        with pytest.raises(ValueError, match="sample"):
            call(loss, empty)


def test_hyper_parameter_errors_still_raise_inside_the_block() -> None:
    z1, z2 = inputs("nt_xent")
    with finite_checks_by_caller():
        with pytest.raises(ValueError, match="lambd"):
            barlow_twins_loss(z1, z2, lambd=-1.0)
        with pytest.raises(ValueError, match="at least 2"):
            barlow_twins_loss(z1[:1], z2[:1])
        with pytest.raises(ValueError, match="gamma"):
            vicreg_loss(z1, z2, gamma=0.0)
        with pytest.raises(ValueError, match="temperature"):
            nt_xent_loss(z1, z2, temperature=0.0)
        with pytest.raises(ValueError, match="no negatives"):
            nt_xent_loss(z1[:1], z2[:1])
