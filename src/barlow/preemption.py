"""Preemption: signals that ask a run to stop, and what the run does about them.

Cluster schedulers warn a job before killing it: SLURM sends SIGUSR1 (with ``--signal``) or
SIGTERM, Kubernetes and most others SIGTERM. A handler must not save a checkpoint itself (it may
interrupt a collective or a half-written file), so it only sets a flag; the training loop polls
the flag at every step, all ranks agree on it, rank 0 saves, and the process exits with 143
(128 + SIGTERM), the code schedulers read as "terminated, may be restarted". Ctrl-C (SIGINT) is
handled the same way and exits with 130 (128 + SIGINT), the shell's code for an interrupt; a
second Ctrl-C stops at once (KeyboardInterrupt), without waiting for the save.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
from types import FrameType, TracebackType

from barlow.logbook import console

EXIT_CODE = 143
INTERRUPT_EXIT_CODE = 130
SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class Preempted(Exception):
    """The run stopped on a preemption signal (or Ctrl-C) after saving a checkpoint it can
    resume from; ``exit_code`` is 130 for Ctrl-C, else 143."""

    def __init__(self, message: str, exit_code: int = EXIT_CODE) -> None:
        super().__init__(message)
        self.exit_code = exit_code

    def __reduce__(self) -> tuple[type[Preempted], tuple[str, int]]:
        return type(self), (str(self), self.exit_code)


class PreemptionSignals:
    """While active, SIGTERM, SIGUSR1 and SIGINT set ``requested`` instead of stopping the
    process (a second SIGINT raises KeyboardInterrupt: the user insists).

    A context manager; the previous handlers come back on exit. Outside the main thread (where
    Python cannot install handlers) it does nothing and ``requested`` stays False.
    """

    def __init__(self) -> None:
        self.requested = False
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.signal_name == "SIGINT":
            raise KeyboardInterrupt
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    @property
    def interrupted(self) -> bool:
        """Whether the request is the user's Ctrl-C (not a scheduler's)."""
        return self.signal_name == "SIGINT"

    @property
    def exit_code(self) -> int:
        return INTERRUPT_EXIT_CODE if self.interrupted else EXIT_CODE

    def __enter__(self) -> PreemptionSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()


def requeue_slurm_job() -> bool:
    """Ask SLURM to requeue this job (``scontrol requeue $SLURM_JOB_ID``); True on success."""
    job = os.environ.get("SLURM_JOB_ID")
    scontrol = shutil.which("scontrol")
    if not job or scontrol is None:
        console("train.requeue=true but this is not a SLURM job (no SLURM_JOB_ID / scontrol)")
        return False
    result = subprocess.run([scontrol, "requeue", job], capture_output=True, text=True)
    if result.returncode != 0:
        console(f"scontrol requeue {job} failed: {result.stderr.strip()}")
        return False
    console(f"requeued SLURM job {job}")
    return True
