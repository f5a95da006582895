"""Process helpers shared by the tests: real runs (torchrun, the CLI) and spawned Gloo ranks."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp
from torch import Tensor

from barlow import distributed


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for torchrun's --master_port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_group(
    cmd: list[str], env: dict[str, str], timeout: float
) -> subprocess.CompletedProcess[str]:
    """``subprocess.run`` in a new session; on timeout the whole group (torchrun's workers too)
    is killed, so no process outlives the test."""
    proc = subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def pretrain_on_two_processes(
    out: Path, args: Sequence[str], timeout: float = 900, *, patch: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """``torchrun --nproc_per_node 2 -m barlow pretrain --out OUT --quiet ARGS`` on a free port,
    one intra-op thread per process, through :func:`run_group` (seconds on a loaded machine).
    With ``patch`` (a :func:`patched_barlow` script) each process runs that script instead."""
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--nproc_per_node", "2", "--master_port", str(free_port())]
    cmd += ["-m", "barlow"] if patch is None else [str(patch)]
    cmd += ["pretrain", "--out", str(out), "--quiet", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return run_group(cmd, env, timeout)


def patched_barlow(patch: str, directory: Path) -> Path:
    """A script that runs ``patch`` (Python source, no tensor work) and then the ``barlow``
    command line on its arguments: how a negative control breaks one piece of a real run in a
    subprocess. Written to ``directory``; run it with ``python SCRIPT ARGS`` or torchrun."""
    script = directory / "patched_barlow.py"
    script.write_text(f"{patch}\n\nfrom barlow.cli import main\n\nraise SystemExit(main())\n")
    return script


def join_as_rank(rank: int, world: int, port: int) -> None:
    """In a spawned worker: the torchrun variables for rank ``rank`` of ``world`` on this host
    (CPU and Gloo even on a GPU machine), one intra-op thread so the ranks do not fight."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(world),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        CUDA_VISIBLE_DEVICES="",
    )
    torch.set_num_threads(1)


def leave_process_group() -> None:
    """In a spawned worker, at its end: destroy the default process group if there is one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def save_rank_result(out_dir: str | Path, rank: int, result: Any) -> None:
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")


def spawn_ranks(worker: Callable[[int, int, str], None], world: int, out_dir: Path) -> list[Any]:
    """Run ``worker(rank, port, out_dir)`` in ``world`` spawned processes; each rank's
    :func:`save_rank_result`, in rank order."""
    mp.spawn(worker, args=(free_port(), str(out_dir)), nprocs=world, join=True)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(world)]


def even_rows(rank: int, batch: int, world: int) -> tuple[int, int]:
    """Rank ``rank``'s rows [start, stop) of a global batch split evenly over ``world`` ranks."""
    rows = batch // world
    return rank * rows, (rank + 1) * rows


def skewed_embeddings(
    batch: int, dim: int, row_scale: float, row_shift: float, decades: float
) -> tuple[Tensor, Tensor]:
    """Two correlated (batch, dim) embeddings whose second half of rows is ``row_scale``× larger
    and shifted by ±``row_shift``, with columns spread over ``decades`` decades: a rank that used
    its own statistics or rows instead of the global batch's would show."""
    gen = torch.Generator().manual_seed(2)
    z1 = torch.randn(batch, dim, generator=gen)
    z2 = 0.6 * z1 + torch.randn(batch, dim, generator=gen)
    half = batch // 2
    scale = torch.cat([torch.ones(half, 1), torch.full((batch - half, 1), row_scale)])
    shift = torch.cat([torch.zeros(half, 1), torch.full((batch - half, 1), row_shift)])
    columns = torch.logspace(-decades / 2, decades / 2, dim)
    return (z1 * scale + shift) * columns, (z2 * scale - shift) * columns


def gather_without_summed_gradients(x: Tensor) -> Tensor:
    """A deliberately broken ``distributed.gather_with_grad``, for negative controls in a spawned
    rank: the classic bug of gathering without autograd and putting the local rows back, so the
    other ranks' terms never reach this rank's rows and its gradients end at 1/W."""
    gathered = list(distributed.all_gather_no_grad(x).chunk(distributed.world_size()))
    gathered[distributed.rank()] = x
    return torch.cat(gathered)


@contextlib.contextmanager
def distributed_replaced(name: str, replacement: Callable[..., Any]) -> Iterator[None]:
    """``barlow.distributed.<name>`` replaced for the block: the losses and methods look it up at
    call time, so a negative control can run a deliberately broken collective."""
    real = getattr(distributed, name)
    setattr(distributed, name, replacement)
    try:
        yield
    finally:
        setattr(distributed, name, real)


_gather_with_grad = distributed.gather_with_grad  # the real one, whatever a test replaces


def gather_in_the_wrong_rank_order(x: Tensor) -> Tensor:
    """A deliberately broken ``distributed.gather_with_grad``: the ranks' rows in reverse order,
    so a rank does not find its own rows where the loss looks for its positives."""
    return torch.cat(list(reversed(_gather_with_grad(x).chunk(distributed.world_size()))))


# Broken gathers for the negative controls of losses whose value does not depend on the order
# of the rows (Barlow Twins, VICReg, the cosine losses); the contrastive ones index their
# positives by rank and crash without the gather, so they take the wrong rank order instead.
BROKEN_GATHERS: dict[str, Callable[[Tensor], Tensor]] = {
    "no_gather": lambda x: x,  # each rank's loss sees its own shard only
    "no_grad_sum": gather_without_summed_gradients,
}
BROKEN_CONTRASTIVE_GATHERS: dict[str, Callable[[Tensor], Tensor]] = {
    "no_grad_sum": gather_without_summed_gradients,
    "wrong_rank_order": gather_in_the_wrong_rank_order,
}
