"""A run's ``insight/epoch-EEEE.safetensors`` files: what the cross-correlation matrix and the
covariance spectra looked like at each epoch (E = 0 before training, else after epoch E).

Each holds float32 tensors ``cross_correlation_block`` (top-left ≤ 64×64 block of C),
``cross_correlation_pooled`` (C average-pooled to ≤ 256×256), ``diagonal`` (D,),
``off_diagonal_histogram`` (100 counts) with ``histogram_edges`` (101, on [−1, 1]),
``embedding_eigenvalues`` and ``representation_eigenvalues`` (descending), and the metadata
``epoch``, ``probe_images``, ``method``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

INSIGHT_DIR = "insight"
_NAME = re.compile(r"epoch-(\d+)\.safetensors$")


@dataclass(frozen=True)
class InsightEpoch:
    """One insight file: its epoch, its tensors as float arrays, its metadata."""

    epoch: int
    path: Path
    tensors: dict[str, np.ndarray]
    metadata: dict[str, str] = field(default_factory=dict)

    def get(self, name: str) -> np.ndarray | None:
        return self.tensors.get(name)


@dataclass(frozen=True)
class Insight:
    """The insight files of a run, in epoch order, and the files that could not be read."""

    epochs: list[InsightEpoch]
    unreadable: list[str]

    def start_middle_end(self) -> list[InsightEpoch]:
        """The first, middle and last epochs (fewer when there are fewer files)."""
        n = len(self.epochs)
        picks = sorted({0, n // 2, n - 1}) if n else []
        return [self.epochs[i] for i in picks]


def read_insight(run: Path) -> Insight:
    """The readable ``insight/epoch-*.safetensors`` files of ``run`` (none when it has none)."""
    from safetensors import safe_open

    folder = run / INSIGHT_DIR
    found: list[InsightEpoch] = []
    unreadable: list[str] = []
    if not folder.is_dir():
        return Insight(found, unreadable)
    for path in sorted(folder.glob("epoch-*.safetensors")):
        match = _NAME.search(path.name)
        if match is None:
            continue
        try:
            with safe_open(str(path), framework="pt") as file:
                tensors = {k: file.get_tensor(k).float().numpy() for k in file.keys()}  # noqa: SIM118
                metadata = dict(file.metadata() or {})
        except Exception as error:  # a file cut short by a kill, or another program's
            unreadable.append(f"{path.name}: {error}")
            continue
        found.append(InsightEpoch(int(match.group(1)), path, tensors, metadata))
    found.sort(key=lambda item: item.epoch)
    return Insight(found, unreadable)
