"""Whole Barlow Twins training steps on CPU: barlow's own step against a plain loop with lightly.

images/s counts source images per second (each giving two views) over whole training steps:
fetching the batch, drawing the views, forward and backward of both views, loss, optimizer and
schedule. Two settings:

- fmnist: the Fashion-MNIST CPU recipe (``recipes/fashion-mnist.toml``): small CNN, projector
  1024-1024-1024, batch 256, LARS lr 0.4 (per 256 images), η 0.02, weight decay 1e-4, the
  "barlow-gray" views, on the 60,000 training images.
- resnet18: the ``cifar10-resnet18`` recipe's model and optimizer (ResNet-18 with the 32-px stem,
  projector 2048-2048-2048, batch 256, LARS lr 0.3, bias lr 0.0072) and its "barlow-small" views,
  on random uint8 32-px colour images (CIFAR-10 is not on the benchmark machine); barlow's views
  drawn on whole batches, the loader in the main process (``data.augment_on=device``,
  ``data.num_workers=0``).

Paths, measured side by side in one run: every path runs once per round, rounds interleaved, the
median round counts.

- barlow: the step ``barlow pretrain`` runs, from the library itself: the ``Run`` that
  ``barlow.training.setup`` builds from the recipe (``pretraining_data``'s views,
  ``pretraining_loader``'s ``RawImages`` batches in ``EpochOrder``, ``DeviceViews``,
  ``build_method``'s ``BarlowTwins``, ``assemble_run``'s LARS and ``Schedule``) over the bench's
  images, stepped by ``TrainingLoop.step`` on the loader's batches in ``run.order``.
- barlow's precision and memory format: the shipped defaults (``train.precision=auto``: bf16
  autocast on a CPU with native bf16, channels_last), then fp32 channels_last, then fp32 NCHW (the
  step before these habits), to show what each one gives.
- plain loop, W workers (W = 0, 1, 2): what a user writes with the peers: the same backbone and
  projector modules, torchvision.transforms.v2 per sample (``augment.per_sample_transform``, the
  same view distributions) in a shuffling DataLoader over the in-memory uint8 tensor, lightly's
  ``BarlowTwinsLoss`` and ``LARS`` (weights / biases+BN groups, as the recipe; torch SGD where
  lightly has no LARS) and lightly's ``CosineWarmupScheduler``.

Accuracy after the same epochs, both loops trained and evaluated over several seeds, is
``parity_bench.py``'s.

    PYTHONPATH=src python bench/step_bench.py --out bench/results/step_cpu.md
"""

from __future__ import annotations

import argparse
import datetime
import functools
import itertools
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from barlow import data
from barlow.augment import MultiView, ViewSpec
from barlow.compute import flush_denormals, uses_channels_last
from barlow.config import Config, load_config
from barlow.encoder import build_method, crop_size
from barlow.logbook import Logbook, Progress
from barlow.methods import BarlowTwins
from barlow.optim import scaled_lr
from barlow.preemption import PreemptionSignals
from barlow.rundir import RunDir
from barlow.training.guard import StepGuard
from barlow.training.loop import TrainingLoop
from barlow.training.setup import (
    PretrainingData,
    Schedule,
    build_pretraining_run,
    pretraining_data,
)
from barlow.training.state import TrainState
from machine import command_line, cpu_name, emit_report, have_lightly, lightly_version

WORKERS = (0, 1, 2)
CPU = torch.device("cpu")


@dataclass(frozen=True)
class Setting:
    key: str
    title: str
    recipe: str  # shipped recipe giving model, method, optimizer and views
    random_images: int  # 0: the real Fashion-MNIST training images
    drain_prefetch: bool  # warm-up long enough to use up the batches workers prefetched
    overrides: tuple[str, ...] = ()  # --set overrides of the recipe, for every path


SETTINGS = {
    "fmnist": Setting(
        "fmnist",
        "Fashion-MNIST CPU recipe: 28 px gray, small CNN, projector 1024-1024-1024",
        "fashion-mnist",
        random_images=0,
        drain_prefetch=True,
    ),
    # A ResNet-18 step takes seconds: the ≤ 4 prefetched batches are worth a few per cent of one
    # step, not worth 2·W more untimed steps. The recipe draws views per sample in 8 workers;
    # barlow's rows here draw them on whole batches, the loader in the main process.
    "resnet18": Setting(
        "resnet18",
        "32 px colour, ResNet-18 (cifar10-resnet18 recipe) on random uint8 images",
        "cifar10-resnet18",
        random_images=8192,
        drain_prefetch=False,
        overrides=("data.augment_on=device", "data.num_workers=0"),
    ),
}


