"""Training: a :class:`Run` built from a config, the :class:`TrainingLoop` every job shares,
the state a checkpoint holds, and :func:`pretrain`.

Rooms: ``setup`` (device, data, method, optimizer → Run), ``epoch_data`` (seeded views, epoch
order, corrupt samples), ``loop`` (the order of a step and of an epoch's end), ``guard`` (what
happens to a step that went wrong), ``state`` (TrainState ↔ checkpoint), ``resume`` (output
directory checks, weights-only resume), ``memory`` (preflight, peak, OOM advice), ``pretrain``.
"""

from barlow.rundir import CHECKPOINT_NAME
from barlow.training.guard import NonFiniteLossError, StepGuard
from barlow.training.loop import TrainingLoop
from barlow.training.pretrain import pretrain
from barlow.training.setup import Run, resolve_device, wrap_for_training
from barlow.training.state import CHECKPOINT_KEYS, TrainState

__all__ = [
    "CHECKPOINT_KEYS",
    "CHECKPOINT_NAME",
    "NonFiniteLossError",
    "Run",
    "StepGuard",
    "TrainState",
    "TrainingLoop",
    "pretrain",
    "resolve_device",
    "wrap_for_training",
]
