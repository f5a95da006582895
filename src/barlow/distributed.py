"""Process groups and collectives: the only module that calls ``torch.distributed``.

Multi-process runs are launched by ``torchrun`` (env:// initialisation: ``WORLD_SIZE``, ``RANK``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``). Every function here also works in a single
process without a process group, where the collectives are identities, so the rest of the code
never branches on whether it is distributed.
"""

from __future__ import annotations

import datetime
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

_TORCHRUN_VARIABLES = ("RANK", "MASTER_ADDR", "MASTER_PORT")


def is_distributed() -> bool:
    """True when a default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of processes in the default group; 1 when not distributed."""
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """Global rank of this process; 0 when not distributed."""
    return dist.get_rank() if is_distributed() else 0


def local_rank() -> int:
    """Rank of this process on its node, from ``LOCAL_RANK`` (set by torchrun); 0 by default."""
    return _int_from_env("LOCAL_RANK", default=0)


def is_main_process() -> bool:
    """True on the process that logs and writes checkpoints (global rank 0)."""
    return rank() == 0


def init_from_env(backend: str | None = None, timeout_s: float = 1800.0) -> torch.device:
    """Join the process group torchrun describes in the environment; return the device to train on.

    With ``WORLD_SIZE`` > 1 this initialises the default group (env://) with ``backend``, or NCCL
    when CUDA is available and Gloo otherwise, binds the process to ``cuda:<LOCAL_RANK>`` and
    returns that device (``cpu`` without CUDA). Without torchrun no group is created and the
    device is ``cuda:0`` when available, else ``cpu``. Calling it again changes nothing.
    """
    env_world_size = _int_from_env("WORLD_SIZE", default=1)
    device = _device_for(local_rank() if env_world_size > 1 else 0)
    if env_world_size <= 1 or is_distributed():
        return device
    if not dist.is_available():
        raise ValueError(
            f"WORLD_SIZE={env_world_size} but this PyTorch build has no torch.distributed; "
            "install a build with distributed support or launch a single process"
        )
    missing = [name for name in _TORCHRUN_VARIABLES if name not in os.environ]
    if missing:
        raise ValueError(
            f"WORLD_SIZE={env_world_size} but {', '.join(missing)} not set; launch with "
            "`torchrun --nproc-per-node=N ...` (it sets them) or unset WORLD_SIZE"
        )
    if backend is None:
        backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        # Before the group exists, so NCCL builds its communicator on this process's own GPU.
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend=backend,
        init_method="env://",
        timeout=datetime.timedelta(seconds=timeout_s),
        device_id=device if backend == "nccl" else None,
    )
    _OWN_GROUP.append(True)
    return device


# Whether init_from_env created the default group (a caller's own group is the caller's to end).
_OWN_GROUP: list[bool] = []


def leave() -> None:
    """Destroy the default process group if :func:`init_from_env` created it. Called when a
    command ends: a group left to the interpreter's exit can abort the process there ("terminate
    called without an active exception" from Gloo's threads, exit code -6) after a finished run."""
    if _OWN_GROUP and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _OWN_GROUP.clear()


