"""A run's record: JSON lines for machines, TensorBoard for people, progress on the console.

Only the main process writes. On a terminal the console gets a tqdm bar; without one (CI, a batch
job's log file) it gets one plain line per logged step instead of carriage-return redraws.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TextIO, TypeVar

from tqdm import tqdm

T = TypeVar("T")


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/Inf literals
    return value


class Logbook:
    """Writes ``metrics.jsonl`` and TensorBoard event files under ``out_dir``."""

    def __init__(self, out_dir: Path, *, enabled: bool = True, tensorboard: bool = True) -> None:
        self.enabled, self.tensorboard = enabled, tensorboard
        self._jsonl: TextIO | None = None
        self._tb: Any = None
        self.open(out_dir)

    def open(self, out_dir: Path) -> None:
        """Append to ``out_dir``'s files (after :meth:`close`: the run directory moved)."""
        if not self.enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = (out_dir / "metrics.jsonl").open("a", encoding="utf-8")
        if self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(out_dir / "tensorboard"))

    def write(self, record: Mapping[str, Any], *, step: int, prefix: str = "train") -> None:
        """Append one JSON line; numeric fields also go to TensorBoard as ``prefix/name``."""
        if not self.enabled:
            return
        row = {k: _plain(v) for k, v in record.items()}
        assert self._jsonl is not None
        self._jsonl.write(json.dumps({"kind": prefix, "step": step, **row}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for key, value in row.items():
                if isinstance(value, int | float) and not isinstance(value, bool):
                    self._tb.add_scalar(f"{prefix}/{key}", value, step)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


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
