"""A run directory's file names, and the one atomic write every file barlow writes goes through.

A run directory (``barlow pretrain --out DIR``) holds:

    config.json            the resolved config, the command line and the barlow version
    metrics.jsonl          a JSON line per logged step and per epoch
    metrics.json           final results (evaluation, ``barlow knn`` / ``linear``), merged
    checkpoint.pt          the latest training checkpoint (``checkpoint-step<N>.pt``: snapshots)
    backbone.safetensors   the pretrained backbone's weights alone
    tensorboard/           TensorBoard event files
    insight/               epoch-<EEEE>.safetensors: cross-correlation, spectra (barlow.insight)
    wandb/, wandb_id.txt   the Weights & Biases run's files and id (``log.wandb``)

Atomic write: bytes go to a temporary file in the same directory, are flushed and fsynced, and
the file is renamed over the target (then the directory is fsynced), so a crash, a full disk or
an exception in the writer leaves the previous file byte-identical and no temporary file behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
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
INSIGHT_NAME = "insight"  # what a report page reads: see barlow.insight
WANDB_NAME = "wandb"
WANDB_ID_NAME = "wandb_id.txt"  # the wandb run that --resume and --overwrite's swap continue
LOCK_NAME = ".lock"  # held (flock) by the process training into the directory
STAGING_NAME = ".overwrite-staging"  # where an --overwrite run writes until its first checkpoint
REPLACED_NAME = ".overwrite-replaced"  # the old run's entries while a replacement is committed


class RunInUseError(FileExistsError):
    """Another live process holds the run directory's lock."""


class OutDirError(ValueError):
    """``--out`` cannot be a run directory: a file, below a file, or not writable."""


def make_run_directory(path: Path) -> bool:
    """Create ``path`` (and its parents) unless it exists; whether it was created. Raises
    :class:`OutDirError` naming the problem when it cannot hold a run."""
    created = not path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise OutDirError(
            f"--out {path} is a file, not a directory; choose another --out"
        ) from None
    except NotADirectoryError:
        blocker = next(p for p in path.parents if p.exists() and not p.is_dir())
        raise OutDirError(
            f"--out {path}: {blocker} is a file, so no directory can be made below it; choose "
            "another --out"
        ) from None
    except OSError as error:  # no permission, a read-only file system, …
        raise OutDirError(
            f"--out {path} cannot be created: {error.strerror} ({error.filename}); choose a "
            "writable --out"
        ) from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise OutDirError(f"--out {path} is not writable; choose a writable --out")
    return created


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

    def run_entries(self) -> list[Path]:
        """What a run writes here: its files, snapshots, ``tensorboard/``, ``insight/``, ``wandb/``
        and the temp files of interrupted writes (not the lock, and not files of the user's own)."""
        names = (
            CONFIG_NAME,
            METRICS_LOG_NAME,
            METRICS_NAME,
            CHECKPOINT_NAME,
            BACKBONE_NAME,
            WANDB_ID_NAME,
        )
        named = [self.path / name for name in (*names, TENSORBOARD_NAME, INSIGHT_NAME, WANDB_NAME)]
        prefixes = (*(f".{name}." for name in names), ".checkpoint-step")
        temps = sorted(p for p in self.path.glob(".*.tmp") if p.name.startswith(prefixes))
        snapshots = sorted(self.path.glob("checkpoint-step*.pt"))
        snapshots += sorted(self.path.glob("weights-source-step*.pt"))  # resume_weights_only
        return [p for p in named if os.path.lexists(p)] + snapshots + temps

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
        return self.last_record("epoch")

    def last_record(self, kind: str) -> dict[str, Any]:
        """The last record of ``kind`` ("train", "epoch") in ``metrics.jsonl`` (without its kind
        and step), or {}."""
        if not self.metrics_log.is_file():
            return {}
        last: dict[str, Any] = {}
        for line in self.metrics_log.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
            if record.get("kind") == kind:
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
    created = make_run_directory(run_dir.path)
    fd = os.open(run_dir.path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(fd)
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


def _lock_holder(fd: int, *, wait_s: float = 2.0) -> str:
    """The name the lock's holder wrote into ``.lock``. A holder that has just taken the lock
    writes its name a moment later: an empty file is read again for up to ``wait_s``."""
    deadline = time.monotonic() + wait_s
    while True:
        holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
        if holder or time.monotonic() >= deadline:
            return holder or "unknown"
        time.sleep(0.05)


class Replacement:
    """``--overwrite`` that cannot lose the old run to a new one that fails.

    The new run writes into ``DIR/.overwrite-staging`` (a run directory of its own) until its
    first checkpoint is written there; only then does :meth:`commit` move the old run's entries
    (:meth:`RunDir.run_entries`) into ``DIR/.overwrite-replaced``, the staged ones into ``DIR``,
    and delete the old ones. A new run that fails first (bad data, out of memory, a kill) leaves
    the old run as it was; :func:`recover_replacement` at the next start removes what it staged,
    or finishes a commit that a kill interrupted. Files of the user's own in ``DIR`` stay.
    """

    def __init__(self, target: RunDir) -> None:
        self.target = target
        self.staging = RunDir(target.path / STAGING_NAME)
        self.replaced = target.path / REPLACED_NAME

    def begin(self) -> RunDir:
        """An empty staging directory for the new run."""
        if self.staging.path.exists():
            shutil.rmtree(self.staging.path)
        self.staging.path.mkdir()
        return self.staging

    def commit(self) -> None:
        """Swap the staged run in; idempotent, so a kill anywhere is finished by calling it again.

        ``.overwrite-replaced`` existing marks a commit under way. The staged ``checkpoint.pt``
        moves first: while it is still staged, every run entry in ``DIR`` is the old run's.
        """
        self.replaced.mkdir(exist_ok=True)
        fsync_directory(self.target.path)
        if self.staging.checkpoint.exists():
            for entry in self.target.run_entries():
                os.replace(entry, self.replaced / entry.name)
            os.replace(self.staging.checkpoint, self.target.checkpoint)
        for entry in sorted(self.staging.path.iterdir()):
            os.replace(entry, self.target.path / entry.name)
        self.staging.path.rmdir()
        fsync_directory(self.target.path)
        shutil.rmtree(self.replaced)

    def abandon(self) -> None:
        """Remove the staging of a new run that failed before its commit began."""
        if not self.replaced.exists():
            shutil.rmtree(self.staging.path, ignore_errors=True)


def recover_replacement(run_dir: RunDir) -> str | None:
    """Undo or finish an ``--overwrite`` that a kill interrupted (call it holding the lock);
    a line saying what was done, or None when there was nothing to do."""
    replacement = Replacement(run_dir)
    if replacement.replaced.exists():
        replacement.staging.path.mkdir(exist_ok=True)  # gone only once the commit had moved all
        replacement.commit()
        return (
            f"{run_dir.path}: finished replacing the old run with the --overwrite run that had "
            "written its first checkpoint (a kill interrupted the swap)"
        )
    if replacement.staging.path.exists():
        replacement.abandon()
        return (
            f"{run_dir.path}: removed {STAGING_NAME}/, left by an --overwrite run that stopped "
            "before its first checkpoint; the run here is as it was before it"
        )
    return None


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