def barrier() -> None:
    """Wait until every process arrives here; no-op when not distributed."""
    if is_distributed():
        dist.barrier()


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward sends every rank the gradient of its own rows.

    Why a Function: a raw ``dist.all_gather`` output is cut off from autograd, and patching it
    with a raw ``dist.all_reduce`` outside autograd leaves gradients at 1/W of their value. The
    ``torch.distributed.nn.functional`` collectives would do this but are deprecated.

    Every rank's loss may depend on every rank's rows, so the gradient w.r.t. this rank's rows is
    the sum over ranks of the incoming gradients for those rows: all_reduce(SUM), keep own slice.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        parts = [torch.empty_like(x) for _ in range(world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        # A copy: the incoming gradient buffer may be shared with other autograd branches.
        summed = grad.contiguous().clone()
        dist.all_reduce(summed, op=dist.ReduceOp.SUM)
        rows = summed.shape[0] // world_size()
        return summed.narrow(0, rank() * rows, rows)


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` (same shape on every rank) from all ranks along dim 0, in rank order.

    Shapes: (N, ...) per rank -> (W·N, ...). Differentiable: the backward all-reduces (sums) the
    incoming gradient across ranks and returns this rank's N rows. Identity when not distributed.
    """
    if world_size() == 1:
        return x
    out: Tensor = _GatherWithGrad.apply(x)
    return out


class _AllReduceWithGrad(torch.autograd.Function):
    """All-reduce (sum) whose backward is again an all-reduce (sum) of the gradient.

    Forward: y = Σ_r x_r, the same on every rank, and rank s computes its loss L_s from y. DDP
    averages parameter gradients over ranks, so it optimises (1/W)·Σ_s L_s; each rank must hand
    its own x_r the gradient of Σ_s L_s, and since ∂y/∂x_r = I,

        ∂(Σ_s L_s)/∂x_r = Σ_s ∂L_s/∂y      = all_reduce(SUM) of the incoming gradients.

    With the same L on every rank that is W·∂L/∂y, the W that DDP's 1/W cancels (as for
    :func:`gather_with_grad`). A raw ``dist.all_reduce`` would pass ∂L_r/∂y back alone: 1/W of it.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        summed = torch.clone(x, memory_format=torch.contiguous_format)
        dist.all_reduce(summed, op=dist.ReduceOp.SUM)
        return summed

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        # A copy: the incoming gradient buffer may be shared with other autograd branches.
        summed = torch.clone(grad, memory_format=torch.contiguous_format)
        dist.all_reduce(summed, op=dist.ReduceOp.SUM)
        return summed


def all_reduce_with_grad(x: Tensor) -> Tensor:
    """Element-wise sum of ``x`` over all ranks, differentiable: the backward sums the gradient.

    Same shape in and out; every rank gets the same sum and the gradient w.r.t. its own ``x`` is
    the sum over ranks of the incoming gradients (see :class:`_AllReduceWithGrad` for the
    derivation). Identity when not distributed.
    """
    if world_size() == 1:
        return x
    out: Tensor = _AllReduceWithGrad.apply(x)
    return out


def all_gather_no_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` (same shape on every rank) from all ranks along dim 0; detached."""
    if world_size() == 1:
        return x.detach()
    with torch.no_grad():
        parts = [torch.empty_like(x) for _ in range(world_size())]
        dist.all_gather(parts, x.detach().contiguous())
        return torch.cat(parts, dim=0)


def all_reduce_sum(x: Tensor) -> Tensor:
    """Element-wise sum of ``x`` over all ranks, as a detached copy (``x`` is left untouched)."""
    summed = x.detach().clone()
    if world_size() > 1:
        dist.all_reduce(summed, op=dist.ReduceOp.SUM)
    return summed


def all_reduce_mean(x: Tensor) -> Tensor:
    """Element-wise mean of ``x`` over all ranks, as a detached copy."""
    return all_reduce_sum(x) / world_size()


def any_ranks(*flags: bool, device: torch.device) -> tuple[bool, ...]:
    """Each flag OR-ed over all ranks, in one all-reduce (see :func:`any_rank`)."""
    if world_size() == 1:
        return tuple(flags)
    votes = torch.tensor([int(f) for f in flags], device=device)
    dist.all_reduce(votes, op=dist.ReduceOp.SUM)
    return tuple(bool(v > 0) for v in votes.tolist())


def any_rank(flag: bool, device: torch.device) -> bool:
    """True when ``flag`` is True on at least one rank, so all ranks take the same branch.

    ``device`` must suit the backend (a CUDA device for NCCL). Used to agree on preemption or a
    non-finite loss: if one rank stopped alone, the others would wait forever in a collective.
    """
    if world_size() == 1:
        return flag
    votes = torch.tensor(int(flag), device=device)
    dist.all_reduce(votes, op=dist.ReduceOp.SUM)
    return bool(votes.item() > 0)


def broadcast_object(obj: object, src: int = 0) -> object:
    """Return rank ``src``'s ``obj`` on every rank (pickled; for small objects like paths)."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: object) -> list[object]:
    """Every rank's ``obj``, in rank order, on every rank (pickled; for small objects)."""
    if world_size() == 1:
        return [obj]
    boxes: list[object] = [None] * world_size()
    dist.all_gather_object(boxes, obj)
    return boxes


def _int_from_env(name: str, *, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        parsed = int(value)
    except ValueError:
        raise ValueError(
            f"environment variable {name}={value!r} is not an integer; unset it or let "
            "torchrun set it"
        ) from None
    if parsed < 0:
        raise ValueError(f"environment variable {name}={parsed} must be >= 0; let torchrun set it")
    return parsed


def _device_for(local: int) -> torch.device:
    if not torch.cuda.is_available():
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if local >= count:
        raise ValueError(
            f"LOCAL_RANK={local} but only {count} CUDA device(s) are visible; start at most "
            f"{count} processes per node (torchrun --nproc-per-node={count})"
        )
    return torch.device("cuda", local)
