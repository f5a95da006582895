"""Where a run stands, and the one place that knows what a training checkpoint holds."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from barlow import __version__, checkpoint, distributed

# The keys a training checkpoint must hold to resume a run (validation skips files lacking
# one). It also holds "step_in_epoch", optional: a checkpoint without it resumes at the epoch.
CHECKPOINT_KEYS: tuple[str, ...] = (
    "format_version",
    "barlow_version",
    "config",
    "epoch",
    "global_step",
    "method",
    "optimizer",
    "scaler",
    "rng",
)


@dataclass
class TrainState:
    """The position of a run: ``epoch`` complete epochs, then ``step_in_epoch`` batches of the
    next, ``global_step`` optimizer steps (skipped non-finite steps included) in all."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0

    def to_checkpoint(
        self,
        *,
        config: Mapping[str, Any],
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler,
    ) -> dict[str, Any] | None:
        """The checkpoint of this state: on the main process the dict to save, else None.

        Collective: every process's RNG goes in (rank order), so a resume continues each
        stream where it was; call it on every rank.
        """
        rngs = distributed.all_gather_object(checkpoint.rng_state())
        if not distributed.is_main_process():
            return None
        return {
            "format_version": checkpoint.FORMAT_VERSION,
            "barlow_version": __version__,
            "config": dict(config),
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "method": module.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else {},
            "rng": rngs,
        }

    def finished(self, epochs: int, max_steps: int | None) -> bool:
        """Whether nothing is left to train: ``epochs`` done, or ``max_steps`` steps taken."""
        return self.epoch >= epochs or (max_steps is not None and self.global_step >= max_steps)

    @classmethod
    def from_checkpoint(
        cls,
        saved: Mapping[str, Any],
        *,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler,
        steps_per_epoch: int,
    ) -> TrainState:
        """Load ``saved`` into the module, optimizer, scaler and this process's RNGs (a
        checkpoint from W processes resumes on any number: rank r takes stream r, or stream 0
        when the old run had fewer). A save at the end of an epoch resumes at the next one."""
        missing = [k for k in CHECKPOINT_KEYS if k not in saved]
        if missing:
            raise ValueError(f"the checkpoint lacks {missing}, so it cannot resume a run")
        module.load_state_dict(saved["method"])
        optimizer.load_state_dict(saved["optimizer"])
        if saved["scaler"]:
            scaler.load_state_dict(saved["scaler"])
        rngs, rank = saved["rng"], distributed.rank()
        checkpoint.set_rng_state(rngs[rank] if rank < len(rngs) else rngs[0])
        state = cls(
            int(saved["epoch"]), int(saved.get("step_in_epoch", 0)), int(saved["global_step"])
        )
        if state.step_in_epoch >= steps_per_epoch:
            state.epoch, state.step_in_epoch = state.epoch + 1, 0
        return state


def validate_training_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load ``path`` and check it can resume a run: every key of :data:`CHECKPOINT_KEYS`, every
    floating tensor finite (``checkpoint.validate_checkpoint``); ValueError naming what is wrong."""
    return checkpoint.validate_checkpoint(path, required_keys=CHECKPOINT_KEYS)
