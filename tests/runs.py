"""A training run as the tests read it: its ``metrics.jsonl`` records and its weights, and the
command line's ``--set`` form of config overrides."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from barlow.training import CHECKPOINT_NAME
from barlow.training.state import validate_training_checkpoint

# A run of seconds on the embedded digits: 1 epoch of 11 steps, a 16-16 projector, views drawn on
# the device, no evaluation.
FAST = [
    'method.projector="16-16"',
    "train.batch_size=128",
    "train.epochs=1",
    "optim.warmup_epochs=1",
    "eval.online_knn_every=0",
    "eval.final=false",
    'data.augment_on="device"',
]


# One study point on digits in seconds: an epoch of 4 steps on 512 images, a 16-16 projector, a
# small evaluation (the study tests; a later override of the same key wins).
TINY_POINT = [
    'method.projector="16-16"',
    "data.train_subset=512",
    "train.batch_size=128",
    "train.epochs=1",
    "train.log_every=2",
    "optim.warmup_epochs=1",
    "eval.online_knn_every=0",
    "eval.baselines=false",
    "eval.probe_epochs=5",
    "eval.knn_k=20",
    'data.augment_on="device"',
]


def sets(*overrides: str) -> list[str]:
    """``--set`` arguments for the command line."""
    return [arg for o in overrides for arg in ("--set", o)]


def records(run: Path, kind: str | None = None) -> list[dict[str, Any]]:
    """The run's ``metrics.jsonl`` records in order; with ``kind`` ("train", "epoch") only those."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if kind is None or r["kind"] == kind]


def weights(run: Path) -> dict[str, torch.Tensor]:
    """The method's state dict in the run's checkpoint, validated: complete, every tensor finite."""
    return validate_training_checkpoint(run / CHECKPOINT_NAME)["method"]
