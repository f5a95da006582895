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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from barlow import __version__, checkpoint, data, distributed
from barlow.augment import MultiView, build_specs, recipe_for
from barlow.config import Config
from barlow.heads import mlp_num_parameters
from barlow.logbook import Logbook, Progress, console
from barlow.methods import METHODS, Method, create_method
from barlow.optim import build_optimizer, scaled_lr, set_learning_rate, warmup_cosine
from barlow.report import (
    MAX_PIXEL_FEATURES,
    EvalData,
    evaluate_encoder,
    knn_and_probe,
    results_table,
)

CHECKPOINT_NAME = "checkpoint.pt"


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the run stops before anything non-finite is saved."""


class ViewDataset(Dataset[tuple[tuple[Tensor, ...], int]]):
    """Pairs (or K-tuples) of augmented views of each image, with its label (−1 if none)."""

    def __init__(self, dataset: Dataset[tuple[Tensor, int]], views: MultiView) -> None:
        self.dataset, self.views = dataset, views

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[tuple[Tensor, ...], int]:
        image, label = self.dataset[index]
        return self.views(image), label


@dataclass
class Precision:
    """Autocast dtype (None: full fp32) and whether fp16 loss scaling is needed."""

    dtype: torch.dtype | None

    @classmethod
    def resolve(cls, name: str, device: torch.device) -> Precision:
        if device.type != "cuda":
            if name in ("bf16", "fp16"):
                raise ValueError(
                    f"train.precision={name} needs a GPU; on {device.type} use precision=fp32 or auto"
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
        if not ckpt.exists():
            raise FileNotFoundError(
                f"--resume given but {ckpt} does not exist; drop --resume to start a new run"
            )
        return ckpt
    if (ckpt.exists() or config_file.exists()) and not overwrite:
        raise FileExistsError(
            f"{out_dir} already holds a run; pass --resume to continue it, --overwrite to replace "
            "it, or choose another --out"
        )
    if overwrite:
        for name in (CHECKPOINT_NAME, "metrics.jsonl", "metrics.json", "config.json"):
            (out_dir / name).unlink(missing_ok=True)
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
    dataset: Dataset[Any], cfg: Config, *, world: int, rank: int, device: torch.device
) -> tuple[DataLoader[Any], DistributedSampler[Any]]:
    local_batch = cfg.train.batch_size // world
    # The sampler makes the data order a pure function of (seed, epoch, rank, world size); it is
    # used in one process too so that resuming and scaling out see the same order.
    sampler = DistributedSampler(
        dataset, num_replicas=world, rank=rank, shuffle=True, seed=cfg.train.seed, drop_last=True
    )
    loader = DataLoader(
        dataset,
        batch_size=local_batch,
        sampler=sampler,
        drop_last=True,  # the loss divides by the true batch size, but BN needs full batches
        num_workers=cfg.data.num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=cfg.data.num_workers > 0,
    )
    return loader, sampler


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
    distributed.barrier()
    show = main and (progress if progress is not None else True)

    torch.manual_seed(cfg.train.seed + rank)  # augmentations differ per rank; DDP syncs weights

    info = data.dataset_info(cfg.data.dataset)
    crop = cfg.data.crop_size or info.image_size
    method_cls = METHODS[cfg.method.name]
    recipe = cfg.data.views or recipe_for(method_cls.views, channels=info.channels, image_size=crop)
    specs = build_specs(recipe, crop_size=crop, mean=info.mean, std=info.std)
    if len(specs) != method_cls.num_views:
        raise ValueError(
            f"view recipe {recipe!r} makes {len(specs)} views but {cfg.method.name} takes "
            f"{method_cls.num_views}"
        )
    train_set = data.build_dataset(
        cfg.data.dataset, split="unlabeled", root=cfg.data.root, download=cfg.data.download
    )
    loader, sampler = _epoch_loader(
        ViewDataset(train_set, MultiView(specs)), cfg, world=world, rank=rank, device=device
    )
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ValueError(
            f"dataset {cfg.data.dataset!r} has {len(train_set)} images, fewer than one batch of "  # type: ignore[arg-type]
            f"{cfg.train.batch_size}; lower train.batch_size"
        )

    method = create_method(cfg, in_channels=info.channels, image_size=crop).to(device)
    if main:
        projector = cfg.method.params.get("projector")
        extra = ""
        if isinstance(projector, str):
            params = mlp_num_parameters(method.backbone.num_features, projector)  # type: ignore[arg-type]
            extra = f", projector {projector}: {params / 1e6:.1f} M parameters"
        console(
            f"barlow {__version__}: {cfg.method.name} on {cfg.data.dataset} ({len(train_set)} images, "  # type: ignore[arg-type]
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
    start_epoch, global_step = 0, 0
    if resume_from is not None or (resume and not main):
        state = checkpoint.load_checkpoint(out / CHECKPOINT_NAME, map_location="cpu")
        _check_resumable(state, cfg)
        method.load_state_dict(state["method"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"]) if state.get("scaler") else None
        checkpoint.set_rng_state(state["rng"])
        start_epoch, global_step = int(state["epoch"]), int(state["global_step"])
        if main:
            console(
                f"resumed from {out / CHECKPOINT_NAME} at epoch {start_epoch}, step {global_step}"
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

    def save(epoch: int) -> None:
        if not main:
            return
        checkpoint.save_checkpoint(
            {
                "format_version": checkpoint.FORMAT_VERSION,
                "barlow_version": __version__,
                "config": cfg.to_dict(),
                "epoch": epoch,
                "global_step": global_step,
                "method": method.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler.is_enabled() else {},
                "rng": checkpoint.rng_state(),
            },
            out / CHECKPOINT_NAME,
        )

    last_saved = start_epoch if resume_from is not None else None
    epoch_metrics: dict[str, Any] = {}
    try:
        for epoch in range(start_epoch, cfg.train.epochs):
            sampler.set_epoch(epoch)
            step_model.train()
            epoch_start = time.perf_counter()
            loss_sum = torch.zeros((), device=device)
            steps_done = 0
            description = f"epoch {epoch + 1}/{cfg.train.epochs}"
            for i, (views, _) in enumerate(
                bar.wrap(loader, total=steps_per_epoch, description=description)
            ):
                lr = warmup_cosine(
                    global_step,
                    total_steps=total_steps,
                    warmup_steps=warmup_steps,
                    base_lr=base_lr,
                    final_lr_ratio=cfg.optim.final_lr_ratio,
                )
                set_learning_rate(optimizer, lr)
                views = [v.to(device, non_blocking=True) for v in views]
                if device.type == "cuda" and cfg.train.channels_last:
                    views = [v.contiguous(memory_format=torch.channels_last) for v in views]
                with precision.autocast(device):
                    output = step_model(views)
                loss = output.loss
                # One host sync per step: a non-finite loss must stop the run before the
                # optimizer writes NaN into the weights (and then into a checkpoint).
                if not torch.isfinite(loss).item():
                    terms = {k: float(v) for k, v in output.logs.items()}
                    last = (
                        f"{out / CHECKPOINT_NAME} (epoch {last_saved})"
                        if last_saved
                        else "none yet"
                    )
                    raise NonFiniteLossError(
                        f"loss is {loss.item()} at step {global_step} (epoch {epoch + 1}); terms {terms}; "
                        f"last good checkpoint: {last}. Try a lower optim.lr, a longer "
                        "optim.warmup_epochs, or train.precision=fp32/bf16 instead of fp16."
                    )
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                global_step += 1
                method.after_step(global_step / total_steps)
                loss_sum += loss.detach()
                steps_done += 1
                if global_step % cfg.train.log_every == 0 or i == steps_per_epoch - 1:
                    elapsed = time.perf_counter() - epoch_start
                    fields = {
                        "epoch": epoch + (i + 1) / steps_per_epoch,
                        "loss": loss.detach(),
                        **output.logs,
                        "lr": lr,
                        "images_per_s": (i + 1) * cfg.train.batch_size / max(elapsed, 1e-9),
                    }
                    logbook.write(fields, step=global_step)
                    bar.update(i + 1, steps_per_epoch, description, fields)
                if cfg.train.max_steps is not None and global_step >= cfg.train.max_steps:
                    break
            epoch_time = time.perf_counter() - epoch_start
            mean_loss = distributed.all_reduce_mean(loss_sum / max(steps_done, 1))
            epoch_metrics = {
                "epoch": epoch + 1,
                "loss": float(mean_loss),
                "epoch_time_s": epoch_time,
                "images_per_s": steps_done * cfg.train.batch_size / epoch_time,
            }
            is_last = epoch + 1 == cfg.train.epochs or (
                cfg.train.max_steps is not None and global_step >= cfg.train.max_steps
            )
            every = cfg.eval.online_knn_every
            if eval_data is not None and every and ((epoch + 1) % every == 0 or is_last):
                knn_start = time.perf_counter()
                train_f = eval_data.features(
                    method.backbone,
                    "train",
                    device=device,
                    batch_size=cfg.eval.batch_size,
                    progress=False,
                )
                test_f = eval_data.features(
                    method.backbone,
                    "test",
                    device=device,
                    batch_size=cfg.eval.batch_size,
                    progress=False,
                )
                from barlow.evaluate import knn_accuracy

                epoch_metrics["knn_top1"] = knn_accuracy(
                    train_f,
                    test_f,
                    k=cfg.eval.knn_k,
                    temperature=cfg.eval.knn_temperature,
                    num_classes=eval_data.num_classes,
                )
                epoch_metrics["knn_time_s"] = time.perf_counter() - knn_start
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
                last_saved = epoch + 1
            distributed.barrier()
            if is_last:
                break
    finally:
        logbook.close()

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
