"""``finetune(checkpoint, out)``: a pretrained encoder fine-tuned with a linear head on few labels.

The paper's semi-supervised protocol (Barlow Twins §4.2, the official ``evaluate.py --weights
finetune``): the backbone (in train mode, BatchNorm statistics updating) and a linear head
``Wh + b`` (W ~ N(0, 0.01²), b = 0) trained together with cross-entropy on a class-stratified
labelled subset (:mod:`barlow.subsets`), SGD with momentum, separate learning rates for the
backbone (``optim.lr``) and the head (``finetune.head_lr``), a cosine to 0, random resized crop +
flip. Beside it, on the same labels: the same architecture trained from scratch with the same
recipe, and a linear probe on the frozen pretrained encoder. All three are scored top-1 / top-5
on the test split. A second user of :class:`~barlow.training.loop.TrainingLoop`: each training is
an ordinary run directory (checkpoints, ``--resume``, ``metrics.jsonl``, under ``torchrun``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from barlow import __version__, cpu_share, data, distributed, evaluate
from barlow.assessment import EvalData, load_pretrained
from barlow.augment import LinearEvalAugment, eval_sample_transform
from barlow.compute import Precision, uses_channels_last
from barlow.config import Config, apply_overrides, from_dict, read_recipe
from barlow.encoder import build_method
from barlow.logbook import Logbook, Progress, console
from barlow.methods.base import StepOutput
from barlow.preemption import PreemptionSignals
from barlow.rundir import RunDir, run_lock
from barlow.subsets import LabelledSubset, labelled_subset
from barlow.training import resume as resuming
from barlow.training.guard import StepGuard
from barlow.training.loop import TrainingLoop
from barlow.training.setup import Run, assemble_run, config_loader, init_device
from barlow.training.state import TrainState

RECIPES = Path(__file__).resolve().parent.parent / "recipes" / "finetune"


class Classifier(nn.Module):
    """An encoder and a linear head; the step's loss is the cross-entropy on the labels.

    The head standardises the features first (BatchNorm without affine parameters, as MAE's
    linear probe does), then ``Wh + b`` with W ~ N(0, 0.01²), b = 0 (the official evaluation's
    init). Without the standardisation the head's learning rate depends on the encoder's feature
    scale: a small CNN pretrained on Fashion-MNIST gives features of norm ~24, and the paper's
    head rate (0.5) then drives the loss from 5 to 90 in three epochs (measured; from scratch,
    features of norm ~1 train fine).
    """

    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        linear = nn.Linear(feature_dim, num_classes)
        nn.init.normal_(linear.weight, std=0.01)
        nn.init.zeros_(linear.bias)
        self.head = nn.Sequential(nn.BatchNorm1d(feature_dim, affine=False), linear)

    def forward(self, batch: tuple[Tensor, Tensor]) -> StepOutput:
        images, labels = batch
        logits = self.head(self.backbone(images).flatten(1)).float()
        accuracy = (logits.argmax(1) == labels).float().mean()
        return StepOutput(F.cross_entropy(logits, labels), {"accuracy": accuracy.detach()})


class LabelledImages(Dataset[Any]):
    """The labelled subset, keyed ``(epoch, i)`` as the loop's order gives: ``((image, label),
    label)`` with the uint8 image at one size (image folders: resized and centre-cropped)."""

    def __init__(self, dataset: Any, indices: Tensor, crop_size: int) -> None:
        self.dataset, self.indices = dataset, indices
        in_memory = data.in_memory_images(dataset) is not None
        self.resize = None if in_memory else eval_sample_transform(crop_size)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        image, label = self.dataset[int(self.indices[key[1]])]
        if self.resize is not None:
            image = self.resize(image)
        return (image, label), label


# What fine-tuning takes from the pretraining run: its data, encoder and evaluation settings. Its
# optimizer and training settings (epochs, batch, max_steps, …) are the fine-tuning recipe's.
INHERITED = ("data", "model", "method", "eval")


def finetune_config(checkpoint_config: Config, recipe: str, overrides: Sequence[str]) -> Config:
    """The pretraining run's data, model, method and evaluation settings, with the fine-tuning
    recipe (a shipped name in ``recipes/finetune/`` or a TOML path) and the overrides on top."""
    shipped = RECIPES / f"{recipe}.toml"
    raw = read_recipe(str(shipped) if shipped.is_file() else recipe)
    pretrained = checkpoint_config.to_dict()
    merged: dict[str, Any] = {section: pretrained[section] for section in INHERITED}
    for section, values in raw.items():
        merged[section] = {**merged.get(section, {}), **values}
    return from_dict(apply_overrides(merged, overrides))


def subset_batch(cfg: Config, subset: LabelledSubset, world: int) -> Config:
    """``cfg`` with ``train.batch_size`` cut to the subset (1 % of a small set is a few images)."""
    fits = len(subset.indices) // world * world
    if cfg.train.batch_size <= fits:
        return cfg
    if fits < 2 * world:
        raise ValueError(
            f"the labelled subset {subset.source} holds {len(subset.indices)} image(s); "
            f"fine-tuning needs at least {2 * world} (2 per process)"
        )
    if distributed.is_main_process():
        console(f"train.batch_size {cfg.train.batch_size} > {fits} labelled images: using {fits}")
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=fits))


def classifier_run(
    cfg: Config,
    classifier: Classifier,
    images: LabelledImages,
    augment: LinearEvalAugment,
    device: torch.device,
) -> Run:
    """The :class:`Run` of a classifier on the labelled images: views drawn on the device by the
    linear-evaluation augmentation, the head at ``finetune.head_lr / optim.lr`` of the rate."""
    loader, order = config_loader(images, cfg, device)
    channels_last = uses_channels_last(cfg.train.channels_last, device)

    def prepare(inputs: Any, epoch: int, batch: int) -> tuple[Tensor, Tensor]:
        x, labels = inputs
        x = augment(x.to(device, non_blocking=True))
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, labels.to(device, non_blocking=True)

    return assemble_run(
        cfg,
        device=device,
        module=classifier.to(device),
        loader=loader,
        order=order,
        prepare=prepare,
        precision=Precision.resolve(cfg.train.precision, device),
        channels_last=channels_last,
        lr_scales={"head": cfg.finetune.head_lr / cfg.optim.lr},
    )


def finetune(
    checkpoint: str | Path,
    out: str | Path,
    *,
    recipe: str = "paper",
    overrides: Sequence[str] = (),
    dataset: str | None = None,
    root: str | None = None,
    resume: bool = False,
    argv: Sequence[str] | None = None,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Fine-tune the encoder of a ``barlow pretrain`` checkpoint on a labelled subset of its
    dataset (or of ``dataset``: transfer), and score it beside the baselines; the results, also
    merged into ``out/metrics.json`` under "finetune". The from-scratch baseline trains in
    ``out/scratch/``."""
    method, pretrained_cfg, _ = load_pretrained(checkpoint)
    cfg = finetune_config(pretrained_cfg, recipe, overrides)
    with cpu_share.shared_cpu(cfg.train.threads):
        device, main = init_device(cfg), distributed.is_main_process()
        eval_data = EvalData.from_config(pretrained_cfg, dataset=dataset, root=root)
        target = dataset or pretrained_cfg.data.dataset
        subset = labelled_subset(cfg.finetune.labels, eval_data.train, target)
        cfg = subset_batch(cfg, subset, distributed.world_size())
        if main:
            console(
                f"fine-tuning {checkpoint} on {target}: {len(subset.indices)} labelled images "
                f"({subset.source}), {cfg.train.epochs} epochs at batch {cfg.train.batch_size}"
            )
        job = FinetuneJob(cfg, eval_data, subset, device, argv, progress, resume)
        results: dict[str, Any] = {"labels": subset.source, "labelled_images": len(subset.indices)}
        if cfg.finetune.baselines:
            results["linear probe (frozen)"] = job.probe(method.backbone)
        results["fine-tuned"] = job.train(method.backbone, RunDir(Path(out)))
        if cfg.finetune.baselines:
            torch.manual_seed(pretrained_cfg.train.seed)
            scratch = build_method(pretrained_cfg).backbone
            results["from scratch"] = job.train(scratch, RunDir(Path(out) / "scratch"))
        if main:
            evaluate.write_metrics(Path(out) / "metrics.json", {"finetune": results})
            console(finetune_table(results, target))
    distributed.barrier()
    return results


