"""What a training epoch reads: seeded views, the epoch order, and corrupt-sample handling.

Views are a pure function of (seed, epoch, image index) on the per-sample path, and of (seed,
epoch, batch position, rank, world) on the device path; the order is a pure function of (seed,
epoch, rank, world). That is what makes a resumed run bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, default_collate

from barlow import data, distributed
from barlow.augment import CropRamp, MultiView, ViewSpec
from barlow.batched_views import BatchedMultiView


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one image's views in one epoch: a pure function of (seed, epoch, index).

    Views then do not depend on the number of processes or loader workers, nor on where a run was
    interrupted, which is what makes a resumed run bit-identical to an uninterrupted one.
    """
    return ((seed * 1_000_003 + epoch) * 2_147_483_647 + index) % (2**63 - 1)


@dataclass(frozen=True)
class CorruptSample:
    """Stands for an image that could not be decoded (``data.skip_corrupt``); the collate
    function drops it from its batch."""

    path: str
    reason: str


def _read(
    dataset: Dataset[tuple[Tensor, int]], index: int, skip_corrupt: bool
) -> tuple[Tensor, int] | CorruptSample:
    if not skip_corrupt:
        return dataset[index]  # a corrupt file raises data.CorruptImageError naming it
    try:
        return dataset[index]
    except data.CorruptImageError as error:
        return CorruptSample(error.path, str(error))


def collate_dropping_corrupt(samples: Sequence[Any]) -> tuple[Any, Tensor, list[str]]:
    """``default_collate`` of the decodable samples, their labels, and the corrupt files dropped.

    Dropping (rather than substituting the next index) keeps every other image's place in the
    epoch order, so the batches after a corrupt file are the ones an exact resume expects.
    """
    good = [s for s in samples if not isinstance(s, CorruptSample)]
    dropped = [s.path for s in samples if isinstance(s, CorruptSample)]
    if not good:
        return None, torch.empty(0, dtype=torch.long), dropped
    inputs, labels = default_collate(good)
    return inputs, labels, dropped


class ViewDataset(Dataset[tuple[tuple[Tensor, ...], int]]):
    """Pairs (or K-tuples) of augmented views of each image, with its label (−1 if none).

    Indexed by ``(epoch, index)`` (see :class:`EpochOrder`); the views of that image in that epoch
    are drawn from a generator seeded with :func:`sample_seed`. With ``skip_corrupt`` an image
    that cannot be decoded gives a :class:`CorruptSample` instead of raising.
    """

    def __init__(
        self,
        dataset: Dataset[tuple[Tensor, int]],
        views: MultiView,
        seed: int,
        *,
        skip_corrupt: bool = False,
        ramp: CropRamp | None = None,
    ) -> None:
        self.dataset, self.views, self.seed = dataset, views, seed
        self.skip_corrupt, self.ramp = skip_corrupt, ramp
        self.by_size: dict[int, MultiView] = {}

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        sample = _read(self.dataset, index, self.skip_corrupt)
        if isinstance(sample, CorruptSample):
            return sample
        image, label = sample
        # torchvision's transforms draw from the global CPU generator: seed it for this image and
        # put the caller's state back afterwards (torch.manual_seed would also visit every
        # accelerator backend, ~100× slower than seeding the CPU generator alone).
        generator = torch.default_generator
        saved = generator.get_state()
        generator.manual_seed(sample_seed(self.seed, epoch, index))
        views = self.views
        if self.ramp is not None:
            views = _views_at(self.by_size, MultiView, self.views.specs, self.ramp, epoch)
        try:
            return views(image), label
        finally:
            generator.set_state(saved)


def _views_at(
    by_size: dict[int, Any],
    make: Callable[[Sequence[ViewSpec]], Any],
    specs: Sequence[ViewSpec],
    ramp: CropRamp | None,
    epoch: int,
) -> Any:
    """The views of ``epoch`` (``make(specs)`` at the ramp's side), built once per side."""
    if ramp is not None:
        specs = ramp.specs(specs, epoch)
    size = specs[0].crop_size
    if size not in by_size:
        by_size[size] = make(specs)
    return by_size[size]


class RawImages(Dataset[tuple[Tensor, int]]):
    """The uint8 images themselves, indexed by ``(epoch, index)``: views are drawn on the device."""

    def __init__(self, dataset: Dataset[tuple[Tensor, int]], *, skip_corrupt: bool = False) -> None:
        self.dataset, self.skip_corrupt = dataset, skip_corrupt

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        return _read(self.dataset, key[1], self.skip_corrupt)


