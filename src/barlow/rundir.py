"""A run directory's file names, and the one atomic write every file barlow writes goes through.

A run directory (``barlow pretrain --out DIR``) holds:

    config.json            the resolved config, the command line and the barlow version
    metrics.jsonl          a JSON line per logged step and per epoch
    metrics.json           final results (evaluation, ``barlow knn`` / ``linear``), merged
    checkpoint.pt          the latest training checkpoint (``checkpoint-step<N>.pt``: snapshots)
    backbone.safetensors   the pretrained backbone's weights alone
    tensorboard/           TensorBoard event files

Atomic write: bytes go to a temporary file in the same directory, are flushed and fsynced, and
the file is renamed over the target (then the directory is fsynced), so a crash, a full disk or
an exception in the writer leaves the previous file byte-identical and no temporary file behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

CONFIG_NAME = "config.json"
METRICS_LOG_NAME = "metrics.jsonl"
METRICS_NAME = "metrics.json"
CHECKPOINT_NAME = "checkpoint.pt"
BACKBONE_NAME = "backbone.safetensors"
TENSORBOARD_NAME = "tensorboard"
LOCK_NAME = ".lock"  # held (flock) by the process training into the directory


class RunInUseError(FileExistsError):
    """Another live process holds the run directory's lock."""


@dataclass(frozen=True)
class RunDir:
    """The paths of one run directory (nothing is created until something is written)."""

    path: Path

    @property
    def config(self) -> Path:
        return self.path / CONFIG_NAME

    @property
    def metrics_log(self) -> Path:
        return self.path / METRICS_LOG_NAME

    @property
    def metrics(self) -> Path:
        return self.path / METRICS_NAME

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT_NAME

    @property
    def backbone(self) -> Path:
        return self.path / BACKBONE_NAME

    @property
    def tensorboard(self) -> Path:
        return self.path / TENSORBOARD_NAME

    def checkpoints(self) -> list[Path]:
        """``checkpoint.pt`` and its snapshots ``checkpoint-step<N>.pt``, where they exist."""
        found = [self.checkpoint] if self.checkpoint.exists() else []
        return found + sorted(self.path.glob("checkpoint-step*.pt"))

    def holds_a_run(self) -> bool:
        """Whether a run already wrote here (its config or a checkpoint)."""
        return self.checkpoint.exists() or self.config.exists()

    def missing_outputs(self, *, final_evaluation: bool) -> list[Path]:
        """The outputs a finished run writes after training that are not here (a run killed
        during its export or final evaluation): ``backbone.safetensors``, and ``metrics.json``
        when the run evaluates."""
        wanted = [self.backbone] + ([self.metrics] if final_evaluation else [])
        return [path for path in wanted if not path.is_file()]

    def remove_stale_temps(self) -> list[Path]:
        """Delete the temp files of writes of the outputs that a killed process left."""
        stale = [
            temp
            for name in (BACKBONE_NAME, METRICS_NAME, CONFIG_NAME)
            for temp in self.path.glob(f".{name}.*.tmp")
        ]
        for temp in stale:
            temp.unlink(missing_ok=True)
        return stale

    def last_epoch_record(self) -> dict[str, Any]:
        """The last epoch's record in ``metrics.jsonl`` (without its kind and step), or {}."""
        if not self.metrics_log.is_file():
            return {}
        last: dict[str, Any] = {}
        for line in self.metrics_log.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
            if record.get("kind") == "epoch":
                last = {k: v for k, v in record.items() if k not in ("kind", "step")}
        return last

    def write_config(self, record: Mapping[str, Any]) -> None:
        """``config.json``, atomically (a reader never sees half of it)."""
        atomic_write_text(self.config, json.dumps(record, indent=2) + "\n")


@contextlib.contextmanager
def run_lock(run_dir: RunDir) -> Iterator[None]:
    """Hold the run directory's lock while training into it; refuse at once, naming the holder
    (PID, host, start), when another process holds it.

    An advisory ``flock`` on ``.lock``: the kernel (or the NFS server, when the holder's lease
    expires) releases it when the holder dies, even by SIGKILL, so a dead run never blocks
    ``--resume``. The file stays behind, holding the last holder's name; a directory this call
    created for a run that failed before writing anything is removed again. Where ``fcntl``
    does not exist (Windows) there is no lock.
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    created = not run_dir.path.exists()
    run_dir.path.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir.path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode("utf-8", "replace").strip() or "unknown"
            raise RunInUseError(
                f"{run_dir.path} is in use by another barlow run ({holder}); wait for it to "
                "end (or stop it), or choose another --out"
            ) from None
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        holder = f"pid {os.getpid()} on {socket.gethostname()}, since {started}"
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.encode(), 0)
        try:
            yield
        except BaseException:
            if created and os.listdir(run_dir.path) == [LOCK_NAME]:
                # a run refused before writing anything leaves no directory behind
                with contextlib.suppress(OSError):
                    (run_dir.path / LOCK_NAME).unlink()
                    run_dir.path.rmdir()
            raise
    finally:
        os.close(fd)  # closing releases the flock


def atomic_write(path: Path, write: Callable[[IO[bytes]], object], *, suffix: str = ".tmp") -> None:
    """Write ``path`` through ``write(file)`` via a same-directory temp file, fsync, rename.

    An exception in ``write`` (or a failed rename) deletes the temp file and leaves ``path`` as
    it was. The new file gets the mode a plain ``open()`` would give it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = tempfile.NamedTemporaryFile(  # noqa: SIM115 (closed below, kept on success)
        dir=path.parent, prefix=f".{path.name}.", suffix=suffix, delete=False
    )
    try:
        with temp:
            write(temp)
            temp.flush()
            os.fsync(temp.fileno())
        # NamedTemporaryFile is 0600; give the file the mode a plain open() would
        os.chmod(temp.name, 0o666 & ~_umask())
        os.replace(temp.name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp.name)
        raise
    fsync_directory(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    """:func:`atomic_write` of UTF-8 text."""
    atomic_write(path, lambda file: file.write(text.encode("utf-8")))


def fsync_directory(directory: Path) -> None:
    """Make a rename or unlink in ``directory`` durable (no-op where directories cannot be
    opened, as on Windows)."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    # /proc avoids os.umask's set-and-restore, which races with threads creating files
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/self/status") as status:
            line = next(line for line in status if line.startswith("Umask:"))
        return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
