"""A :class:`Run`: everything a training loop needs, built from a :class:`Config`.

``build_pretraining_run`` makes the self-supervised one (views of unlabelled images, a method);
another job (fine-tuning on labels) builds its own :class:`Run` from its own parts and hands it
to the same :class:`~barlow.training.loop.TrainingLoop`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from barlow import __version__, data, distributed
from barlow.augment import CropRamp, MultiView, ViewSpec, build_specs, recipe_for
from barlow.compute import Precision, images_channels_last, to_channels_last, uses_channels_last
from barlow.config import Config, crop_ramp_epochs
from barlow.encoder import build_method, crop_size
from barlow.heads import mlp_num_parameters
from barlow.logbook import console
from barlow.methods import Method, method_class
from barlow.optim import build_optimizer, scaled_lr, set_learning_rate, warmup_cosine
from barlow.rundir import RunDir
from barlow.training.epoch_data import DeviceViews, EpochOrder, RawImages, ViewDataset, epoch_loader
from barlow.training.memory import MemoryEstimate, memory_estimate
from barlow.training.resume import ResumePoint, take_weights


def resolve_device(
    name: str, distributed_device: torch.device, *, setting: str = "train.device"
) -> torch.device:
    """``train.device`` (or the ``setting`` named in errors, e.g. ``--device``): ``auto`` is
    ``distributed_device``, the device ``distributed.init_from_env`` chose."""
    if name == "auto":
        return distributed_device
    try:
        device = torch.device(name)
    except RuntimeError:
        device = torch.device("meta")  # refused below, naming the choices
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(
            f"{setting}={name!r} is not a device barlow trains on; use auto, cpu, cuda, "
            "cuda:N or mps"
        )
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{setting}={name} but no CUDA GPU is visible; use {setting}=cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{setting}={name} but MPS is not available; use {setting}=cpu")
    return device


def init_device(cfg: Config) -> torch.device:
    """Join the process group (under torchrun), pick the device, check the batch splits."""
    device = resolve_device(
        cfg.train.device, distributed.init_from_env(timeout_s=cfg.train.dist_timeout_s)
    )
    world, batch = distributed.world_size(), cfg.train.batch_size
    if batch % world:
        raise ValueError(
            f"train.batch_size={batch} is not divisible by the {world} processes; "
            f"choose a multiple of {world}"
        )
    if batch // world < 2:
        raise ValueError(
            f"train.batch_size={batch} leaves < 2 images per process with {world} "
            f"processes (the loss standardises along the batch); choose at least {2 * world}"
        )
    return device


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
    (tests/training/test_setup_distributed.py measures it).
    """
    model = to_channels_last(method) if channels_last else method
    if world > 1:
        if device.type == "cuda" and sync_batchnorm:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    return model


@dataclass(frozen=True)
class Schedule:
    """The per-step learning rate: linear warm-up, then cosine to ``base_lr · final_lr_ratio``."""

    base_lr: float
    total_steps: int
    warmup_steps: int
    final_lr_ratio: float

    @classmethod
    def from_config(cls, cfg: Config, steps_per_epoch: int) -> Schedule:
        """``optim.lr`` scaled per 256 images; a warm-up longer than the run is cut to the run
        (a recipe shortened from the command line, ``--epochs 1``, keeps working)."""
        total = cfg.train.epochs * steps_per_epoch
        warmup = round(cfg.optim.warmup_epochs * steps_per_epoch)
        if warmup > total and distributed.is_main_process():
            console(
                f"optim.warmup_epochs={cfg.optim.warmup_epochs} is longer than the run "
                f"({cfg.train.epochs} epochs): warming up over the whole run"
            )
        base = scaled_lr(cfg.optim.lr, cfg.train.batch_size)
        return cls(base, total, min(warmup, total), cfg.optim.final_lr_ratio)

    def lr(self, step: int) -> float:
        return warmup_cosine(
            step,
            total_steps=self.total_steps,
            warmup_steps=self.warmup_steps,
            base_lr=self.base_lr,
            final_lr_ratio=self.final_lr_ratio,
        )

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """Set every parameter group's learning rate for ``step``; return the base one."""
        lr = self.lr(step)
        set_learning_rate(optimizer, lr)
        return lr


def build_optimizer_for(
    cfg: Config, module: nn.Module, lr_scales: Mapping[str, float] | None = None
) -> torch.optim.Optimizer:
    """``cfg.optim`` over ``module``'s parameters (biases and norms at ``optim.bias_lr``;
    ``lr_scales``: rate multipliers of named submodules, see ``optim.parameter_groups``)."""
    bias_lr = cfg.optim.bias_lr if cfg.optim.bias_lr is not None else cfg.optim.lr
    return build_optimizer(
        cfg.optim.name,
        module,
        lr=scaled_lr(cfg.optim.lr, cfg.train.batch_size),
        weight_decay=cfg.optim.weight_decay,
        momentum=cfg.optim.momentum,
        bias_lr_scale=bias_lr / cfg.optim.lr,
        eta=cfg.optim.eta,
        lr_scales=lr_scales,
    )


