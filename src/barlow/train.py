"""``pretrain(config)``: the self-supervised training loop.

Hand-written rather than delegated to a trainer framework because the SSL step is this project's
craft: LARS groups with separate learning rates, the method's ``after_step`` (EMA, queues) right
after the optimizer, exact distributed gradients, and checkpoints that hold the whole state.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from barlow import __version__, checkpoint, data, distributed
from barlow.augment import MultiView, ViewSpec, build_specs, recipe_for
from barlow.batched_views import BatchedMultiView
from barlow.config import Config
from barlow.heads import mlp_num_parameters
from barlow.health import CollapseError, CollapseWatch, embedding_health
from barlow.logbook import Logbook, Progress, console
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


class ViewDataset(Dataset[tuple[tuple[Tensor, ...], int]]):
    """Pairs (or K-tuples) of augmented views of each image, with its label (−1 if none).

    Indexed by ``(epoch, index)`` (see :class:`EpochOrder`); the views of that image in that epoch
    are drawn from a generator seeded with :func:`sample_seed`.
    """

    def __init__(self, dataset: Dataset[tuple[Tensor, int]], views: MultiView, seed: int) -> None:
        self.dataset, self.views, self.seed = dataset, views, seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> tuple[tuple[Tensor, ...], int]:
        epoch, index = key
        image, label = self.dataset[index]
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

    def __init__(self, dataset: Dataset[tuple[Tensor, int]]) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, int]:
        return self.dataset[key[1]]


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


@dataclass
class Precision:
    """Autocast dtype (None: full fp32) and whether fp16 loss scaling is needed."""

    dtype: torch.dtype | None

    @classmethod
    def resolve(cls, name: str, device: torch.device) -> Precision:
        if device.type != "cuda":
            if name in ("bf16", "fp16"):
                raise ValueError(
                    f"train.precision={name} needs a GPU; on {device.type} use fp32 or auto"
                )
            return cls(None)
        if name == "auto":
            return cls(torch.bfloat16 if torch.cuda.is_bf16_supported() else None)
        return cls({"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name])

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager[Any]:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.dtype)


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


def _check_resumable(saved: dict[str, Any], cfg: Config) -> None:
    """A checkpoint can only continue the same experiment: compare what shapes the model."""
    current = cfg.to_dict()
    keys = [("method",), ("model",), ("train", "batch_size"), ("data", "dataset")]
    diffs = []
    for path in keys:
        a: Any = saved.get("config", {})
        b: Any = current
        for part in path:
            a, b = a.get(part) if isinstance(a, dict) else None, b.get(part)
        if a != b:
            diffs.append(f"{'.'.join(path)}: checkpoint {a!r} vs config {b!r}")
    if diffs:
        raise ValueError("the checkpoint belongs to a different run:\n  " + "\n  ".join(diffs))


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
        num_workers=cfg.data.num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=cfg.data.num_workers > 0,
    )
    return loader, order


def _nonfinite_message(
    loss: Tensor,
    logs: dict[str, Tensor],
    step: int,
    epoch: int,
    last_saved: str | None,
    out: Path,
) -> str:
    terms = {k: float(v) for k, v in logs.items()}
    return (
        f"loss is {float(loss.detach())} at step {step} (epoch {epoch + 1}); terms {terms}; "
        f"last good checkpoint: {last_saved or 'none yet'}. Try a lower optim.lr, a longer "
        "optim.warmup_epochs, or train.precision=fp32/bf16 instead of fp16; "
        "train.skip_nonfinite=N skips up to N such steps"
    )


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
    device = resolve_device(cfg.train.device, distributed.init_from_env())
    world, rank, main = distributed.world_size(), distributed.rank(), distributed.is_main_process()
    if cfg.train.batch_size % world:
        raise ValueError(
            f"train.batch_size={cfg.train.batch_size} is not divisible by the {world} processes; "
            f"choose a multiple of {world}"
        )
    if cfg.train.batch_size // world < 2:
        raise ValueError(f"train.batch_size={cfg.train.batch_size} leaves < 2 images per process")
    resume_from = check_output_dir(out, cfg, resume=resume, overwrite=overwrite) if main else None
    resume_from = distributed.broadcast_object(resume_from)  # type: ignore[assignment]
    show = main and (progress if progress is not None else True)

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
    loader, sampler = _epoch_loader(
        ViewDataset(train_set, MultiView(specs), seed=cfg.train.seed)
        if device_views is None
        else RawImages(train_set),
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

    method = create_method(cfg, in_channels=info.channels, image_size=crop).to(device)
    if len(specs) != method.num_views:  # an instance attribute: CMC's number of views is a choice
        raise ValueError(
            f"view recipe {recipe!r} makes {len(specs)} views but {cfg.method.name} takes "
            f"{method.num_views}; set data.views to a recipe with {method.num_views} views"
        )
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
            f"{device}, {steps_per_epoch} steps/epoch"
        )
    model: nn.Module = method
    if world > 1:
        if device.type == "cuda" and cfg.train.sync_batchnorm:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if device.type == "cuda" and cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
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
    precision = Precision.resolve(cfg.train.precision, device)
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
    if resume_from is not None:
        state = checkpoint.load_checkpoint(resume_from, map_location="cpu")
        _check_resumable(state, cfg)
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
    last_saved: str | None = "the one resumed from" if resume_from is not None else None
    skipped = 0
    epoch_metrics: dict[str, Any] = {}
    stopped_early = False
    signals = PreemptionSignals()
    with signals, contextlib.closing(logbook):
        for epoch in range(start_epoch, cfg.train.epochs):
            first_batch = start_batch if epoch == start_epoch else 0
            sampler.set_epoch(epoch, start_batch=first_batch)
            step_model.train()
            epoch_start = time.perf_counter()
            loss_sum = torch.zeros((), device=device)
            steps_done = 0
            description = f"epoch {epoch + 1}/{cfg.train.epochs}"
            batches = bar.wrap(loader, total=len(loader), description=description)
            for i, (inputs, _) in enumerate(batches, start=first_batch):
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
                if device.type == "cuda" and cfg.train.channels_last:
                    views = [v.contiguous(memory_format=torch.channels_last) for v in views]
                with precision.autocast(device):
                    output = step_model(views)
                loss = output.loss
                # One host sync per step, agreed by all ranks: a non-finite loss must stop the run
                # (or skip the step) before the optimizer writes NaN into the weights, and a
                # preemption signal must stop every rank at the same step.
                nonfinite, preempt = distributed.any_ranks(
                    not bool(torch.isfinite(loss).item()), signals.requested, device=device
                )
                if nonfinite:
                    skipped += 1
                    message = _nonfinite_message(
                        loss, output.logs, global_step, epoch, last_saved, out
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
                **_representation_health(method, views[0]),
            }
            alarm = collapse_watch.update(epoch_metrics)
            if distributed.any_rank(alarm is not None, device):
                if cfg.train.abort_on_collapse:  # every rank stops, so none waits in a collective
                    raise CollapseError(f"epoch {epoch + 1}: {alarm or 'collapse on another rank'}")
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
                console(
                    f"epoch {epoch + 1}/{cfg.train.epochs}: loss {epoch_metrics['loss']:.4g}, "
                    f"{epoch_time:.1f} s, {epoch_metrics['images_per_s']:.0f} images/s{knn}"
                )
            if (epoch + 1) % cfg.train.checkpoint_every == 0 or is_last:
                save(epoch + 1)
                last_saved = f"{out / CHECKPOINT_NAME} (epoch {epoch + 1})"
            distributed.barrier()
            if is_last:
                break

    results: dict[str, Any] = {"pretrain": epoch_metrics}
    if main:
        checkpoint.export_backbone(method.backbone.state_dict(), out / "backbone.safetensors")
        if cfg.eval.final:
            results.update(final_evaluation(method, cfg, device=device, crop=crop, progress=show))
            from barlow.evaluate import write_metrics

            write_metrics(out / "metrics.json", results)
    distributed.barrier()
    return results


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
