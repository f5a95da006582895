"""Sharing the CPU: torch's intra-op threads kept to the cores the other processes leave free.

Why by hand: no library adapts torch's thread count to the machine's load. An OpenMP parallel
region ends at a barrier that waits for every thread of its team. When two jobs' teams together
hold more threads than there are cores, a thread that lost its core for a scheduler time slice
holds up its whole team at every region, and a training step runs thousands of regions: on 2
cores, two jobs of 2 threads each run 5–8× slower each instead of 2×. A team no larger than the
free cores avoids the stalls.

:class:`ThreadGovernor` samples, every ``interval_s`` seconds, the CPU time the machine's cores
(those this process may run on) spent busy and the CPU time of this process and its children;
the rest is the other processes' load, in cores:

    others = (busy time of the allowed cores − this process tree's CPU time) / wall time

and sets ``torch.set_num_threads(clamp(round(cores − others), 1, ceiling))``, ``ceiling`` being
the thread count the process started with (``OMP_NUM_THREADS`` and torch's default are
honoured). A change is taken only when two samples in a row agree, so one burst of another
process does not resize the team. ``train.threads = N`` fixes the count instead: the thread count
can change the rounding of parallel reductions, so runs that must match bit for bit under
different machine loads want it fixed; so does an ``OMP_NUM_THREADS`` in the environment (the
user's or the launcher's choice, e.g. torchrun's), which the governor leaves alone.

The count is set from the thread that runs torch's operators (OpenMP keeps it per thread), so the
loops call :func:`tick` between steps and batches; it reads the clock and returns at once between
samples.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import psutil
import torch

from barlow.logbook import console

AUTO = 0  # train.threads: adapt to the machine's load


@dataclass(frozen=True)
class CpuSample:
    """Cumulative CPU seconds at one moment."""

    wall: float  # monotonic clock
    busy: float  # the allowed cores, all processes
    own: float  # this process and its children


def allowed_cpus() -> list[int]:
    """The CPUs this process may run on (its affinity, where the system has one)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows: no affinity call
        return list(range(psutil.cpu_count() or 1))


def sample_cpu(cpus: list[int]) -> CpuSample:
    """System busy time of ``cpus`` and this process tree's CPU time, in seconds."""
    per_cpu = psutil.cpu_times(percpu=True)
    busy = 0.0
    for index in cpus:
        if index < len(per_cpu):
            t = per_cpu[index]
            busy += sum(t) - t.idle - getattr(t, "iowait", 0.0)
            # guest time is counted inside user (Linux): taken out once, not twice
            busy -= getattr(t, "guest", 0.0) + getattr(t, "guest_nice", 0.0)
    own = 0.0
    me = psutil.Process()
    for process in [me, *me.children(recursive=True)]:
        try:
            times = process.cpu_times()
        except psutil.Error:  # a child that has just ended
            continue
        own += times.user + times.system
    return CpuSample(time.monotonic(), busy, own)


def others_load(before: CpuSample, after: CpuSample) -> float:
    """Cores the other processes kept busy between two samples (0 when the window is empty)."""
    wall = after.wall - before.wall
    if wall <= 0:
        return 0.0
    return max(0.0, (after.busy - before.busy) - (after.own - before.own)) / wall


def threads_for(cores: int, others: float, ceiling: int) -> int:
    """round(cores − others), between 1 and ``ceiling``."""
    return max(1, min(ceiling, round(cores - others)))


class ThreadGovernor:
    """Adapts torch's intra-op thread count to the other processes' load (module docstring)."""

    def __init__(
        self,
        *,
        interval_s: float = 2.0,
        sampler: Callable[[], CpuSample] | None = None,
        cores: int | None = None,
        ceiling: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        cpus = allowed_cpus()
        self.cores = cores or len(cpus)
        self.ceiling = ceiling or torch.get_num_threads()
        self.interval_s, self.clock = interval_s, clock
        self.sampler = sampler or (lambda: sample_cpu(cpus))
        self.last = self.sampler()
        self.pending: int | None = None  # a change seen once, taken when the next sample agrees
        self.changes = 0

    def tick(self) -> None:
        """Sample when ``interval_s`` has passed since the last sample; resize when due."""
        if self.clock() - self.last.wall < self.interval_s:
            return
        now = self.sampler()
        others = others_load(self.last, now)
        self.last = now
        wanted = threads_for(self.cores, others, self.ceiling)
        current = torch.get_num_threads()
        if wanted == current:
            self.pending = None
        elif self.pending != wanted:
            self.pending = wanted
        else:
            self.resize(wanted, current, others)

    def resize(self, wanted: int, current: int, others: float) -> None:
        torch.set_num_threads(wanted)
        self.pending, self.changes = None, self.changes + 1
        if self.changes <= 3 or wanted == self.ceiling:
            console(
                f"other processes keep {others:.1f} of {self.cores} cores busy: {wanted} "
                f"intra-op thread(s), was {current} (train.threads=N fixes the number)"
            )


_governor: ThreadGovernor | None = None


@contextlib.contextmanager
def shared_cpu(threads: int) -> Iterator[None]:
    """For a command's duration: ``threads`` ≥ 1 fixes torch's thread count, ``0`` (auto)
    adapts it (the governor) unless ``OMP_NUM_THREADS`` is set; the process's thread count is
    restored at the end."""
    global _governor
    if threads < 0:
        raise ValueError(f"train.threads must be >= 0 (0: adapt to the machine), got {threads}")
    before, outer = torch.get_num_threads(), _governor
    if threads == AUTO and "OMP_NUM_THREADS" in os.environ:
        _governor = None  # the environment chose the count: it stays
    elif threads == AUTO:
        _governor = outer or ThreadGovernor()
    else:
        _governor = None
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        _governor = outer
        torch.set_num_threads(before)


def tick() -> None:
    """Between steps and batches: let the governor resize the thread team (no-op when fixed)."""
    if _governor is not None:
        _governor.tick()
