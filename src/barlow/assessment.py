"""Assessing an encoder on a labelled dataset: the evaluation data of a config, kNN and linear
probe of an encoder, the baselines, and the ``knn`` / ``linear`` commands.

The glue between a config, datasets (``data``), preprocessing (``augment``) and the maths of
judging features (``evaluate``: kNN, probes, the paper's protocol). Used by pretraining (online
kNN each epoch, the final evaluation) and by the commands that read a checkpoint.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from barlow import data, evaluate
from barlow.augment import EvalPreprocess, LinearEvalAugment, eval_sample_transform
from barlow.config import Config, EvalConfig, apply_overrides, from_dict
from barlow.encoder import build_method, crop_size
from barlow.logbook import console
from barlow.methods import Method


def encoder_preprocess(encoder_dataset: str, crop: int) -> EvalPreprocess:
    """How an encoder pretrained on ``encoder_dataset`` sees any image: that dataset's channels
    (grey and RGB converted), mean and std, at ``crop`` pixels."""
    seen = data.dataset_info(encoder_dataset)
    return EvalPreprocess(crop, seen.mean, seen.std, channels=seen.channels)


class _Transformed(Dataset[tuple[Tensor, int]]):
    """A dataset with a per-sample image transform (folders: resize + centre crop)."""

    def __init__(self, dataset: Dataset[tuple[Tensor, int]], transform: Any) -> None:
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image, label = self.dataset[index]
        return self.transform(image), label


def _tensor_batches(
    images: Tensor, labels: Tensor, batch_size: int
) -> Iterator[tuple[Tensor, Tensor]]:
    for start in range(0, len(images), batch_size):
        yield images[start : start + batch_size], labels[start : start + batch_size]


class _Reshuffled:
    def __init__(self, eval_data: EvalData, split: str, batch_size: int, seed: int) -> None:
        self.eval_data, self.split, self.batch_size = eval_data, split, batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        dataset = self.eval_data.train if self.split == "train" else self.eval_data.test
        in_memory = data.in_memory_images(dataset)
        if in_memory is not None:
            order = torch.randperm(len(in_memory[0]), generator=self.generator)
            yield from _tensor_batches(in_memory[0][order], in_memory[1][order], self.batch_size)
            return
        loader = DataLoader(
            _Transformed(dataset, eval_sample_transform(self.eval_data.crop_size)),
            batch_size=self.batch_size,
            shuffle=True,
            generator=self.generator,
            num_workers=self.eval_data.num_workers,
        )
        yield from loader


@dataclass
class EvalData:
    """The labelled train and test splits of a dataset, ready for feature extraction."""

    train: Dataset[tuple[Tensor, int]]
    test: Dataset[tuple[Tensor, int]]
    preprocess: EvalPreprocess
    crop_size: int
    num_classes: int
    num_workers: int = 0
    # what ``test`` holds: the test split, or the training images ``data.holdout`` held out
    test_split: str = "test split"

    @classmethod
    def build(
        cls,
        dataset: str,
        *,
        root: str | None = None,
        download: bool = False,
        crop_size: int | None = None,
        num_workers: int = 0,
        encoder_dataset: str | None = None,
        holdout: int = 0,
    ) -> EvalData:
        """``encoder_dataset``: the dataset the encoder was pretrained on, when it is another
        (transfer): its channels and normalisation are the encoder's input. ``holdout`` > 0:
        the test set is that many training images held out (``data.holdout``), the train set
        the rest."""
        info = data.dataset_info(dataset)
        train = data.build_dataset(dataset, split="train", root=root, download=download)
        test = data.build_dataset(dataset, split="test", root=root, download=download)
        if not (data.labelled(train) and data.labelled(test)):
            raise ValueError(
                f"dataset {dataset!r} has no labels, so kNN / linear accuracy cannot be measured; "
                "evaluate on a labelled dataset (class subfolders under train/ and val/)"
            )
        size = crop_size or info.image_size
        num_classes = info.num_classes or len(getattr(train, "classes", [])) or 0
        if num_classes < 2:
            raise ValueError(f"dataset {dataset!r} needs at least 2 classes to evaluate")
        preprocess = encoder_preprocess(encoder_dataset or dataset, size)
        if not holdout:
            return cls(train, test, preprocess, size, num_classes, num_workers)
        kept, held = data.holdout_indices(len(train), holdout)  # type: ignore[arg-type]
        return cls(
            data.subset_images(train, kept),
            data.subset_images(train, held),
            preprocess,
            size,
            num_classes,
            num_workers,
            test_split=f"{holdout} held-out training images (data.holdout)",
        )

    @classmethod
    def from_config(
        cls, cfg: Config, *, dataset: str | None = None, root: str | None = None
    ) -> EvalData:
        """The labelled splits of ``dataset`` (default: the run's own, at ``data.root``) at the
        run's crop size; another dataset than the run's is seen as the encoder saw its own."""
        other = dataset is not None and dataset != cfg.data.dataset
        return cls.build(
            dataset or cfg.data.dataset,
            root=root if dataset else (root or cfg.data.root),
            download=cfg.data.download,
            crop_size=crop_size(cfg),
            num_workers=cfg.data.num_workers,
            encoder_dataset=cfg.data.dataset if other else None,
            holdout=0 if other else cfg.data.holdout,
        )

    def batches(
        self, split: str, batch_size: int, indices: Tensor | None = None
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """(uint8 images, labels) batches in dataset order (only ``indices``, when given)."""
        dataset = self.train if split == "train" else self.test
        in_memory = data.in_memory_images(dataset)
        if in_memory is not None:
            images, labels = in_memory
            if indices is not None:
                images, labels = images[indices], labels[indices]
            yield from _tensor_batches(images, labels, batch_size)
            return
        if indices is not None:
            dataset = Subset(dataset, indices.tolist())
        loader = DataLoader(
            _Transformed(dataset, eval_sample_transform(self.crop_size)),
            batch_size=batch_size,
            num_workers=self.num_workers,
        )
        yield from loader

    def features(
        self,
        encoder: nn.Module,
        split: str,
        *,
        device: torch.device,
        batch_size: int,
        progress: bool,
        indices: Tensor | None = None,
    ) -> evaluate.Features:
        return evaluate.extract_features(
            encoder,
            self.batches(split, batch_size, indices),
            device=device,
            preprocess=self.preprocess,
            progress=f"features ({split})" if progress else False,
        )

    def feature_pair(
        self, encoder: nn.Module, *, device: torch.device, batch_size: int, progress: bool
    ) -> tuple[evaluate.Features, evaluate.Features]:
        """The encoder's features of the train and of the test split."""
        train, test = (
            self.features(encoder, split, device=device, batch_size=batch_size, progress=progress)
            for split in ("train", "test")
        )
        return train, test

    def pixels(self, split: str) -> evaluate.Features:
        """Raw normalised pixels as features (the no-learning baseline)."""
        images, labels = [], []
        for x, y in self.batches(split, 1024):
            images.append(self.preprocess(x).flatten(1))
            labels.append(y)
        return evaluate.Features(torch.cat(images), torch.cat(labels).long())


def knn_and_probe(
    train: evaluate.Features,
    test: evaluate.Features,
    cfg: EvalConfig,
    *,
    num_classes: int,
    seed: int = 0,
) -> dict[str, float]:
    """kNN top-1 and linear-probe top-1 accuracy on precomputed features."""
    knn = evaluate.knn_accuracy(
        train, test, k=cfg.knn_k, temperature=cfg.knn_temperature, num_classes=num_classes
    )
    probe = evaluate.linear_probe(train, test, epochs=cfg.probe_epochs, seed=seed)
    return {"knn_top1": knn, "linear_top1": probe["test_acc"]}


def evaluate_encoder(
    encoder: nn.Module,
    eval_data: EvalData,
    cfg: EvalConfig,
    *,
    device: torch.device,
    progress: bool = False,
    seed: int = 0,
) -> dict[str, float]:
    """kNN and linear-probe top-1 of ``encoder``'s frozen features."""
    train, test = eval_data.feature_pair(
        encoder, device=device, batch_size=cfg.batch_size, progress=progress
    )
    return knn_and_probe(train, test, cfg, num_classes=eval_data.num_classes, seed=seed)


MAX_PIXEL_FEATURES = 32 * 32 * 3  # raw-pixel baseline only where the probe stays cheap


def results_table(rows: dict[str, dict[str, float]]) -> str:
    """A Markdown table of kNN / linear accuracy per encoder."""
    lines = ["| encoder | kNN top-1 | linear top-1 |", "|---|---:|---:|"]
    for name, row in rows.items():
        lines.append(
            f"| {name} | {100 * row['knn_top1']:.1f} % | {100 * row['linear_top1']:.1f} % |"
        )
    return "\n".join(lines)


def knn_top1(
    encoder: nn.Module, eval_data: EvalData, cfg: Config, *, device: torch.device, progress: bool
) -> float:
    """Weighted kNN top-1 of ``encoder``'s features (``eval.knn_k``, ``eval.knn_temperature``)."""
    train, test = eval_data.feature_pair(
        encoder, device=device, batch_size=cfg.eval.batch_size, progress=progress
    )
    return knn_on_features(train, test, cfg, eval_data.num_classes)


def knn_on_features(
    train: evaluate.Features, test: evaluate.Features, cfg: Config, num_classes: int
) -> float:
    """Weighted kNN top-1 at the config's ``eval.knn_k`` and ``eval.knn_temperature``."""
    return evaluate.knn_accuracy(
        train, test, k=cfg.eval.knn_k, temperature=cfg.eval.knn_temperature, num_classes=num_classes
    )


def online_knn(
    encoder: nn.Module,
    eval_data: EvalData,
    cfg: Config,
    device: torch.device,
    classifier: Callable[[evaluate.Features], float] | None = None,
) -> dict[str, float]:
    """kNN top-1 of the current encoder on the labelled splits (the per-epoch monitor); with
    ``classifier`` (features of the test split → top-1), its accuracy on the same features as
    ``online_linear_top1``."""
    start = time.perf_counter()
    train, test = eval_data.feature_pair(
        encoder, device=device, batch_size=cfg.eval.batch_size, progress=False
    )
    top1 = knn_on_features(train, test, cfg, eval_data.num_classes)
    out = {"knn_top1": top1, "knn_time_s": time.perf_counter() - start}
    if classifier is not None:
        out["online_linear_top1"] = classifier(test)
    return out


def final_evaluation(
    method: Method, cfg: Config, *, device: torch.device, progress: bool
) -> dict[str, Any]:
    """kNN + linear probe of the pretrained encoder, and of the baselines when asked (a random
    initialisation of the same encoder, and the raw pixels where they are few enough)."""
    try:
        eval_data = EvalData.from_config(cfg)
    except (FileNotFoundError, ValueError) as exc:
        console(f"skipping the final evaluation: {exc}")
        return {}
    start, seed = time.perf_counter(), cfg.train.seed

    def judge(encoder: nn.Module) -> dict[str, float]:
        return evaluate_encoder(
            encoder, eval_data, cfg.eval, device=device, progress=progress, seed=seed
        )

    rows = {"pretrained": judge(method.backbone)}
    if cfg.eval.baselines:
        torch.manual_seed(seed)
        rows["random init"] = judge(build_method(cfg).backbone.to(device))
        info = data.dataset_info(cfg.data.dataset)
        if info.channels * crop_size(cfg) ** 2 <= MAX_PIXEL_FEATURES:
            rows["raw pixels"] = knn_and_probe(
                eval_data.pixels("train"),
                eval_data.pixels("test"),
                cfg.eval,
                num_classes=eval_data.num_classes,
                seed=seed,
            )
    console(
        f"evaluation ({time.perf_counter() - start:.0f} s), {cfg.data.dataset} "
        f"{eval_data.test_split}:\n" + results_table(rows)
    )
    return {"evaluation": rows, "evaluated_on": eval_data.test_split}


def load_pretrained(path: str | Path) -> tuple[Method, Config, dict[str, Any]]:
    """Rebuild the method saved in a ``barlow pretrain`` checkpoint (strict key check)."""
    from barlow import checkpoint

    state = checkpoint.load_checkpoint(path)
    for key in ("config", "method"):
        if key not in state:
            raise ValueError(f"{path} is not a barlow pretraining checkpoint (no {key!r} entry)")
    cfg = from_dict(state["config"])
    method = build_method(cfg)
    checkpoint.load_method_weights(method, state["method"], source=str(path))
    return method, cfg, state


def _eval_setup(
    path: str | Path, dataset: str | None, root: str | None, overrides: Sequence[str]
) -> tuple[Method, Config, EvalData, torch.device]:
    method, cfg, _ = load_pretrained(path)
    if overrides:
        cfg = from_dict(apply_overrides(cfg.to_dict(), overrides))
    eval_data = EvalData.from_config(cfg, dataset=dataset, root=root)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return method.to(device), cfg, eval_data, device


def run_knn(
    path: str | Path,
    *,
    dataset: str | None = None,
    root: str | None = None,
    overrides: Sequence[str] = (),
) -> dict[str, float]:
    """`barlow knn`: weighted kNN accuracy, printed and merged into the run's metrics.json."""
    method, cfg, eval_data, device = _eval_setup(path, dataset, root, overrides)
    acc = knn_top1(method.backbone, eval_data, cfg, device=device, progress=True)
    result = {"knn_top1": acc, "k": cfg.eval.knn_k, "temperature": cfg.eval.knn_temperature}
    print(f"kNN top-1 (k={cfg.eval.knn_k}, T={cfg.eval.knn_temperature}): {100 * acc:.2f} %")
    save_result(Path(path).parent / "metrics.json", {result_key("knn", dataset, cfg): result})
    return result


def result_key(name: str, dataset: str | None, cfg: Config) -> str:
    """The key of a result in ``metrics.json``: ``name`` on the run's own dataset, and
    ``name@<dataset>`` on another (transfer), so one never replaces the other."""
    if dataset is None or dataset == cfg.data.dataset:
        return name
    return f"{name}@{Path(dataset).name if os.sep in dataset else dataset}"


def save_result(path: Path, record: dict[str, Any]) -> None:
    """Merge ``record`` into the run's ``metrics.json`` (it was printed already); where that
    cannot be written (a read-only run directory or file system), say so and carry on."""
    try:
        evaluate.write_metrics(path, record)
    except OSError as error:
        if error.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        console(
            f"could not save the result in {path} ({error.strerror}); it is printed above only "
            "(copy the run directory somewhere writable to keep results beside it)"
        )


def run_linear(
    path: str | Path,
    *,
    dataset: str | None = None,
    root: str | None = None,
    protocol: str = "probe",
    overrides: Sequence[str] = (),
) -> dict[str, float]:
    """`barlow linear`: fast probe on frozen features, or the paper's protocol with augmentation."""
    method, cfg, eval_data, device = _eval_setup(path, dataset, root, overrides)
    backbone = method.backbone
    if protocol == "probe":
        train, test = eval_data.feature_pair(
            backbone, device=device, batch_size=cfg.eval.batch_size, progress=True
        )
        result = evaluate.linear_probe(
            train, test, epochs=cfg.eval.probe_epochs, seed=cfg.train.seed
        )
        print(f"linear probe top-1: {100 * result['test_acc']:.2f} %")
    elif protocol == "paper":
        pre = eval_data.preprocess
        result = evaluate.linear_eval(
            backbone,
            _Reshuffled(eval_data, "train", cfg.eval.batch_size, seed=cfg.train.seed),
            _Replayable(lambda: eval_data.batches("test", cfg.eval.batch_size)),
            num_classes=eval_data.num_classes,
            feature_dim=int(backbone.num_features),  # type: ignore[arg-type]
            device=device,
            train_transform=LinearEvalAugment(eval_data.crop_size, pre.mean, pre.std),
            test_preprocess=pre,
            epochs=cfg.eval.protocol_epochs,
            lr=cfg.eval.protocol_lr,
            progress=True,
        )
        print(f"linear evaluation (paper protocol) top-1: {100 * result['top1']:.2f} %")
    else:
        raise ValueError(f"unknown protocol {protocol!r}; choose probe or paper")
    key = result_key(f"linear_{protocol}", dataset, cfg)
    save_result(Path(path).parent / "metrics.json", {key: result})
    return result


class _Replayable:
    """Turns a generator function into an iterable that can be walked more than once."""

    def __init__(self, make: Any) -> None:
        self.make = make

    def __iter__(self) -> Iterator[Any]:
        return iter(self.make())
