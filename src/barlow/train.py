"""``pretrain(config)``: the self-supervised training loop.

Hand-written rather than delegated to a trainer framework because the SSL step is this project's
craft: LARS groups with separate learning rates, the method's ``after_step`` (EMA, queues) right
after the optimizer, exact distributed gradients, and checkpoints that hold the whole state.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, default_collate

from barlow import __version__, checkpoint, data, distributed
from barlow.augment import MultiView, ViewSpec, build_specs, recipe_for
from barlow.batched_views import BatchedMultiView
from barlow.compute import (
    Precision,
    flush_denormals,
    images_channels_last,
    to_channels_last,
    uses_channels_last,
)
from barlow.config import Config, method_parameters
from barlow.heads import mlp_num_parameters, parse_spec
from barlow.health import CollapseError, CollapseWatch, embedding_health
from barlow.logbook import Logbook, Progress, console
from barlow.losses import choose_path
from barlow.methods import METHODS, Method, create_method
from barlow.optim import build_optimizer, scaled_lr, set_learning_rate, warmup_cosine
from barlow.preemption import Preempted, PreemptionSignals, requeue_slurm_job
from barlow.report import (
    MAX_PIXEL_FEATURES,
    EvalData,
    evaluate_encoder,
    knn_and_probe,
    results_table,
)

CHECKPOINT_NAME = checkpoint.LATEST_NAME  # one name, owned by checkpoint.py


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the run stops before anything non-finite is saved."""


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
    ) -> None:
        self.dataset, self.views, self.seed = dataset, views, seed
        self.skip_corrupt = skip_corrupt

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
        try:
            return self.views(image), label
        finally:
            generator.set_state(saved)


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
        self, specs: Sequence[ViewSpec], *, seed: int, world: int, rank: int, device: torch.device
    ) -> None:
        self.views = BatchedMultiView(specs)
        self.seed, self.world, self.rank, self.device = seed, world, rank, device
        self.generator = torch.Generator(device=device)

    def __call__(self, images: Tensor, *, epoch: int, batch: int) -> list[Tensor]:
        self.generator.manual_seed(sample_seed(self.seed, epoch, batch * self.world + self.rank))
        return list(self.views(images.to(self.device, non_blocking=True), self.generator))


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


def wrap_for_training(
    method: nn.Module,
    *,
    device: torch.device,
    world: int,
    channels_last: bool,
    sync_batchnorm: bool,
) -> nn.Module:
    """The module the step runs: NHWC weights, then SyncBatchNorm (GPU) and DDP for world > 1.

    channels_last comes first: DDP lays its gradient buckets out by the parameters' strides when
    it is built, and a layout changed afterwards scrambles the first step's averaged gradients
    (tests/test_compute_distributed.py measures it).
    """
    model = to_channels_last(method) if channels_last else method
    if world > 1:
        if device.type == "cuda" and sync_batchnorm:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    return model


def resolve_device(name: str, distributed_device: torch.device) -> torch.device:
    if name == "auto":
        return distributed_device
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device={name} but no CUDA GPU is visible; use train.device=cpu")
    return device


def check_output_dir(out_dir: Path, cfg: Config, *, resume: bool, overwrite: bool) -> Path | None:
    """Refuse to mix two runs in one directory; return the checkpoint to resume from, if any."""
    ckpt = out_dir / CHECKPOINT_NAME
    config_file = out_dir / "config.json"
    if resume:
        # The newest checkpoint that loads and validates (a damaged latest one is skipped).
        found = checkpoint.latest_valid_checkpoint(out_dir)
        if found is None:
            raise FileNotFoundError(
                f"--resume given but {out_dir} holds no valid checkpoint; drop --resume to start "
                "a new run"
            )
        return found
    if (ckpt.exists() or config_file.exists()) and not overwrite:
        raise FileExistsError(
            f"{out_dir} already holds a run; pass --resume to continue it, --overwrite to replace "
            "it, or choose another --out"
        )
    if overwrite:
        for name in (CHECKPOINT_NAME, "metrics.jsonl", "metrics.json", "config.json"):
            (out_dir / name).unlink(missing_ok=True)
        for snapshot in out_dir.glob("checkpoint-step*.pt"):
            snapshot.unlink()
    return None


# What shapes the model, the data order or the schedule: a run resumes only when these agree.
_RUN_IDENTITY = (("train", "batch_size"), ("data", "dataset"))


def _method_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """``method.*`` of a saved config as ``{"method.name": …, "method.<param>": …}``, with the
    method's defaults filled in, so a default written out and one left out compare equal."""
    method = config.get("method") or {}
    name = method.get("name")
    params = dict(method.get("params") or {})
    if name in METHODS:
        defaults = {
            key: p.default
            for key, p in method_parameters(name).items()
            if p.default is not inspect.Parameter.empty
        }
        params = {**defaults, **params}
    return {"method.name": name, **{f"method.{k}": v for k, v in params.items()}}


