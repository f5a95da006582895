"""Process helpers shared by the tests: real runs (torchrun, the CLI) and spawned Gloo ranks."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp


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
    out: Path, args: Sequence[str], timeout: float = 900
) -> subprocess.CompletedProcess[str]:
    """``torchrun --nproc_per_node 2 -m barlow pretrain --out OUT --quiet ARGS`` on a free port,
    one intra-op thread per process, through :func:`run_group` (seconds on a loaded machine)."""
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--nproc_per_node", "2", "--master_port", str(free_port())]
    cmd += ["-m", "barlow", "pretrain", "--out", str(out), "--quiet", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return run_group(cmd, env, timeout)


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
