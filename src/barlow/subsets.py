"""The labelled subsets of fine-tuning with few labels: ``1%``, ``10%``, ``N`` or an index file.

The rule, class-stratified and deterministic: for each class c with n_c training images, keep
``max(1, round(n_c · f))`` of them (f = the fraction; for ``N`` images in all, f = N / n), the
first of the class's indices after a permutation drawn from ``torch.Generator`` seeded with 0.
Every class is represented, and the proportions of the training set are kept.

The subsets of digits and Fashion-MNIST at 1 % and 10 % are shipped as index files
(``label_subsets/<dataset>-<p>pct.txt``, one training-set index per line), so a subset is the
same on every machine and in every version (a test checks the files against the rule). Other
datasets use the rule directly. An index file given by path holds one entry per line: a
training-set index, or an image file name (the SimCLR ImageNet lists ``1percent.txt`` and
``10percent.txt`` name files such as ``n01440764_10026.JPEG``); blank lines and lines starting
with ``#`` are skipped.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

SHIPPED = {("digits", 1), ("digits", 10), ("fashion-mnist", 1), ("fashion-mnist", 10)}
_PERCENT = re.compile(r"(\d+(?:\.\d+)?)%")


@dataclass(frozen=True)
class LabelledSubset:
    """Training-set indices (sorted, int64) and where they came from."""

    indices: Tensor
    source: str  # "1% (shipped digits-1pct.txt)", "100 images (class-stratified)", a path …


def dataset_labels(dataset: Any) -> Tensor:
    """The class label of every training image (int64), without decoding any image."""
    if hasattr(dataset, "labels") and isinstance(dataset.labels, Tensor):
        return dataset.labels.long()
    if hasattr(dataset, "samples"):
        return torch.tensor([label for _, label in dataset.samples], dtype=torch.long)
    return torch.tensor([int(dataset[i][1]) for i in range(len(dataset))], dtype=torch.long)


def stratified_subset(labels: Tensor, fraction: float, *, seed: int = 0) -> Tensor:
    """The module docstring's rule: ``max(1, round(n_c · fraction))`` images of each class c."""
    if not 0 < fraction <= 1:
        raise ValueError(f"the labelled fraction must be in (0, 1], got {fraction}")
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for c in torch.unique(labels).tolist():
        members = torch.nonzero(labels == c).flatten()
        order = members[torch.randperm(len(members), generator=generator)]
        chosen.append(order[: max(1, round(len(members) * fraction))])
    return torch.sort(torch.cat(chosen)).values


def labelled_subset(spec: str, dataset: Any, dataset_name: str) -> LabelledSubset:
    """The subset ``spec`` ("1%", "10%", "250", or an index file's path) of ``dataset`` (the
    training split of ``dataset_name``)."""
    labels = dataset_labels(dataset)
    percent = _PERCENT.fullmatch(spec.strip())
    if percent:
        value = float(percent.group(1))
        if (dataset_name, value) in SHIPPED:
            name = f"{dataset_name}-{value:g}pct.txt"
            return LabelledSubset(_shipped(name, len(labels)), f"{spec} (shipped {name})")
        indices = stratified_subset(labels, value / 100)
        return LabelledSubset(indices, f"{spec} (class-stratified, seed 0)")
    if spec.strip().isdigit():
        count = int(spec)
        if not 0 < count <= len(labels):
            raise ValueError(f"--labels {count}: the training set has {len(labels)} images")
        indices = stratified_subset(labels, count / len(labels))
        return LabelledSubset(indices, f"{count} images (class-stratified, seed 0)")
    path = Path(spec).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"--labels {spec!r} is not a percentage (1%, 10%), a count of images, or an index "
            "file that exists"
        )
    return LabelledSubset(read_subset_file(path, dataset), str(path))


def _shipped(name: str, size: int) -> Tensor:
    text = (resources.files("barlow") / "label_subsets" / name).read_text(encoding="utf-8")
    indices = _parse_indices(text.splitlines(), f"shipped subset {name}")
    if len(indices) and int(indices.max()) >= size:
        raise ValueError(f"shipped subset {name} does not fit a training set of {size} images")
    return indices


def read_subset_file(path: Path, dataset: Any) -> Tensor:
    """The training-set indices an index file names (indices, or image file names)."""
    lines = [
        line.strip()
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    if not lines:
        raise ValueError(f"index file {path} names no image")
    if all(line.isdigit() for line in lines):
        indices = _parse_indices(lines, str(path))
        if int(indices.max()) >= len(dataset):
            raise ValueError(
                f"index file {path} names index {int(indices.max())}, but the training set has "
                f"{len(dataset)} images"
            )
        return indices
    return _indices_of_names(lines, dataset, path)


def _parse_indices(lines: list[str], where: str) -> Tensor:
    values = [int(line) for line in lines if line.strip() and not line.startswith("#")]
    if len(set(values)) != len(values):
        raise ValueError(f"{where} names an image more than once")
    return torch.sort(torch.tensor(values, dtype=torch.long)).values


def _indices_of_names(names: list[str], dataset: Any, path: Path) -> Tensor:
    """Indices of the images whose file names are ``names`` (image-folder datasets)."""
    samples = getattr(dataset, "samples", None)
    if samples is None:
        raise ValueError(
            f"index file {path} names files, but this dataset is not read from files; give "
            "training-set indices (one per line) instead"
        )
    where = {os.path.basename(file): i for i, (file, _) in enumerate(samples)}
    missing = [name for name in names if name not in where]
    if missing:
        raise ValueError(
            f"index file {path}: {len(missing)} of {len(names)} names are not in the training "
            f"set, e.g. {missing[:3]}"
        )
    return _parse_indices([str(where[name]) for name in names], str(path))