def resume_differences(saved_config: Mapping[str, Any], cfg: Config) -> list[str]:
    """The settings that make ``saved_config`` a different run from ``cfg``, one line each.

    Compared: the method and its hyper-parameters (defaults filled in), every ``model.*`` key,
    the global ``train.batch_size`` and ``data.dataset``. Empty when the run can resume.
    """
    current = cfg.to_dict()
    a, b = _method_settings(saved_config), _method_settings(current)
    if a["method.name"] != b["method.name"]:  # another method's parameters do not compare
        a, b = {"method.name": a["method.name"]}, {"method.name": b["method.name"]}
    models = (saved_config.get("model") or {}, current["model"])
    for key in sorted(set(models[0]) | set(models[1])):
        a[f"model.{key}"], b[f"model.{key}"] = models[0].get(key), models[1].get(key)
    for section, key in _RUN_IDENTITY:
        a[f"{section}.{key}"] = (saved_config.get(section) or {}).get(key)
        b[f"{section}.{key}"] = current[section][key]
    return [
        f"{key}: checkpoint {a.get(key)!r}, config {b.get(key)!r}"
        for key in sorted(set(a) | set(b), key=lambda k: (k.split(".")[0], k))
        if a.get(key) != b.get(key)
    ]


def _groups(state: Mapping[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """A state dict split by top-level submodule: ``{"backbone": {"conv1.weight": …}, …}``."""
    groups: dict[str, dict[str, Tensor]] = {}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        groups.setdefault(head, {})[rest] = value
    return groups


def _fits(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)


def _same_random_weights(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> bool:
    """Equal, and random (a floating tensor with more than one value): one was copied from the
    other, as a target or key network is at construction."""
    if not _fits(a, b) or not all(torch.equal(a[k], b[k]) for k in a):
        return False
    return any(
        t.is_floating_point() and t.numel() > 1 and bool(t.min() < t.max()) for t in a.values()
    )


def load_weights_only(method: nn.Module, saved: Mapping[str, Tensor]) -> dict[str, list[str]]:
    """Load the weights of another run's checkpoint into a fresh ``method``; say what went where.

    Each top-level submodule (backbone, projector, predictor, target/key networks, buffers) is
    loaded whole when its keys and shapes all match the checkpoint's. The backbone must match
    (ValueError listing the mismatches otherwise). A submodule that is a copy of another at
    construction (BYOL's target, MoCo's key network) and was not loaded becomes a copy of its
    loaded original again. Everything else keeps its fresh initialisation. Returns the names
    ``{"loaded": […], "copied": ["target_backbone ← backbone", …], "fresh": […]}``.
    """
    fresh = {k: v.detach().clone() for k, v in method.state_dict().items()}
    mine, theirs = _groups(fresh), _groups(saved)
    if "backbone" in mine:
        # strict, with one error listing missing / unexpected keys and shape mismatches
        checkpoint.load_backbone_weights(method.backbone, theirs.get("backbone", {}))  # type: ignore[arg-type]
    loaded = [name for name in mine if name in theirs and _fits(mine[name], theirs[name])]
    state = {name: dict(theirs[name]) if name in loaded else mine[name] for name in mine}
    copied = []
    for name in mine:
        if name in loaded:
            continue
        for original in loaded:
            if _same_random_weights(mine[name], mine[original]):
                state[name] = dict(theirs[original])
                copied.append(f"{name} ← {original}")
                break
    method.load_state_dict(
        {f"{g}.{k}" if k else g: v for g, group in state.items() for k, v in group.items()}
    )
    done = set(loaded) | {c.split(" ")[0] for c in copied}
    return {"loaded": loaded, "copied": copied, "fresh": [n for n in mine if n not in done]}


def _keep_source(source: Path, out: Path, global_step: int) -> Path:
    """Hard-link (or copy) the checkpoint a weights-only resume starts from, so the new run's
    saves and snapshot retention in ``out`` cannot delete it."""
    kept = out / f"weights-source-step{global_step:08d}.pt"
    if not kept.exists():
        try:
            os.link(source, kept)
        except OSError:  # no hard links on this file system
            shutil.copyfile(source, kept)
    return kept


@dataclass(frozen=True)
class MemoryEstimate:
    """Float32 memory of a run's model and of its loss's largest matrix, per process.

    Every parameter and buffer holds a weight (4 bytes); a trainable parameter also a gradient
    and ``optimizer_slots`` optimizer tensors (momentum: 1, AdamW: 2):

        model bytes = 4 · (P + B + T · (1 + slots)),    loss bytes = 4 · rows · cols

    with P parameters, B buffer values, T trainable parameters. Activations, which grow with
    the per-process batch and the image size, come on top.
    """

    parameters: dict[str, int]  # per top-level submodule (backbone, projector, target_*, …)
    buffers: int
    trainable: int
    optimizer_slots: int
    loss_matrix: tuple[int, int]
    loss_matrix_name: str

    @property
    def total_parameters(self) -> int:
        return sum(self.parameters.values())

    @property
    def model_mib(self) -> float:
        values = self.total_parameters + self.buffers
        return 4 * (values + self.trainable * (1 + self.optimizer_slots)) / 2**20

    @property
    def loss_matrix_mib(self) -> float:
        rows, cols = self.loss_matrix
        return 4 * rows * cols / 2**20

    def summary(self) -> str:
        parts = ", ".join(f"{k} {v / 1e6:.2f} M" for k, v in self.parameters.items() if v)
        rows, cols = self.loss_matrix
        return (
            f"memory preflight: {self.total_parameters / 1e6:.1f} M parameters ({parts}); "
            f"weights, gradients and optimizer state {self.model_mib:.0f} MiB; loss "
            f"{self.loss_matrix_name} {rows}×{cols}: {self.loss_matrix_mib:.0f} MiB per process "
            "(activations come on top)"
        )


def largest_loss_matrix(
    method_name: str, params: Mapping[str, Any], *, global_batch: int, world: int = 1
) -> tuple[str, tuple[int, int]]:
    """The biggest matrix a method's loss builds on each process, and its name.

    ``params`` are the method's hyper-parameters with defaults filled in. N is the global batch
    (the losses gather it), N_local = N / world, D the projector's output width. Barlow Twins
    and VICReg build the D×D matrix or the N×N Gram matrices (``losses.choose_path``); SimCLR
    scores 2·N_local anchors against 2N views, MoCo N_local queries against 1 + K keys, CMC
    N_local anchors against N; BYOL and SimSiam hold no more than the N_local×D embeddings.
    """
    n, local = global_batch, global_batch // world
    d = parse_spec(str(params.get("projector", "1")))[-1]
    if method_name in ("barlow_twins", "vicreg"):
        path = params.get("loss_path", "auto")
        if path == "auto":
            path = choose_path(n, d)
        if path == "correlation":
            return "D×D matrix (correlation path)", (d, d)
        return "N×N Gram matrix", (n, n)
    if method_name == "simclr":
        return "2N_local×2N similarities", (2 * local, 2 * n)
    if method_name == "moco":
        return "N_local×(1+K) logits", (local, 1 + int(params.get("queue_size", 0)))
    if method_name == "cmc":
        return "N_local×N logits", (local, n)
    return "N_local×D embeddings", (local, d)


def memory_estimate(
    method: nn.Module,
    method_name: str,
    method_params: Mapping[str, Any],
    *,
    global_batch: int,
    world: int = 1,
    optimizer: str = "lars",
) -> MemoryEstimate:
    """Count ``method``'s parameters per top-level submodule and size its loss (see
    :class:`MemoryEstimate`). Reads shapes only: a method built on the ``meta`` device works."""
    counts: dict[str, int] = {}
    trainable = 0
    for name, parameter in method.named_parameters():
        head = name.partition(".")[0]
        counts[head] = counts.get(head, 0) + parameter.numel()
        trainable += parameter.numel() if parameter.requires_grad else 0
    defaults = {
        k: p.default
        for k, p in method_parameters(method_name).items()
        if p.default is not inspect.Parameter.empty
    }
    name, shape = largest_loss_matrix(
        method_name, {**defaults, **method_params}, global_batch=global_batch, world=world
    )
    return MemoryEstimate(
        parameters=counts,
        buffers=sum(b.numel() for b in method.buffers()),
        trainable=trainable,
        optimizer_slots=2 if optimizer == "adamw" else 1,
        loss_matrix=shape,
        loss_matrix_name=name,
    )


def _oom_message(
    cfg: Config, *, world: int, step: int, epoch: int, last_saved: str | None, estimate: str
) -> str:
    projector = cfg.method.params.get("projector", "the method's default")
    return (
        f"out of memory at step {step} (epoch {epoch + 1}) with train.batch_size="
        f"{cfg.train.batch_size} ({cfg.train.batch_size // world} per process), method.projector="
        f"{projector!r}, train.precision={cfg.train.precision}. {estimate}. Lower "
        "train.batch_size (and optim.lr with it, or keep it: it is scaled per 256 images), choose "
        "a narrower method.projector, or train in bf16 (train.precision=bf16 on a GPU or CPU "
        f"that has it); checkpoints written so far are intact, the last good one: "
        f"{last_saved or 'none yet'}"
    )


def _epoch_loader(
    dataset: ViewDataset | RawImages, cfg: Config, *, world: int, rank: int, device: torch.device
) -> tuple[DataLoader[Any], EpochOrder]:
    local_batch = cfg.train.batch_size // world
    order = EpochOrder(
        dataset, world=world, rank=rank, seed=cfg.train.seed, local_batch=local_batch
    )
    loader = DataLoader(
        dataset,
        batch_size=local_batch,
        sampler=order,
        drop_last=True,
        collate_fn=collate_dropping_corrupt,
        # Its own generator: every iter(loader) draws a worker base seed, which, taken from the
        # global generator, would shift the random state a resume restores.
        generator=torch.Generator().manual_seed(cfg.train.seed),
        num_workers=cfg.data.num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=cfg.data.num_workers > 0,
    )
    return loader, order


def _trim_to_common_batch(inputs: Any, *, world: int, device: torch.device, where: str) -> Any:
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


def _gather_files(files: list[str]) -> list[str]:
    """Every process's list of corrupt files, concatenated (rank order)."""
    gathered = distributed.all_gather_object(files)
    return [f for part in gathered for f in part]  # type: ignore[attr-defined]


def _nonfinite_message(
    losses: list[float], logs: dict[str, Tensor], step: int, epoch: int, last_saved: str | None
) -> str:
    """``losses``: the loss of every process (rank order); ``logs``: this process's terms."""
    terms = {k: float(v) for k, v in logs.items()}
    value = f"loss is {losses[0]}" if len(losses) == 1 else f"loss per process is {losses}"
    return (
        f"{value} at step {step} (epoch {epoch + 1}); terms {terms}; "
        f"last good checkpoint: {last_saved or 'none yet'}. Try a lower optim.lr, a longer "
        "optim.warmup_epochs, or train.precision=fp32/bf16 instead of fp16; "
        "train.skip_nonfinite=N skips up to N such steps"
    )


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory of this process so far, MiB: allocated CUDA memory on a GPU, else the peak
    resident set size (``ru_maxrss``: model, data in memory, activations, allocator slack; loader
    worker processes not included)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    if sys.platform == "win32":  # no getrusage
        return float("nan")
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, else KiB


def _representation_health(method: Method, images: Tensor) -> dict[str, float]:
    """Collapse monitors (``health.embedding_health``) of the backbone features of one batch."""
    was_training = method.training
    method.eval()
    with torch.no_grad():
        features = method.embed(images).float()
    method.train(was_training)
    return embedding_health(features)


def _online_knn(
    method: Method, eval_data: EvalData, cfg: Config, device: torch.device
) -> dict[str, float]:
    """kNN accuracy of the current backbone on the labelled splits (the per-epoch monitor)."""
    from barlow.evaluate import knn_accuracy

    start = time.perf_counter()
    train_f, test_f = (
        eval_data.features(
            method.backbone, split, device=device, batch_size=cfg.eval.batch_size, progress=False
        )
        for split in ("train", "test")
    )
    top1 = knn_accuracy(
        train_f,
        test_f,
        k=cfg.eval.knn_k,
        temperature=cfg.eval.knn_temperature,
        num_classes=eval_data.num_classes,
    )
    return {"knn_top1": top1, "knn_time_s": time.perf_counter() - start}


def pretrain(
    cfg: Config,
    out_dir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    argv: Sequence[str] | None = None,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Pretrain an encoder with ``cfg.method`` and write everything under ``out_dir``.

    Writes ``config.json``, ``metrics.jsonl`` (a record per logged step and per epoch),
    ``tensorboard/``, ``checkpoint.pt`` (atomically, every ``checkpoint_every`` epochs and at the
    end), ``backbone.safetensors`` and, when the data is labelled, ``metrics.json`` with the final
    kNN / linear accuracy. Returns the final metrics.
    """
    out = Path(out_dir)
    device = resolve_device(
        cfg.train.device, distributed.init_from_env(timeout_s=cfg.train.dist_timeout_s)
    )
    world, rank, main = distributed.world_size(), distributed.rank(), distributed.is_main_process()
    if cfg.train.batch_size % world:
        raise ValueError(
            f"train.batch_size={cfg.train.batch_size} is not divisible by the {world} processes; "
            f"choose a multiple of {world}"
        )
    if cfg.train.batch_size // world < 2:
        raise ValueError(
            f"train.batch_size={cfg.train.batch_size} leaves < 2 images per process with {world} "
            f"processes (the loss standardises along the batch); choose at least {2 * world}"
        )
    resume_from = check_output_dir(out, cfg, resume=resume, overwrite=overwrite) if main else None
    resume_from = distributed.broadcast_object(resume_from)  # type: ignore[assignment]
    show = main and (progress if progress is not None else True)
    state: dict[str, Any] | None = None
    weights_only = False
    if resume_from is not None:
        state = checkpoint.load_checkpoint(resume_from, map_location="cpu")
        differences = resume_differences(state.get("config") or {}, cfg)
        if differences and not cfg.train.resume_weights_only:
            raise ValueError(
                f"{resume_from} belongs to a different run; these settings differ:\n  "
                + "\n  ".join(differences)
                + "\nResume with the run's own settings; or pass --resume-weights-only "
                "(train.resume_weights_only=true) to start a fresh schedule from its weights; or "
                "choose another --out (or --overwrite) for a new run"
            )
        weights_only = bool(differences)

    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank

    info = data.dataset_info(cfg.data.dataset)
    crop = cfg.data.crop_size or info.image_size
    method_cls = METHODS[cfg.method.name]
    recipe = cfg.data.views or recipe_for(method_cls.views, channels=info.channels, image_size=crop)
    specs = build_specs(recipe, crop_size=crop, mean=info.mean, std=info.std)
    train_set = data.build_dataset(
        cfg.data.dataset, split="unlabeled", root=cfg.data.root, download=cfg.data.download
    )
    device_views: DeviceViews | None = None
    if cfg.data.augment_on == "device":
        if data.in_memory_images(train_set) is None:
            raise ValueError(
                f"data.augment_on=device needs a dataset held in memory as one uint8 tensor "
                f"(digits, fashion-mnist, cifar10, cifar100, stl10); {cfg.data.dataset!r} is "
                "read from files: use data.augment_on=workers"
            )
        device_views = DeviceViews(
            specs, seed=cfg.train.seed, world=world, rank=rank, device=device
        )
    skip_corrupt = cfg.data.skip_corrupt
    loader, sampler = _epoch_loader(
        ViewDataset(train_set, MultiView(specs), seed=cfg.train.seed, skip_corrupt=skip_corrupt)
        if device_views is None
        else RawImages(train_set, skip_corrupt=skip_corrupt),
        cfg,
        world=world,
        rank=rank,
        device=device,
    )
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ValueError(
            f"dataset {cfg.data.dataset!r} has {len(train_set)} images, fewer than one batch of "  # type: ignore[arg-type]
            f"{cfg.train.batch_size}; lower train.batch_size"
        )

    method = create_method(cfg, in_channels=info.channels, image_size=crop)
    estimate = memory_estimate(
        method,
        cfg.method.name,
        cfg.method.params,
        global_batch=cfg.train.batch_size,
        world=world,
        optimizer=cfg.optim.name,
    )
    if state is not None and weights_only:
        parts = load_weights_only(method, state["method"])
        if main:
            kept = _keep_source(resume_from, out, int(state.get("global_step", 0)))  # type: ignore[arg-type]
            rule = "!" * 100
            console(
                f"{rule}\nWEIGHTS-ONLY RESUME (train.resume_weights_only) from {resume_from}: its "
                f"run differs in {', '.join(d.split(':')[0] for d in differences)}.\n"
                f"Loaded: {', '.join(parts['loaded']) or 'nothing'}"
                + (f"; copied: {', '.join(parts['copied'])}" if parts["copied"] else "")
                + (f"; freshly initialised: {', '.join(parts['fresh'])}" if parts["fresh"] else "")
                + ".\nOptimizer state, learning-rate schedule, step counters and random state "
                f"start fresh at step 0. This run's checkpoints replace the old run's in {out}; "
                f"the source is kept as {kept}\n{rule}"
            )
    method = method.to(device)
    if len(specs) != method.num_views:  # an instance attribute: CMC's number of views is a choice
        raise ValueError(
            f"view recipe {recipe!r} makes {len(specs)} views but {cfg.method.name} takes "
            f"{method.num_views}; set data.views to a recipe with {method.num_views} views"
        )
    precision = Precision.resolve(cfg.train.precision, device)
    channels_last = uses_channels_last(cfg.train.channels_last, device)
    if main:
        projector = cfg.method.params.get("projector")
        extra = ""
        if isinstance(projector, str):
            params = mlp_num_parameters(method.backbone.num_features, projector)  # type: ignore[arg-type]
            extra = f", projector {projector}: {params / 1e6:.1f} M parameters"
        console(
            f"barlow {__version__}: {cfg.method.name} on {cfg.data.dataset} "
            f"({len(train_set)} images, "  # type: ignore[arg-type]
            f"views {recipe!r} at {crop} px), {cfg.model.backbone}{extra}; {world} process(es) on "
            f"{device} ({precision.name}{', channels_last' if channels_last else ''}), "
            f"{steps_per_epoch} steps/epoch"
        )
        console(estimate.summary())
    model = wrap_for_training(
        method,
        device=device,
        world=world,
        channels_last=channels_last,
        sync_batchnorm=cfg.train.sync_batchnorm,
    )
    step_model: nn.Module = torch.compile(model) if cfg.train.compile else model  # type: ignore[assignment]

    base_lr = scaled_lr(cfg.optim.lr, cfg.train.batch_size)
    bias_lr = cfg.optim.bias_lr if cfg.optim.bias_lr is not None else cfg.optim.lr
    optimizer = build_optimizer(
        cfg.optim.name,  # type: ignore[arg-type]
        method,
        lr=base_lr,
        weight_decay=cfg.optim.weight_decay,
        momentum=cfg.optim.momentum,
        bias_lr_scale=bias_lr / cfg.optim.lr,
        eta=cfg.optim.eta,
    )
    scaler = torch.amp.GradScaler(device.type, enabled=precision.dtype == torch.float16)

    total_steps = cfg.train.epochs * steps_per_epoch
    warmup_steps = round(cfg.optim.warmup_epochs * steps_per_epoch)
    if warmup_steps > total_steps:
        # A recipe shortened from the command line (--epochs 1) keeps working: warm up all along.
        if main:
            console(
                f"optim.warmup_epochs={cfg.optim.warmup_epochs} is longer than the run "
                f"({cfg.train.epochs} epochs): warming up over the whole run"
            )
        warmup_steps = total_steps
    start_epoch, start_batch, global_step = 0, 0, 0
    if state is not None and not weights_only:
        method.load_state_dict(state["method"])
        optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        rngs = state["rng"]
        checkpoint.set_rng_state(rngs[rank] if rank < len(rngs) else rngs[0])
        start_epoch, global_step = int(state["epoch"]), int(state["global_step"])
        start_batch = int(state.get("step_in_epoch", 0))
        if start_batch >= steps_per_epoch:
            start_epoch, start_batch = start_epoch + 1, 0
        if main:
            where = f", batch {start_batch}" if start_batch else ""
            console(
                f"resumed from {resume_from} at epoch {start_epoch + 1}{where}, step {global_step}"
            )
    if state is not None and not weights_only and _finished(cfg, start_epoch, global_step):
        # Re-running a finished run is a no-op: no step, no log, no file rewritten.
        if main:
            console(f"{out} already finished at step {global_step}: nothing to do")
        distributed.barrier()
        saved = out / "metrics.json"
        return dict(json.loads(saved.read_text())) if saved.is_file() else {}

    if main:
        out.mkdir(parents=True, exist_ok=True)
        run_record = {
            "config": cfg.to_dict(),
            "argv": list(argv or sys.argv),
            "version": __version__,
        }
        (out / "config.json").write_text(json.dumps(run_record, indent=2) + "\n")
    logbook = Logbook(out, enabled=main)
    bar = Progress(enabled=show)

    eval_data: EvalData | None = None
    if main and cfg.eval.online_knn_every:
        try:
            eval_data = EvalData.build(
                cfg.data.dataset,
                root=cfg.data.root,
                download=cfg.data.download,
                crop_size=crop,
                num_workers=cfg.data.num_workers,
            )
        except (FileNotFoundError, ValueError) as exc:
            console(f"no online kNN: {exc}")

    def save(epoch: int, step_in_epoch: int = 0) -> None:
        """Checkpoint after ``epoch`` complete epochs and ``step_in_epoch`` batches of the next."""
        # Every process's RNG goes in, so a resume continues each stream where it was.
        rngs = distributed.all_gather_object(checkpoint.rng_state())
        if not main:
            return
        checkpoint.save_checkpoint(
            {
                "format_version": checkpoint.FORMAT_VERSION,
                "barlow_version": __version__,
                "config": cfg.to_dict(),
                "epoch": epoch,
                "step_in_epoch": step_in_epoch,
                "global_step": global_step,
                "method": method.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler.is_enabled() else {},
                "rng": rngs,
            },
            out / CHECKPOINT_NAME,
        )
        checkpoint.retain(out, keep_last=cfg.train.keep_last)

    collapse_watch = CollapseWatch()
    last_saved: str | None = None if state is None or weights_only else str(resume_from)
    skipped = 0
    epoch_metrics: dict[str, Any] = {}
    stopped_early = False
    epoch = start_epoch
    corrupt_pending: list[str] = []  # corrupt files this process dropped, not yet reported
    corrupt_total, corrupt_files = 0, set[str]()
    signals = PreemptionSignals()
    with signals, contextlib.closing(logbook), flush_denormals(device):
        try:
            for epoch in range(start_epoch, cfg.train.epochs):
                first_batch = start_batch if epoch == start_epoch else 0
                sampler.set_epoch(epoch, start_batch=first_batch)
                step_model.train()
                epoch_start = time.perf_counter()
                loss_sum = torch.zeros((), device=device)
                steps_done = 0
                description = f"epoch {epoch + 1}/{cfg.train.epochs}"
                batches = bar.wrap(loader, total=len(loader), description=description)
                for i, (inputs, _, dropped) in enumerate(batches, start=first_batch):
                    if skip_corrupt:
                        corrupt_pending += dropped
                        inputs = _trim_to_common_batch(
                            inputs,
                            world=world,
                            device=device,
                            where=f"batch {i + 1} of epoch {epoch + 1}",
                        )
                    lr = warmup_cosine(
                        global_step,
                        total_steps=total_steps,
                        warmup_steps=warmup_steps,
                        base_lr=base_lr,
                        final_lr_ratio=cfg.optim.final_lr_ratio,
                    )
                    set_learning_rate(optimizer, lr)
                    if device_views is not None:
                        views = device_views(inputs, epoch=epoch, batch=i)
                    else:
                        views = [v.to(device, non_blocking=True) for v in inputs]
                    if channels_last:
                        views = images_channels_last(views)
                    with precision.autocast(device):
                        output = step_model(views)
                    loss = output.loss
                    # One host sync per step, agreed by all ranks: a non-finite loss must stop the
                    # run (or skip the step) before the optimizer writes NaN into the weights, and
                    # a preemption signal must stop every rank at the same step.
                    nonfinite, preempt = distributed.any_ranks(
                        not bool(torch.isfinite(loss).item()), signals.requested, device=device
                    )
                    if nonfinite:
                        skipped += 1
                        # every rank is here: say which one(s) went non-finite
                        losses = distributed.all_gather_no_grad(loss.detach().float().reshape(1))
                        message = _nonfinite_message(
                            losses.tolist(), output.logs, global_step, epoch, last_saved
                        )
                        if skipped > cfg.train.skip_nonfinite:
                            raise NonFiniteLossError(message)
                        optimizer.zero_grad(set_to_none=True)
                        if main:
                            console(
                                f"skipped a step ({skipped}/{cfg.train.skip_nonfinite} allowed): "
                                + message.split("; last good")[0]
                            )
                        logbook.write({"skipped_nonfinite": skipped}, step=global_step)
                    else:
                        optimizer.zero_grad(set_to_none=True)
                        scaler.scale(loss).backward()
                        scaler.step(optimizer)
                        scaler.update()
                        loss_sum += loss.detach()
                        steps_done += 1
                    global_step += 1
                    method.after_step(global_step / total_steps)
                    if global_step % cfg.train.log_every == 0 or i == steps_per_epoch - 1:
                        elapsed = time.perf_counter() - epoch_start
                        fields = {
                            "epoch": epoch + (i + 1) / steps_per_epoch,
                            "loss": loss.detach(),
                            **output.logs,
                            "lr": lr,
                            "images_per_s": (i + 1 - first_batch)
                            * cfg.train.batch_size
                            / max(elapsed, 1e-9),
                        }
                        logbook.write(fields, step=global_step)
                        bar.update(i + 1, steps_per_epoch, description, fields)
                    out_of_steps = (
                        cfg.train.max_steps is not None and global_step >= cfg.train.max_steps
                    )
                    if (preempt or out_of_steps) and i + 1 < steps_per_epoch:
                        save(epoch, i + 1)  # mid-epoch: the resume skips the batches done
                        stopped_early = True
                        if preempt:
                            if main:
                                console(
                                    f"{signals.signal_name or 'preemption signal'}: saved "
                                    f"{out / CHECKPOINT_NAME} at epoch {epoch + 1}, batch {i + 1} "
                                    f"(step {global_step}); continue with --resume"
                                )
                                if cfg.train.requeue:
                                    requeue_slurm_job()
                            distributed.barrier()
                            raise Preempted(f"preempted at step {global_step}")
                        break
                if stopped_early:
                    break
                epoch_time = time.perf_counter() - epoch_start
                mean_loss = distributed.all_reduce_mean(loss_sum / max(steps_done, 1))
                epoch_metrics = {
                    "epoch": epoch + 1,
                    "loss": float(mean_loss),
                    "epoch_time_s": epoch_time,
                    "images_per_s": steps_done * cfg.train.batch_size / epoch_time,
                    "peak_memory_mib": peak_memory_mib(device),
                    **_representation_health(method, views[0]),
                }
                if skip_corrupt:
                    files = _gather_files(corrupt_pending)
                    corrupt_pending, corrupt_total = [], corrupt_total + len(files)
                    corrupt_files.update(files)
                    epoch_metrics["corrupt_skipped"] = len(files)
                    epoch_metrics["corrupt_skipped_total"] = corrupt_total
                alarm = collapse_watch.update(epoch_metrics)
                if distributed.any_rank(alarm is not None, device):
                    if (
                        cfg.train.abort_on_collapse
                    ):  # every rank stops, so none waits in a collective
                        raise CollapseError(
                            f"epoch {epoch + 1}: {alarm or 'collapse on another rank'}"
                        )
                    if main:
                        console(f"warning, epoch {epoch + 1}: {alarm}")
                is_last = epoch + 1 == cfg.train.epochs or (
                    cfg.train.max_steps is not None and global_step >= cfg.train.max_steps
                )
                every = cfg.eval.online_knn_every
                if eval_data is not None and every and ((epoch + 1) % every == 0 or is_last):
                    epoch_metrics.update(_online_knn(method, eval_data, cfg, device))
                logbook.write(epoch_metrics, step=global_step, prefix="epoch")
                if main:
                    knn = (
                        f", kNN {100 * epoch_metrics['knn_top1']:.1f} %"
                        if "knn_top1" in epoch_metrics
                        else ""
                    )
                    corrupt = (
                        f", {epoch_metrics['corrupt_skipped']} corrupt image(s) skipped"
                        if skip_corrupt
                        else ""
                    )
                    console(
                        f"epoch {epoch + 1}/{cfg.train.epochs}: loss {epoch_metrics['loss']:.4g}, "
                        f"{epoch_time:.1f} s, {epoch_metrics['images_per_s']:.0f} images/s{knn}"
                        f"{corrupt}"
                    )
                if (epoch + 1) % cfg.train.checkpoint_every == 0 or is_last:
                    save(epoch + 1)
                    last_saved = f"{out / CHECKPOINT_NAME} (epoch {epoch + 1})"
                distributed.barrier()
                if is_last:
                    break
        except torch.OutOfMemoryError as error:
            # Nothing was saved since the last checkpoint, which stays intact; say what to shrink.
            raise torch.OutOfMemoryError(
                _oom_message(
                    cfg,
                    world=world,
                    step=global_step,
                    epoch=epoch,
                    last_saved=last_saved,
                    estimate=estimate.summary(),
                )
            ) from error

    if skip_corrupt:
        files = _gather_files(corrupt_pending)  # from an epoch cut short by train.max_steps
        corrupt_total += len(files)
        corrupt_files.update(files)
        if main:
            listing = ", ".join(sorted(corrupt_files)[:5]) + (
                ", …" if len(corrupt_files) > 5 else ""
            )
            console(
                f"data.skip_corrupt: {corrupt_total} corrupt image read(s) skipped in this run, "
                f"{len(corrupt_files)} distinct file(s)" + (f": {listing}" if listing else "")
            )

    results: dict[str, Any] = {"pretrain": epoch_metrics}
    if skip_corrupt:
        results["corrupt_skipped"] = {"total": corrupt_total, "files": sorted(corrupt_files)}
    if main:
        checkpoint.export_backbone(method.backbone.state_dict(), out / "backbone.safetensors")
        if cfg.eval.final:
            results.update(final_evaluation(method, cfg, device=device, crop=crop, progress=show))
            from barlow.evaluate import write_metrics

            write_metrics(out / "metrics.json", results)
    distributed.barrier()
    return results


def _finished(cfg: Config, epoch: int, global_step: int) -> bool:
    """Whether a run resumed at (epoch, global_step) has nothing left to train."""
    max_steps = cfg.train.max_steps
    return epoch >= cfg.train.epochs or (max_steps is not None and global_step >= max_steps)


def final_evaluation(
    method: Method, cfg: Config, *, device: torch.device, crop: int, progress: bool
) -> dict[str, Any]:
    """kNN + linear probe of the pretrained encoder, and of the baselines when asked."""
    try:
        eval_data = EvalData.build(
            cfg.data.dataset,
            root=cfg.data.root,
            download=cfg.data.download,
            crop_size=crop,
            num_workers=cfg.data.num_workers,
        )
    except (FileNotFoundError, ValueError) as exc:
        console(f"skipping the final evaluation: {exc}")
        return {}
    start = time.perf_counter()
    rows = {
        "pretrained": evaluate_encoder(
            method.backbone,
            eval_data,
            cfg.eval,
            device=device,
            progress=progress,
            seed=cfg.train.seed,
        )
    }
    if cfg.eval.baselines:
        torch.manual_seed(cfg.train.seed)
        info = data.dataset_info(cfg.data.dataset)
        random_init = create_method(cfg, in_channels=info.channels, image_size=crop).backbone.to(
            device
        )
        rows["random init"] = evaluate_encoder(
            random_init, eval_data, cfg.eval, device=device, progress=progress, seed=cfg.train.seed
        )
        if info.channels * crop * crop <= MAX_PIXEL_FEATURES:
            rows["raw pixels"] = knn_and_probe(
                eval_data.pixels("train"),
                eval_data.pixels("test"),
                cfg.eval,
                num_classes=eval_data.num_classes,
                seed=cfg.train.seed,
            )
    console(
        f"evaluation ({time.perf_counter() - start:.0f} s), {cfg.data.dataset} test split:\n"
        + results_table(rows)
    )
    return {"evaluation": rows}
