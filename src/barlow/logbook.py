"""A run's record: JSON lines for machines, TensorBoard and Weights & Biases for people, progress
on the console.

Only the main process writes. On a terminal the console gets a tqdm bar; without one (CI, a batch
job's log file) it gets one plain line per logged step instead of carriage-return redraws.
"""

from __future__ import annotations

import importlib.util
import json
import math
import secrets
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, TypeVar

from tqdm import tqdm

from barlow.rundir import CONFIG_NAME, STAGING_NAME, WANDB_ID_NAME, atomic_write_text

if TYPE_CHECKING:
    from torch import Tensor

    from barlow.config import Config, LogConfig

T = TypeVar("T")
STEP_KEY = "global_step"  # the x-axis of every wandb chart


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/Inf literals
    return value


def _scalars(row: Mapping[str, Any]) -> dict[str, int | float]:
    return {
        key: value
        for key, value in row.items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }


class Logbook:
    """Writes ``metrics.jsonl`` under ``out_dir``, and TensorBoard event files and a Weights &
    Biases run when asked (:meth:`for_run`: as ``cfg.log`` says)."""

    def __init__(
        self,
        out_dir: Path,
        *,
        enabled: bool = True,
        tensorboard: bool = True,
        wandb: WandbRun | None = None,
    ) -> None:
        self.enabled, self.tensorboard, self.wandb = enabled, tensorboard, wandb
        self._jsonl: TextIO | None = None
        self._tb: Any = None
        self.out_dir = out_dir  # where the files go (moves with an --overwrite run's swap)
        self.open(out_dir)

    @classmethod
    def for_run(cls, out_dir: Path, cfg: Config, *, enabled: bool) -> Logbook:
        """The logbook of a training run: TensorBoard and wandb as ``cfg.log`` says, the
        resolved config as the wandb run's config. ``log.wandb`` without wandb installed fails
        here on every process, before any training."""
        wandb = WandbRun(cfg.log, cfg.to_dict()) if cfg.log.wandb else None
        return cls(out_dir, enabled=enabled, tensorboard=cfg.log.tensorboard, wandb=wandb)

    def open(self, out_dir: Path) -> None:
        """Append to ``out_dir``'s files (after :meth:`close`: the run directory moved)."""
        self.out_dir = out_dir
        if not self.enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        if self.wandb is not None:  # first: a wandb that cannot start leaves nothing else behind
            self.wandb.open(out_dir)
        self._jsonl = (out_dir / "metrics.jsonl").open("a", encoding="utf-8")
        if self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(out_dir / "tensorboard"))

    def write(self, record: Mapping[str, Any], *, step: int, prefix: str = "train") -> None:
        """Append one JSON line; numeric fields also go to TensorBoard and wandb as
        ``prefix/name`` at ``step``."""
        if not self.enabled:
            return
        row = {k: _plain(v) for k, v in record.items()}
        assert self._jsonl is not None
        self._jsonl.write(json.dumps({"kind": prefix, "step": step, **row}) + "\n")
        self._jsonl.flush()
        scalars = _scalars(row)
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(f"{prefix}/{key}", value, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step, prefix=prefix)

    def image(self, tag: str, image: Tensor, *, step: int) -> None:
        """An RGB image (3, H, W), values in [0, 1], to TensorBoard as ``tag`` at ``step``."""
        if self.enabled and self._tb is not None:
            self._tb.add_image(tag, image.detach().float().cpu().clamp(0, 1), step)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self.wandb is not None:
            self.wandb.close()


