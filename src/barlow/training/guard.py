"""The one owner of what happens to a step or an epoch that went wrong.

A non-finite loss (skipped up to ``train.skip_nonfinite`` times, then the run stops), a batch
short of corrupt images (``data.skip_corrupt``: cut to the smallest batch on any rank), a
preemption signal (every rank stops at the same step), collapsed embeddings (warn, or stop with
``train.abort_on_collapse``). Every decision is voted across ranks, so no rank is left waiting
in a collective that the others have left; the per-step vote is one all-reduce and one host sync.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from barlow import distributed
from barlow.config import Config
from barlow.health import CollapseError, CollapseWatch
from barlow.logbook import console
from barlow.preemption import PreemptionSignals
from barlow.training.epoch_data import gather_files, trim_to_common_batch


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the run stops before anything non-finite is saved."""


@dataclass(frozen=True)
class Verdict:
    """What the ranks agreed about one step."""

    nonfinite: bool  # the loss is NaN/inf on at least one rank: no optimizer step
    preempt: bool  # a preemption signal reached at least one rank: save and stop


@dataclass
class CorruptTally:
    """The corrupt images dropped (``data.skip_corrupt``), reported each epoch and at the end."""

    pending: list[str] = field(default_factory=list)  # this process's, not yet reported
    total: int = 0
    files: set[str] = field(default_factory=set)

    def collect(self) -> int:
        """Gather every process's pending files (collective); the count of this collection."""
        gathered = gather_files(self.pending)
        self.pending = []
        self.total += len(gathered)
        self.files.update(gathered)
        return len(gathered)

    def summary(self) -> str:
        listing = ", ".join(sorted(self.files)[:5]) + (", …" if len(self.files) > 5 else "")
        return (
            f"data.skip_corrupt: {self.total} corrupt image read(s) skipped in this run, "
            f"{len(self.files)} distinct file(s)" + (f": {listing}" if listing else "")
        )


class StepGuard:
    """Decides, for every step and epoch, whether training goes on (see the module docstring)."""

    def __init__(
        self,
        *,
        skip_nonfinite: int,
        skip_corrupt: bool,
        abort_on_collapse: bool,
        device: torch.device,
        signals: PreemptionSignals,
    ) -> None:
        self.allowed, self.skipped = skip_nonfinite, 0
        self.corrupt = CorruptTally() if skip_corrupt else None
        self.abort_on_collapse = abort_on_collapse
        self.collapse_watch = CollapseWatch()
        self.device, self.signals = device, signals

    @classmethod
    def from_config(
        cls, cfg: Config, *, device: torch.device, signals: PreemptionSignals
    ) -> StepGuard:
        return cls(
            skip_nonfinite=cfg.train.skip_nonfinite,
            skip_corrupt=cfg.data.skip_corrupt,
            abort_on_collapse=cfg.train.abort_on_collapse,
            device=device,
            signals=signals,
        )

    @property
    def may_skip(self) -> bool:
        """Whether a non-finite step can be skipped (then the step keeps what it must restore)."""
        return self.allowed > 0

    def usable_batch(self, inputs: Any, dropped: list[str], *, where: str) -> Any:
        """The batch to train on: with ``data.skip_corrupt``, cut to the smallest on any rank."""
        if self.corrupt is None:
            return inputs
        self.corrupt.pending += dropped
        world = distributed.world_size()
        return trim_to_common_batch(inputs, world=world, device=self.device, where=where)

    def vote(self, loss: Tensor) -> Verdict:
        """The step's one host sync: is the loss finite everywhere, did a signal arrive?"""
        nonfinite, preempt = distributed.any_ranks(
            not bool(torch.isfinite(loss).item()), self.signals.requested, device=self.device
        )
        return Verdict(nonfinite, preempt)

    def skip_nonfinite(
        self, loss: Tensor, logs: Mapping[str, Tensor], *, step: int, epoch: int, last_saved: str
    ) -> str:
        """Count a non-finite step; raise NonFiniteLossError when over ``train.skip_nonfinite``,
        else return the line saying it was skipped. Collective (gathers every rank's loss)."""
        self.skipped += 1
        losses = distributed.all_gather_no_grad(loss.detach().float().reshape(1)).tolist()
        terms = {k: float(v) for k, v in logs.items()}
        value = f"loss is {losses[0]}" if len(losses) == 1 else f"loss per process is {losses}"
        where = f"{value} at step {step} (epoch {epoch + 1}); terms {terms}"
        if self.skipped > self.allowed:
            raise NonFiniteLossError(
                f"{where}; last good checkpoint: {last_saved}. Try a lower optim.lr, a longer "
                "optim.warmup_epochs, or train.precision=fp32/bf16 instead of fp16; "
                "train.skip_nonfinite=N skips up to N such steps"
            )
        return f"skipped a step ({self.skipped}/{self.allowed} allowed): {where}"

    def check_collapse(self, metrics: Mapping[str, Any], epoch: int) -> None:
        """Watch the epoch's collapse statistics (when it has them): warn, or stop every rank."""
        alarm = self.collapse_watch.update(metrics) if "std_ratio" in metrics else None
        if distributed.any_rank(alarm is not None, self.device):
            if self.abort_on_collapse:  # every rank stops, so none waits in a collective
                raise CollapseError(f"epoch {epoch + 1}: {alarm or 'collapse on another rank'}")
            if distributed.is_main_process():
                console(f"warning, epoch {epoch + 1}: {alarm}")