# What a batch from the loader becomes before the model sees it: (inputs, epoch, batch) -> input
Prepare = Callable[[Any, int, int], Any]


@dataclass
class Run:
    """Everything the training loop needs, for any job: the model as the step calls it
    (``model``: DDP / compiled wrapper of ``module``; ``model(prepare(batch)) -> StepOutput``),
    the module itself (weights, buffers, ``after_step``), optimizer, scaler, schedule, data."""

    cfg: Config
    device: torch.device
    module: nn.Module
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    precision: Precision
    schedule: Schedule
    loader: DataLoader[Any]
    order: EpochOrder
    prepare: Prepare

    @property
    def steps_per_epoch(self) -> int:
        """Batches in a whole epoch (``len(loader)`` counts only those left after a resume)."""
        return self.order.batches

    @property
    def images(self) -> Any:
        """The training images under the loader's view wrapper (``ViewDataset``, ``RawImages``)."""
        return getattr(self.loader.dataset, "dataset", self.loader.dataset)


@dataclass(frozen=True)
class PretrainingData:
    """The unlabelled images and how their views are drawn."""

    dataset: Any
    recipe: str
    specs: tuple[ViewSpec, ...]
    device_views: DeviceViews | None
    ramp: CropRamp | None = None


def crop_ramp(cfg: Config, full: int) -> CropRamp | None:
    """``data.start_crop_size`` as a :class:`CropRamp` to the ``full`` side (None: off); the
    ramp ends at ``data.crop_ramp_epochs``, else half of ``train.epochs``."""
    start = cfg.data.start_crop_size
    if start is None:
        return None
    return CropRamp(start=start, full=full, epochs=crop_ramp_epochs(cfg))


def pretraining_data(
    cfg: Config, device: torch.device, dataset: Dataset[Any] | None = None
) -> PretrainingData:
    """The training images (``dataset``, else ``data.dataset``'s unlabelled split) and the view
    recipe (the method's own, fit to the images, unless ``data.views`` names one)."""
    info, crop = data.dataset_info(cfg.data.dataset), crop_size(cfg)
    family = method_class(cfg.method.name).views
    recipe = cfg.data.views or recipe_for(family, channels=info.channels, image_size=crop)
    specs = build_specs(
        recipe, crop_size=crop, mean=info.mean, std=info.std, changes=cfg.data.view_changes
    )
    ramp = crop_ramp(cfg, crop)
    if dataset is None:
        dataset = data.build_dataset(
            cfg.data.dataset, split="unlabeled", root=cfg.data.root, download=cfg.data.download
        )
        if cfg.data.holdout:
            dataset = data.without_holdout(dataset, cfg.data.dataset, cfg.data.holdout)
        if cfg.data.train_subset is not None:
            dataset = data.sampled_images(dataset, cfg.data.train_subset)
    device_views = None
    if cfg.data.augment_on == "device":
        if data.in_memory_images(dataset) is None:
            raise ValueError(
                f"data.augment_on=device needs a dataset held in memory as one uint8 tensor "
                f"(digits, fashion-mnist, cifar10, cifar100, stl10); {cfg.data.dataset!r} is "
                "read from files: use data.augment_on=workers"
            )
        device_views = DeviceViews(
            specs,
            seed=cfg.train.seed,
            world=distributed.world_size(),
            rank=distributed.rank(),
            device=device,
            ramp=ramp,
        )
    return PretrainingData(dataset, recipe, specs, device_views, ramp)


def view_preparer(views: DeviceViews | None, device: torch.device, channels_last: bool) -> Prepare:
    """Loader batch → the list of views the method takes (drawn on the device, or moved)."""

    def prepare(inputs: Any, epoch: int, batch: int) -> list[Tensor]:
        if views is not None:
            out = views(inputs, epoch=epoch, batch=batch)
        else:
            out = [v.to(device, non_blocking=True) for v in inputs]
        return images_channels_last(out) if channels_last else out

    return prepare


def pretraining_loader(
    cfg: Config, source: PretrainingData, device: torch.device
) -> tuple[DataLoader[Any], EpochOrder]:
    skip = cfg.data.skip_corrupt
    dataset = (
        ViewDataset(
            source.dataset,
            MultiView(source.specs),
            seed=cfg.train.seed,
            skip_corrupt=skip,
            ramp=source.ramp,
        )
        if source.device_views is None
        else RawImages(source.dataset, skip_corrupt=skip)
    )
    world = distributed.world_size()
    loader, order = config_loader(dataset, cfg, device)
    if len(loader) == 0:
        images, fits = len(source.dataset), len(source.dataset) // world * world
        fix = (
            f"lower train.batch_size to at most {fits}"
            if fits >= max(2, 2 * world)
            else f"it needs at least {max(2, 2 * world)} images (2 per process); add images"
        )
        raise ValueError(
            f"dataset {cfg.data.dataset!r} has {images} image(s), fewer than one batch of "
            f"{cfg.train.batch_size}; {fix}"
        )
    return loader, order