def recipe_config(recipe: str, batch: int | None, extra: Sequence[str] = ()) -> Config:
    overrides = [f"train.batch_size={batch}"] if batch else []
    return load_config(recipe, [*overrides, *extra])


def training_images(setting: Setting, cfg: Config, limit: int | None) -> data.TensorImages:
    if setting.random_images:
        channels, size = data.dataset_info(cfg.data.dataset).channels, crop_size(cfg)
        n = limit or setting.random_images
        g = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=g)
        return data.TensorImages(images, torch.full((n,), -1), [])
    dataset = data.build_dataset(cfg.data.dataset, split="unlabeled", root=cfg.data.root)
    return limited(dataset, limit)


def limited(dataset: Any, limit: int | None) -> data.TensorImages:
    if not isinstance(dataset, data.TensorImages):
        raise ValueError("step_bench needs an in-memory dataset (data.TensorImages)")
    if limit is None:
        return dataset
    return data.TensorImages(dataset.images[:limit], dataset.labels[:limit], dataset.classes)


def pretraining_source(cfg: Config, images: data.TensorImages) -> PretrainingData:
    """``pretraining_data``: the recipe's views as pretraining draws them, over the bench's
    in-memory ``images`` (the first ``--limit`` ones, or random ones: the resnet18 setting's
    CIFAR-10 is not on the benchmark machine)."""
    return pretraining_data(cfg, CPU, dataset=images)


class LibraryStep:
    """``barlow pretrain``'s step in one CPU process: the library's own :class:`Run`, built by
    ``build_pretraining_run`` over the bench's images (its banner goes to stderr), stepped by
    ``TrainingLoop.step`` on the loader's batches in ``run.order``, as ``run_epoch`` walks them.

    Left out, because they cost nothing measurable per step: what ``run_epoch`` does around the
    step (the JSON-lines record every 20 steps, the progress bar).
    """

    def __init__(self, cfg: Config, images: data.TensorImages, run_dir: RunDir) -> None:
        self.run, _ = build_pretraining_run(cfg, CPU, None, run_dir, dataset=images)
        self.channels_last = uses_channels_last(cfg.train.channels_last, CPU)
        views = self.run.prepare
        self.views_ready = 0.0

        def prepare(inputs: Any, epoch: int, batch: int) -> Any:
            prepared = views(inputs, epoch, batch)
            self.views_ready = time.perf_counter()  # the "until views ready" column
            return prepared

        self.run.prepare = prepare
        guard = StepGuard(
            skip_nonfinite=0,
            skip_corrupt=False,
            abort_on_collapse=False,
            device=CPU,
            signals=PreemptionSignals(),  # not entered: no handler installed
        )
        self.loop = TrainingLoop(
            self.run,
            run_dir,  # step writes nothing there
            TrainState(),
            guard=guard,
            logbook=Logbook(run_dir.path, enabled=False),
            progress=Progress(enabled=False),
        )
        self.run.model.train()
        self.batches = self._batches()

    def _batches(self) -> Iterator[tuple[int, int, Any]]:
        run, guard = self.run, self.loop.guard
        for epoch in itertools.count():
            run.order.set_epoch(epoch)
            for i, (inputs, _, dropped) in enumerate(run.loader):
                where = f"batch {i + 1} of epoch {epoch + 1}"
                yield epoch, i, guard.usable_batch(inputs, dropped, where=where)

    @property
    def habits(self) -> str:
        layout = "channels_last" if self.channels_last else "NCHW"
        return f"{self.run.precision.name}, {layout}"

    @property
    def total_steps(self) -> int:
        """The schedule's steps: the learning rate is not defined past them."""
        return self.run.schedule.total_steps

    def step(self) -> tuple[float, float]:
        """One training step; returns (seconds until the views are ready, seconds in all)."""
        start = time.perf_counter()
        with flush_denormals(CPU):  # pretrain's: around the loop, batches included
            epoch, i, inputs = next(self.batches)
            self.loop.step(inputs, epoch, i)
        return self.views_ready - start, time.perf_counter() - start


class TwoViews(Dataset[tuple[Tensor, ...]]):
    """Per-sample views of in-memory uint8 images (torchvision.transforms.v2 in the loader)."""

    def __init__(self, images: Tensor, specs: Sequence[ViewSpec]) -> None:
        self.images, self.views = images, MultiView(specs)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, ...]:
        return self.views(self.images[index])