class WandbRun:
    """One Weights & Biases run per run directory, its files in ``<run>/wandb/``.

    Its id is kept in ``<run>/wandb_id.txt``, so every :meth:`open` of the directory continues
    the same wandb run (``resume="allow"``): a ``--resume``, and the re-open after an
    ``--overwrite`` run's staging directory replaced the old run. In offline mode wandb writes
    one ``offline-run-*`` folder per open, all with that id; ``wandb sync`` uploads them in order.
    Charts are drawn against ``global_step``, logged with every record, rather than wandb's own
    step: records that a resume repeats (steps after the last checkpoint) are kept, as in
    TensorBoard, instead of dropped as going back in time.
    """

    def __init__(self, settings: LogConfig, config: Mapping[str, Any]) -> None:
        if importlib.util.find_spec("wandb") is None:
            raise ValueError(
                "log.wandb = true needs wandb, which is not installed: pip install barlow[wandb] "
                "(or drop log.wandb)"
            )
        self.settings, self.config = settings, dict(config)
        self._run: Any = None
        self._prefixes: set[str] = set()  # those whose charts have global_step as x-axis

    def open(self, out_dir: Path) -> None:
        import wandb

        id_file = out_dir / WANDB_ID_NAME
        if id_file.is_file():
            run_id = id_file.read_text(encoding="utf-8").strip()
        else:  # kept before wandb starts: a kill right after must not lose the id
            run_id = secrets.token_hex(6)  # wandb ids: lowercase letters and digits
            atomic_write_text(id_file, run_id + "\n")
        try:
            self._run = wandb.init(
                project=self.settings.wandb_project,
                entity=self.settings.wandb_entity,
                mode=self.settings.wandb_mode,  # None: WANDB_MODE, else online
                id=run_id,
                resume="allow",
                name=_run_name(out_dir),
                dir=str(out_dir),
                config=self.config,
            )
        except wandb.errors.Error as exc:  # no API key, no network (after init_timeout, 90 s)
            raise ValueError(
                f"Weights & Biases could not start the run's logging (log.wandb = true): {exc}\n"
                "Log in (`wandb login`, or WANDB_API_KEY), or log offline with "
                "--set log.wandb_mode=offline (or WANDB_MODE=offline) and upload later with "
                f"`wandb sync {_target(out_dir) / 'wandb'}/offline-run-*`, or pass "
                "--set log.wandb=false"
            ) from exc
        self._prefixes = set()

    def log(self, scalars: Mapping[str, int | float], *, step: int, prefix: str) -> None:
        if self._run is None:
            return
        if prefix not in self._prefixes:
            self._run.define_metric(f"{prefix}/*", step_metric=STEP_KEY)
            self._prefixes.add(prefix)
        self._run.log({**{f"{prefix}/{k}": v for k, v in scalars.items()}, STEP_KEY: step})

    def close(self) -> None:
        if self._run is not None:
            # within an exception's unwinding (a failed or preempted run): marked failed
            self._run.finish(exit_code=0 if sys.exc_info()[1] is None else 1)
            self._run = None


def _target(out_dir: Path) -> Path:
    """The run directory: the one an ``--overwrite`` run's staging directory will replace."""
    return out_dir.parent if out_dir.name == STAGING_NAME else out_dir


def _run_name(out_dir: Path) -> str:
    """The run directory's name (the target's for an ``--overwrite`` staging directory), as
    ``parent/name`` inside another run's directory (``barlow finetune``'s ``scratch``)."""
    out_dir = _target(out_dir)
    if (out_dir.parent / CONFIG_NAME).is_file():
        return f"{out_dir.parent.name}/{out_dir.name}"
    return out_dir.name


def console(message: str) -> None:
    """A line for people, on stderr so stdout stays for results."""
    tqdm.write(message, file=sys.stderr)


class Progress:
    """Iterate with a tqdm bar on a terminal, or plain periodic lines without one."""

    def __init__(self, *, enabled: bool, interactive: bool | None = None) -> None:
        self.enabled = enabled
        self.interactive = sys.stderr.isatty() if interactive is None else interactive
        self._bar: tqdm[Any] | None = None
        self._start = time.perf_counter()

    def wrap(self, iterable: Iterable[T], *, total: int, description: str) -> Iterator[T]:
        self._start = time.perf_counter()
        if self.enabled and self.interactive:
            self._bar = tqdm(iterable, total=total, desc=description, file=sys.stderr, leave=False)
            yield from self._bar
            self._bar.close()
            self._bar = None
        else:
            yield from iterable

    def update(
        self, step_in_epoch: int, total: int, description: str, fields: Mapping[str, Any]
    ) -> None:
        """Show the latest metrics: on the bar, or as a plain line."""
        if not self.enabled:
            return
        text = " ".join(f"{k} {_format(v)}" for k, v in fields.items())
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=False)
        else:
            elapsed = time.perf_counter() - self._start
            console(f"{description} {step_in_epoch}/{total} ({elapsed:.0f}s) {text}")


def _format(value: Any) -> str:
    value = _plain(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