@dataclasses.dataclass
class FinetuneJob:
    """What the trainings of one ``finetune`` call share: config, data, subset, device."""

    cfg: Config
    eval_data: EvalData
    subset: LabelledSubset
    device: torch.device
    argv: Sequence[str] | None
    progress: bool | None
    resume: bool

    def train(self, backbone: nn.Module, run_dir: RunDir) -> dict[str, float]:
        """Train ``backbone`` + a fresh head into ``run_dir`` (resuming when asked); test scores."""
        main = distributed.is_main_process()
        with run_lock(run_dir) if main else contextlib.nullcontext():
            point = resuming.find_resume_point(
                run_dir, self.cfg, resume=self.resume, overwrite=False
            )
            torch.manual_seed(self.cfg.train.seed)  # the same head for every encoder
            feature_dim = int(backbone.num_features)  # type: ignore[arg-type]
            classifier = Classifier(backbone, feature_dim, self.eval_data.num_classes)
            images = LabelledImages(
                self.eval_data.train, self.subset.indices, self.eval_data.crop_size
            )
            pre = self.eval_data.preprocess
            augment = LinearEvalAugment(self.eval_data.crop_size, pre.mean, pre.std)
            run = classifier_run(self.cfg, classifier, images, augment, self.device)
            state = resuming.restored_state(run, point)
            if not state.finished(self.cfg.train.epochs, self.cfg.train.max_steps):
                self.fit(run, run_dir, state, point)
            scores = self.score(classifier) if main else {}
        return scores

    def fit(
        self, run: Run, run_dir: RunDir, state: TrainState, point: resuming.ResumePoint | None
    ) -> None:
        main = distributed.is_main_process()
        record = {
            "config": self.cfg.to_dict(),
            "argv": list(self.argv or sys.argv),
            "version": __version__,
        }
        if main and state.global_step == 0:
            run_dir.write_config(record)
        show = main and (self.progress if self.progress is not None else True)
        logbook = Logbook.for_run(run_dir.path, self.cfg, enabled=main)
        with PreemptionSignals() as signals, contextlib.closing(logbook):
            guard = StepGuard.from_config(self.cfg, device=self.device, signals=signals)
            TrainingLoop(
                run,
                run_dir,
                state,
                guard=guard,
                logbook=logbook,
                progress=Progress(enabled=show),
                last_saved=str(point.path) if point is not None else None,
                run_record=record,
            ).fit()

    def score(self, classifier: Classifier) -> dict[str, float]:
        data_ = self.eval_data
        return evaluate.classifier_accuracy(
            classifier.backbone,
            classifier.head,
            data_.batches("test", self.cfg.eval.batch_size),
            preprocess=data_.preprocess,
            device=self.device,
            num_classes=data_.num_classes,
        )

    def probe(self, backbone: nn.Module) -> dict[str, float]:
        """The linear probe (``evaluate.linear_probe``) on the frozen encoder's features of the
        labelled subset; top-1 on the test split (main process)."""
        if not distributed.is_main_process():
            return {}
        backbone.to(self.device)
        batch = self.cfg.eval.batch_size
        subset = self.eval_data.features(
            backbone,
            "train",
            device=self.device,
            batch_size=batch,
            progress=False,
            indices=self.subset.indices,  # the labelled images only
        )
        test = self.eval_data.features(
            backbone, "test", device=self.device, batch_size=batch, progress=False
        )
        probe = evaluate.linear_probe(subset, test, epochs=self.cfg.eval.probe_epochs, seed=0)
        return {"top1": probe["test_acc"]}


def finetune_table(results: dict[str, Any], dataset: str) -> str:
    """The Markdown table of the three encoders' test accuracy."""
    lines = [
        f"{dataset}, {results['labelled_images']} labelled images ({results['labels']}):",
        "| encoder | top-1 | top-5 |",
        "|---|---:|---:|",
    ]
    for name in ("fine-tuned", "linear probe (frozen)", "from scratch"):
        if results.get(name):
            row = results[name]
            top5 = f"{100 * row['top5']:.1f} %" if "top5" in row else "—"
            lines.append(f"| {name} | {100 * row['top1']:.1f} % | {top5} |")
    return "\n".join(lines)