class PlainTrainer:
    """A plain training loop with the peers: lightly's loss, LARS and schedule, per-sample views.

    Same backbone and projector modules (and initial weights) as barlow's path, taken from the
    method ``build_method`` makes; the recipe's hyper-parameters, views and schedule length
    (``train.epochs``); biases and BatchNorm parameters get weight decay 0, which lightly's LARS
    also takes as "no trust-ratio scaling" (the recipe's split).
    """

    def __init__(self, cfg: Config, images: data.TensorImages, *, workers: Sequence[int]) -> None:
        from lightly.loss import BarlowTwinsLoss
        from lightly.utils.scheduler import CosineWarmupScheduler

        batch = cfg.train.batch_size
        torch.manual_seed(cfg.train.seed)  # barlow's path draws the same initial weights
        method = build_method(cfg)
        if not isinstance(method, BarlowTwins):
            raise ValueError(
                f"the plain loop is Barlow Twins with lightly's loss; the recipe trains "
                f"{cfg.method.name}: choose a barlow_twins recipe"
            )
        self.backbone, self.projector = method.backbone, method.projector
        self.model = nn.Sequential(self.backbone, self.projector).train()
        self.criterion = BarlowTwinsLoss(lambda_param=method.lambd, gather_distributed=False)
        self.optimizer, self.optimizer_name = self._optimizer(cfg)
        dataset = TwoViews(images.images, pretraining_source(cfg, images).specs)
        self.loaders = {
            w: DataLoader(
                dataset,
                batch_size=batch,
                shuffle=True,
                drop_last=True,
                num_workers=w,
                persistent_workers=w > 0,
            )
            for w in workers
        }
        self.schedule = Schedule.from_config(cfg, len(images) // batch)
        self.scheduler = CosineWarmupScheduler(
            self.optimizer,
            warmup_epochs=self.schedule.warmup_steps,
            max_epochs=self.schedule.total_steps,
            end_value=cfg.optim.final_lr_ratio,
        )
        self.batches = {w: self._batches(loader) for w, loader in self.loaders.items()}

    def _optimizer(self, cfg: Config) -> tuple[torch.optim.Optimizer, str]:
        lr = scaled_lr(cfg.optim.lr, cfg.train.batch_size)
        bias_lr = (
            scaled_lr(cfg.optim.bias_lr, cfg.train.batch_size)
            if cfg.optim.bias_lr is not None
            else lr
        )
        params = list(self.model.parameters())
        groups = [
            {"params": [p for p in params if p.ndim > 1], "weight_decay": cfg.optim.weight_decay},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0, "lr": bias_lr},
        ]
        try:
            from lightly.utils.lars import LARS
        except ImportError:
            sgd = torch.optim.SGD(groups, lr=lr, momentum=cfg.optim.momentum)
            return sgd, "torch.optim.SGD (lightly has no LARS)"
        lars = LARS(groups, lr=lr, momentum=cfg.optim.momentum, trust_coefficient=cfg.optim.eta)
        return lars, f"lightly.utils.lars.LARS (trust coefficient {cfg.optim.eta})"

    @staticmethod
    def _batches(loader: DataLoader[Any]) -> Iterator[tuple[Tensor, ...]]:
        while True:
            yield from loader

    def train_step(self, x1: Tensor, x2: Tensor) -> Tensor:
        z1, z2 = self.model(x1), self.model(x2)
        loss: Tensor = self.criterion(z1, z2)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if self.scheduler.last_epoch < self.schedule.total_steps:
            self.scheduler.step()
        return loss.detach()

    def step(self, workers: int) -> tuple[float, float]:
        """One training step; returns (seconds until the views are ready, seconds in all)."""
        start = time.perf_counter()
        x1, x2 = next(self.batches[workers])
        inputs_s = time.perf_counter() - start
        self.train_step(x1, x2)
        return inputs_s, time.perf_counter() - start


@dataclass
class Contender:
    """One measured path; ``rates`` (images/s) and the input figures get one entry per round."""

    name: str
    views: str
    step: Callable[[], tuple[float, float]]
    warmup: int
    rates: list[float] = field(default_factory=list)
    input_ms: list[float] = field(default_factory=list)  # per step, until the views are ready
    input_shares: list[float] = field(default_factory=list)  # the same, as a share of the step

    @property
    def label(self) -> str:
        return f"{self.name}, {self.views}"


def measure(path: Contender, steps: int, batch: int) -> None:
    """``path.warmup`` untimed steps, then ``steps`` timed ones: one round of one path."""
    for _ in range(path.warmup):
        path.step()
    inputs_s = total_s = 0.0
    for _ in range(steps):
        i, t = path.step()
        inputs_s, total_s = inputs_s + i, total_s + t
    path.rates.append(steps * batch / total_s)
    path.input_ms.append(1000 * inputs_s / steps)
    path.input_shares.append(inputs_s / total_s)


