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
# one). It also holds, optional: "step_in_epoch" (without it a run resumes at the epoch) and
# "epoch_loss" (each rank's loss sum and step count so far in a checkpoint's unfinished epoch),
# "online_probe" (the online linear classifier's head, optimizer and epoch counts).
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
    # this rank's sum of step losses and its count in the unfinished epoch, so that the epoch's
    # loss after a mid-epoch resume is over the whole epoch (the loop sets it, and takes it back)
    epoch_loss: tuple[float, int] = (0.0, 0)

    def to_checkpoint(
        self,
        *,
        config: Mapping[str, Any],
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler,
        extras: Mapping[str, Any] | None = None,
    ) -> dict[str, Any] | None:
        """The checkpoint of this state: on the main process the dict to save, else None.

        Collective: every process's RNG and epoch loss go in (rank order), so a resume
        continues each where it was; call it on every rank. ``extras``: further entries that
        travel with the run (e.g. ``online_probe``, the online classifier's state).
        """
        ranks: list[Any] = distributed.all_gather_object((checkpoint.rng_state(), self.epoch_loss))
        if not distributed.is_main_process():
            return None
        rngs, losses = [rng for rng, _ in ranks], [list(loss) for _, loss in ranks]
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
            "epoch_loss": losses,
            **(extras or {}),
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
        source: str = "the checkpoint",
    ) -> TrainState:
        """Load ``saved`` into the module, optimizer, scaler and this process's RNGs (a
        checkpoint from W processes resumes on any number: rank r takes stream r, or stream 0
        when the old run had fewer). A save at the end of an epoch resumes at the next one."""
        missing = [k for k in CHECKPOINT_KEYS if k not in saved]
        if missing:
            raise ValueError(f"the checkpoint lacks {missing}, so it cannot resume a run")
        checkpoint.load_method_weights(module, saved["method"], source=source)
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
        elif state.step_in_epoch:
            state.epoch_loss = _rank_epoch_loss(saved.get("epoch_loss") or [])
        return state


def _rank_epoch_loss(losses: list[list[float]]) -> tuple[float, int]:
    """This rank's share of a checkpoint's unfinished epoch loss: its own entry when the world
    size is unchanged, else the mean over the saved ranks (a fair stand-in: the epoch's loss is
    the mean over ranks of each rank's mean)."""
    if not losses:  # written before barlow kept it: the epoch's loss covers the resumed steps
        return 0.0, 0
    if len(losses) == distributed.world_size():
        total, steps = losses[distributed.rank()]
        return float(total), int(steps)
    return sum(t for t, _ in losses) / len(losses), round(sum(n for _, n in losses) / len(losses))


def validate_training_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load ``path`` and check it can resume a run: every key of :data:`CHECKPOINT_KEYS`, every
    floating tensor finite (``checkpoint.validate_checkpoint``); ValueError naming what is wrong."""
    return checkpoint.validate_checkpoint(path, required_keys=CHECKPOINT_KEYS)