class DeviceViews:
    """Views of whole uint8 batches on the training device (``batched_views``).

    The draws of the batch at position ``batch`` of ``epoch`` on ``rank`` come from a generator
    seeded with ``sample_seed(seed, epoch, batch · world + rank)``: a pure function of where the
    batch is, so an interrupted run resumes exactly (the views depend on the world size, unlike
    the per-sample path's).
    """

    def __init__(
        self,
        specs: Sequence[ViewSpec],
        *,
        seed: int,
        world: int,
        rank: int,
        device: torch.device,
        ramp: CropRamp | None = None,
    ) -> None:
        self.specs, self.ramp = tuple(specs), ramp
        self.by_size: dict[int, BatchedMultiView] = {}
        self.seed, self.world, self.rank, self.device = seed, world, rank, device
        self.generator = torch.Generator(device=device)

    def __call__(self, images: Tensor, *, epoch: int, batch: int) -> list[Tensor]:
        self.generator.manual_seed(sample_seed(self.seed, epoch, batch * self.world + self.rank))
        views = _views_at(self.by_size, BatchedMultiView, self.specs, self.ramp, epoch)
        return list(views(images.to(self.device, non_blocking=True), self.generator))


class EpochOrder(Sampler[tuple[int, int]]):
    """This process's ``(epoch, index)`` pairs for one epoch, optionally from a batch onwards.

    The order is ``DistributedSampler``'s: a pure function of (seed, epoch, rank, world size),
    used in one process too so that resuming and scaling out see the same order. The tail that
    does not fill a global batch is dropped (BatchNorm needs full batches).
    """

    def __init__(
        self, dataset: Dataset[Any], *, world: int, rank: int, seed: int, local_batch: int
    ) -> None:
        self.order: DistributedSampler[Any] = DistributedSampler(
            dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
        self.local_batch = local_batch
        self.batches = len(self.order) // local_batch
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, *, start_batch: int = 0) -> None:
        """Walk ``epoch``'s order, skipping its first ``start_batch`` batches (a resume)."""
        if not 0 <= start_batch <= self.batches:
            raise ValueError(f"start_batch {start_batch} outside [0, {self.batches}]")
        self.order.set_epoch(epoch)
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = list(self.order)[self.start_batch * self.local_batch :]
        return ((self.epoch, i) for i in indices[: len(self)])

    def __len__(self) -> int:
        return (self.batches - self.start_batch) * self.local_batch


def epoch_loader(
    dataset: Dataset[Any],
    *,
    local_batch: int,
    world: int,
    rank: int,
    seed: int,
    num_workers: int,
    device: torch.device,
) -> tuple[DataLoader[Any], EpochOrder]:
    """This process's loader over ``dataset`` in :class:`EpochOrder`, batches of ``local_batch``
    collated by :func:`collate_dropping_corrupt`; and the order, to set each epoch."""
    order = EpochOrder(dataset, world=world, rank=rank, seed=seed, local_batch=local_batch)
    loader = DataLoader(
        dataset,
        batch_size=local_batch,
        sampler=order,
        drop_last=True,
        collate_fn=collate_dropping_corrupt,
        # Its own generator: every iter(loader) draws a worker base seed, which, taken from the
        # global generator, would shift the random state a resume restores.
        generator=torch.Generator().manual_seed(seed),
        num_workers=num_workers,
        worker_init_fn=leave_interrupts_to_the_trainer,
        pin_memory=device.type == "cuda",
        persistent_workers=num_workers > 0,
    )
    return loader, order


def leave_interrupts_to_the_trainer(worker_id: int) -> None:
    """A DataLoader worker ignores Ctrl-C: a terminal sends SIGINT to the whole process group,
    and the training process saves a checkpoint and then stops its workers (a worker dying of
    it first would crash the run with "DataLoader worker exited unexpectedly")."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def trim_to_common_batch(inputs: Any, *, world: int, device: torch.device, where: str) -> Any:
    """Cut this process's batch, short of the corrupt images dropped, to the smallest on any rank.

    The losses gather equal-sized shards from every process, so all ranks train on as many images
    as the rank that dropped the most: one all-gather of the sizes per step, paid only with
    ``data.skip_corrupt``.
    """
    size = 0 if inputs is None else len(inputs if isinstance(inputs, Tensor) else inputs[0])
    common = size
    if world > 1:
        sizes = distributed.all_gather_no_grad(torch.tensor([size], device=device))
        common = int(sizes.min())
    if common < 2:
        raise ValueError(
            f"{where} holds {common} decodable image(s) on a process after dropping corrupt ones; "
            "the loss needs at least 2: remove the corrupt files (rerun without data.skip_corrupt "
            "to have the first one named) or raise train.batch_size"
        )
    if common == size:
        return inputs
    return inputs[:common] if isinstance(inputs, Tensor) else [v[:common] for v in inputs]


def gather_files(files: list[str]) -> list[str]:
    """Every process's list of corrupt files, concatenated (rank order)."""
    gathered = distributed.all_gather_object(files)
    return [f for part in gathered for f in part]  # type: ignore[attr-defined]