# barlow's step as shipped, then without each of its CPU habits (bf16 autocast, channels_last)
BARLOW_VARIANTS: tuple[tuple[str, ...], ...] = (
    (),
    ("train.precision=fp32",),
    ("train.precision=fp32", "train.channels_last=false"),
)


def contenders(
    setting: Setting,
    cfg: Config,
    images: data.TensorImages,
    *,
    batch: int | None,
    planned_steps: int,
    run_dir: RunDir,
) -> tuple[list[Contender], str]:
    """barlow's step per precision / memory format, and the plain loop per worker count."""
    paths = []
    for overrides in BARLOW_VARIANTS:
        variant = recipe_config(setting.recipe, batch, [*setting.overrides, *overrides])
        barlow = LibraryStep(variant, images, run_dir)
        if planned_steps > barlow.total_steps:
            raise ValueError(
                f"{setting.key}: {planned_steps} steps per path exceed the schedule's "
                f"{barlow.total_steps} (train.epochs × {barlow.run.steps_per_epoch} batches of "
                f"{len(images)} images); raise --limit or lower --steps / --rounds"
            )
        paths.append(Contender("barlow", f"batched ({barlow.habits})", barlow.step, 1))
    if not have_lightly():
        print("note: lightly is not importable; the plain-loop rows are skipped", file=sys.stderr)
        return paths, "lightly not installed: plain loop skipped"
    plain = PlainTrainer(cfg, images, workers=WORKERS)
    for w in WORKERS:
        # DataLoader's default prefetch_factor 2: up to 2·W batches wait at the start of a round
        warmup = 1 + 2 * w if setting.drain_prefetch else 1
        views = f"per sample, {w} worker{'s' * (w != 1)}"
        step: Callable[[], tuple[float, float]] = functools.partial(plain.step, w)
        paths.append(Contender("plain loop (lightly)", views, step, warmup))
    return paths, plain.optimizer_name