def config_loader(
    dataset: Dataset[Any], cfg: Config, device: torch.device
) -> tuple[DataLoader[Any], EpochOrder]:
    """:func:`epoch_data.epoch_loader` of ``dataset`` for this process, at the config's global
    batch, seed and workers (any job)."""
    world = distributed.world_size()
    return epoch_loader(
        dataset,
        local_batch=cfg.train.batch_size // world,
        world=world,
        rank=distributed.rank(),
        seed=cfg.train.seed,
        num_workers=cfg.data.num_workers,
        device=device,
    )


def check_views(method: Method, source: PretrainingData, cfg: Config) -> None:
    # num_views is an instance attribute: CMC's number of views is a choice
    if len(source.specs) != method.num_views:
        raise ValueError(
            f"view recipe {source.recipe!r} makes {len(source.specs)} views but "
            f"{cfg.method.name} takes {method.num_views}; set data.views to a recipe with "
            f"{method.num_views} views"
        )


def assemble_run(
    cfg: Config,
    *,
    device: torch.device,
    module: nn.Module,
    loader: DataLoader[Any],
    order: EpochOrder,
    prepare: Prepare,
    precision: Precision,
    channels_last: bool,
    lr_scales: Mapping[str, float] | None = None,
) -> Run:
    """Wrap ``module`` for the step and give it its optimizer, scaler and schedule (any job;
    ``lr_scales``: rate multipliers of named submodules, e.g. a fine-tuned classifier's head)."""
    model = wrap_for_training(
        module,
        device=device,
        world=distributed.world_size(),
        channels_last=channels_last,
        sync_batchnorm=cfg.train.sync_batchnorm,
    )
    step_model: nn.Module = torch.compile(model) if cfg.train.compile else model  # type: ignore[assignment]
    return Run(
        cfg=cfg,
        device=device,
        module=module,
        model=step_model,
        optimizer=build_optimizer_for(cfg, module, lr_scales),
        scaler=torch.amp.GradScaler(device.type, enabled=precision.dtype == torch.float16),
        precision=precision,
        schedule=Schedule.from_config(cfg, order.batches),
        loader=loader,
        order=order,
        prepare=prepare,
    )


def build_pretraining_run(
    cfg: Config,
    device: torch.device,
    point: ResumePoint | None,
    run_dir: RunDir,
    dataset: Dataset[Any] | None = None,
) -> tuple[Run, MemoryEstimate]:
    """The self-supervised :class:`Run` of ``cfg`` over ``dataset`` (default: the config's),
    a weights-only resume point's weights loaded into the fresh method; and its memory
    preflight estimate."""
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
    source = pretraining_data(cfg, device, dataset)
    loader, order = pretraining_loader(cfg, source, device)
    method = build_method(cfg)
    world = distributed.world_size()
    estimate = memory_estimate(
        method, global_batch=cfg.train.batch_size, world=world, optimizer=cfg.optim.name
    )
    if point is not None and point.weights_only:
        take_weights(method, point, run_dir)
    method = method.to(device)
    check_views(method, source, cfg)
    precision = Precision.resolve(cfg.train.precision, device)
    channels_last = uses_channels_last(cfg.train.channels_last, device)
    if distributed.is_main_process():
        console(banner(cfg, method, source, len(loader), device, precision, channels_last))
        console(estimate.summary())
    run = assemble_run(
        cfg,
        device=device,
        module=method,
        loader=loader,
        order=order,
        prepare=view_preparer(source.device_views, device, channels_last),
        precision=precision,
        channels_last=channels_last,
    )
    return run, estimate


def banner(
    cfg: Config,
    method: Method,
    source: PretrainingData,
    steps_per_epoch: int,
    device: torch.device,
    precision: Precision,
    channels_last: bool,
) -> str:
    """The first line of a run: what trains on what, where, how."""
    projector = cfg.method.params.get("projector")
    extra = ""
    if isinstance(projector, str):
        params = mlp_num_parameters(method.backbone.num_features, projector)  # type: ignore[arg-type]
        extra = f", projector {projector}: {params / 1e6:.1f} M parameters"
    layout = ", channels_last" if channels_last else ""
    ramp = source.ramp
    side = (
        f"{crop_size(cfg)} px"
        if ramp is None
        else f"{ramp.start}→{ramp.full} px over {ramp.epochs} epochs"
    )
    return (
        f"barlow {__version__}: {cfg.method.name} on {cfg.data.dataset} "
        f"({len(source.dataset)} images, views {source.recipe!r} at {side}), "
        f"{cfg.model.backbone}{extra}; {distributed.world_size()} process(es) on {device} "
        f"({precision.name}{layout}), {steps_per_epoch} steps/epoch"
    )