def run_setting(
    setting: Setting, *, steps: int, rounds: int, threads: int, batch: int | None, limit: int | None
) -> list[str]:
    """Measure one setting; returns its section of the report."""
    cfg = recipe_config(setting.recipe, batch, setting.overrides)
    batch = cfg.train.batch_size
    images = training_images(setting, cfg, limit)
    if len(images) < batch:
        raise ValueError(f"{len(images)} images are fewer than one batch of {batch}; raise --limit")
    views = pretraining_source(cfg, images).recipe
    with tempfile.TemporaryDirectory(prefix="step_bench-") as scratch:
        paths, optimizer_name = contenders(
            setting,
            cfg,
            images,
            batch=batch,
            planned_steps=rounds * (1 + steps),
            run_dir=RunDir(Path(scratch)),
        )
        for r in range(rounds):
            for path in paths:
                measure(path, steps, batch)
                print(
                    f"  {setting.key} round {r + 1}: {path.label}: {path.rates[-1]:.0f} images/s",
                    file=sys.stderr,
                )
    median = {p.label: statistics.median(p.rates) for p in paths}
    plain_rates = [v for k, v in median.items() if k.startswith("plain")]
    reference = max(plain_rates) if plain_rates else float("nan")
    warmup_note = (
        "1 untimed step (1 + 2·W for the plain loop: the batches its W workers prefetched)"
        if setting.drain_prefetch
        else "1 untimed step"
    )
    lines = [
        f"## {setting.title}",
        "",
        f"- recipe `{setting.recipe}`, batch {batch}, {len(images)} images"
        + (" (random uint8)" if setting.random_images else "")
        + f"; views `{views}` at {crop_size(cfg)} px"
        + (f"; `--set {' '.join(setting.overrides)}`" if setting.overrides else ""),
        f"- plain loop optimizer: {optimizer_name}",
        f"- {steps} timed step{'s' * (steps != 1)} per path per round after {warmup_note}; "
        f"median of {rounds} round{'s' * (rounds != 1)}",
        "",
        "| path | views | images/s (median) | min–max over rounds | until views ready, per step "
        "| × plain best |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for p in paths:
        rate = median[p.label]
        ready = (
            f"{statistics.median(p.input_ms):.0f} ms "
            f"({100 * statistics.median(p.input_shares):.0f} %)"
        )
        lines.append(
            f"| {p.name} | {p.views} | {rate:,.0f} | {min(p.rates):,.0f}–{max(p.rates):,.0f} "
            f"| {ready} | {rate / reference:.2f}× |"
        )
    barlow_rate = median[paths[0].label]
    lines += [
        "",
        f"- barlow as shipped / plain loop (best workers): **{barlow_rate / reference:.2f}×**",
    ]
    for p in paths[1 : len(BARLOW_VARIANTS)]:
        ratio = median[p.label] / reference
        lines.append(f"- {p.label} / plain loop (best workers): {ratio:.2f}×")
    return [*lines, ""]


def machine_lines(threads: int, load_before: tuple[float, ...]) -> list[str]:
    fmt = ", ".join
    return [
        f"- command: `{command_line()}`",
        f"- date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC",
        f"- machine: {os.cpu_count()} CPU cores ({cpu_name()}), Python {platform.python_version()}",
        f"- torch {torch.__version__}, torchvision {torchvision.__version__}, "
        f"lightly {lightly_version()}",
        f"- threads: torch.set_num_threads({threads}) in the training process; DataLoader workers "
        "1 thread each (PyTorch's default in workers)",
        f"- load average (1, 5, 15 min) before: {fmt(f'{x:.2f}' for x in load_before)}; "
        f"after: {fmt(f'{x:.2f}' for x in os.getloadavg())}",
    ]


def throughput_report(args: argparse.Namespace) -> str:
    load_before = os.getloadavg()
    sections: list[str] = []
    for key in args.settings:
        steps = args.steps if key == "fmnist" else args.resnet_steps
        sections += run_setting(
            SETTINGS[key],
            steps=steps,
            rounds=args.rounds,
            threads=args.threads,
            batch=args.batch,
            limit=args.limit,
        )
    header = [
        "# Training step throughput on CPU: barlow against a plain loop with lightly",
        "",
        *machine_lines(args.threads, load_before),
        "- images/s: source images per second, each giving two views, over whole steps (batch, "
        "views, forward + backward of both views, loss, optimizer, schedule); "
        "× plain best: over the best worker count of the plain loop",
        "- until views ready: time per step spent getting the batch and drawing its views (for "
        "the plain loop with workers: waiting for them), and its share of the step (medians)",
        "",
    ]
    notes = [
        "barlow: the step of `barlow pretrain`, from the library itself: the `Run` that "
        "`training.setup` builds (`pretraining_data` views and `pretraining_loader`: `RawImages` "
        "batches in `EpochOrder` through a DataLoader in the main process, `DeviceViews` = "
        '`BatchedMultiView`; `build_method`\'s `BarlowTwins`, loss `path="auto"`; '
        "`assemble_run`'s LARS and warm-up + cosine `Schedule`), stepped by "
        "`TrainingLoop.step` (its finite-loss vote, the one host sync) with denormals flushed "
        "(`compute.flush_denormals`). Its rows name the precision (`train.precision=auto` "
        "resolves to bf16 autocast on a CPU with native bf16) and the memory format. The shipped "
        "cifar10-resnet18 recipe draws its views per sample in 8 workers "
        '(`data.augment_on = "workers"`); the resnet18 rows run barlow\'s batched views instead, '
        "the loader in the main process (`--set data.augment_on=device data.num_workers=0`).",
        "",
        "plain loop: the same backbone and projector modules and initial weights, "
        "torchvision.transforms.v2 per sample (`augment.per_sample_transform`: the same view "
        "distributions), a shuffling DataLoader over the in-memory uint8 tensor, "
        "`lightly.loss.BarlowTwinsLoss` (same loss definition as barlow's), lightly's LARS and "
        "`CosineWarmupScheduler`.",
        "",
        "Timings move with the machine's load (the load average above); compare rows of one run "
        "only.",
    ]
    return "\n".join([*header, *sections, *notes]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="write the Markdown report here too")
    parser.add_argument(
        "--settings", nargs="+", choices=tuple(SETTINGS), default=list(SETTINGS), metavar="NAME"
    )
    parser.add_argument("--steps", type=int, default=20, help="timed steps per round (fmnist)")
    parser.add_argument(
        "--resnet-steps", type=int, default=2, help="timed steps per round (resnet18)"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the trainer")
    parser.add_argument("--batch", type=int, help="override the recipes' batch of 256 (checks)")
    parser.add_argument(
        "--limit", type=int, help="use the first N training (and evaluation) images only"
    )
    args = parser.parse_args()
    for name in ("steps", "resnet_steps", "rounds", "threads", "batch", "limit"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    torch.set_num_threads(args.threads)
    report = throughput_report(args)
    emit_report(report, args.out)


if __name__ == "__main__":
    main()
