"""Same epochs, several seeds: ``barlow pretrain`` vs a plain lightly loop on Fashion-MNIST.

For each seed, one run of each, one after the other in this process's run:

- barlow: ``barlow pretrain fashion-mnist --epochs E --set train.seed=S`` in a fresh process (its
  defaults: batched views, ``train.precision=auto``, channels_last), evaluated by its own final
  evaluation; online kNN off so that the epoch times are training only.
- plain loop: ``step_bench.PlainTrainer`` with the recipe's seed set to S — the same backbone,
  projector, optimizer hyper-parameters and schedule, torchvision views per sample in a DataLoader
  with ``--workers`` workers, ``lightly.loss.BarlowTwinsLoss``, lightly's LARS, fp32 — trained for E
  epochs and evaluated by the same ``assessment.evaluate_encoder`` on the same
  ``assessment.EvalData.from_config`` splits (weighted kNN k 200, linear probe).

Reports per seed and as mean ± standard deviation over seeds: kNN and linear top-1 on the 10,000
test images and the median seconds per training epoch; and the ratio of epoch times.

    PYTHONPATH=src python bench/parity_bench.py --epochs 3 --seeds 0 1 2 \
        --out bench/results/parity_fmnist.md

``--slice 6000,2000`` runs on the first 6,000 training / 2,000 test images (a quick check).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from barlow.assessment import EvalData, evaluate_encoder
from machine import command_line, cpu_name, emit_report, have_lightly, lightly_version
from methods_bench import run_method, write_slice
from step_bench import SETTINGS, PlainTrainer, recipe_config, training_images

CPU = torch.device("cpu")


@dataclass(frozen=True)
class Result:
    knn: float
    linear: float
    epoch_s: float  # median over epochs
    final_loss: float  # mean loss of the last epoch


def run_overrides(seed: int, root: Path | None) -> list[str]:
    """The recipe's settings that both loops change: the seed, and the slice's files."""
    return [f"train.seed={seed}"] + ([f'data.root="{root.resolve()}"'] if root else [])


def plain_loop(seed: int, epochs: int, workers: int, root: Path | None) -> Result:
    """Train the lightly loop for ``epochs`` epochs from ``seed`` and evaluate its backbone."""
    cfg = recipe_config(
        "fashion-mnist", None, [*run_overrides(seed, root), f"train.epochs={epochs}"]
    )
    images = training_images(SETTINGS["fmnist"], cfg, None)
    trainer = PlainTrainer(cfg, images, workers=(workers,))
    times, loss = [], float("nan")
    for epoch in range(epochs):
        start = time.perf_counter()
        loss_sum, steps = torch.zeros(()), 0
        for x1, x2 in trainer.loaders[workers]:
            loss_sum += trainer.train_step(x1, x2)
            steps += 1
        times.append(time.perf_counter() - start)
        loss = float(loss_sum) / max(steps, 1)
        print(
            f"[plain seed {seed}] epoch {epoch + 1}/{epochs}: loss {loss:.4g}, {times[-1]:.1f} s",
            file=sys.stderr,
            flush=True,
        )
    splits = EvalData.from_config(cfg)  # barlow's final evaluation reads the same
    accuracy = evaluate_encoder(trainer.backbone, splits, cfg.eval, device=CPU, seed=seed)
    return Result(accuracy["knn_top1"], accuracy["linear_top1"], statistics.median(times), loss)


def barlow_run(seed: int, epochs: int, runs: Path, root: Path | None) -> Result:
    overrides = run_overrides(seed, root)
    run = run_method(
        "barlow_twins", epochs, runs / f"barlow-seed{seed}", overrides, baselines=False
    )
    pretrained = run["evaluation"]["pretrained"]
    epoch_s = statistics.median(r["epoch_time_s"] for r in run["epochs"])
    last_loss = run["epochs"][-1]["loss"]
    return Result(pretrained["knn_top1"], pretrained["linear_top1"], epoch_s, last_loss)


def mean_sd(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    mean = statistics.fmean(values) * scale
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f}"


def report(
    args: argparse.Namespace, results: dict[str, dict[int, Result]], started: str, load: float
) -> str:
    data_note = (
        f"first {args.slice} train/test images" if args.slice else "60,000 train / 10,000 test"
    )
    lines = [
        f"# barlow vs a plain lightly loop on Fashion-MNIST: {args.epochs} epochs, "
        f"seeds {', '.join(map(str, args.seeds))}",
        "",
        f"Command: `{command_line()}`",
        "",
        f"- date: {started} – {datetime.datetime.now(datetime.UTC):%H:%M} UTC; "
        f"{os.cpu_count()} CPU cores ({cpu_name()}), torch {torch.__version__}, "
        f"lightly {lightly_version()}; load average (1 min) {load:.2f} before, "
        f"{os.getloadavg()[0]:.2f} after",
        f"- data: {data_note}; recipe `fashion-mnist` (small CNN, projector 1024-1024-1024, "
        "batch 256, LARS lr 0.4 per 256, η 0.02, wd 1e-4, 1 warm-up epoch, cosine)",
        "- barlow: `barlow pretrain fashion-mnist` defaults (batched views, precision auto, "
        f"channels_last); plain loop: torchvision views per sample, {args.workers} DataLoader "
        "worker(s), lightly's BarlowTwinsLoss and LARS, fp32",
        "- accuracy: `assessment.evaluate_encoder` for both (weighted kNN k 200, T 0.1; linear "
        "probe on frozen features); epoch time: median over the epochs, training only",
        "",
        "| seed | loop | kNN top-1 | linear top-1 | s / epoch | last-epoch loss |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for seed in args.seeds:
        for name, per_seed in results.items():
            r = per_seed[seed]
            lines.append(
                f"| {seed} | {name} | {100 * r.knn:.1f} | {100 * r.linear:.1f} | "
                f"{r.epoch_s:.0f} | {r.final_loss:.1f} |"
            )
    lines += ["", "| loop | kNN top-1 (%) | linear top-1 (%) | s / epoch |", "|---|---:|---:|---:|"]
    for name, per_seed in results.items():
        rs = list(per_seed.values())
        lines.append(
            f"| {name} | {mean_sd([r.knn for r in rs], 100)} | "
            f"{mean_sd([r.linear for r in rs], 100)} | {mean_sd([r.epoch_s for r in rs], 1, 0)} |"
        )
    barlow, plain = (list(per_seed.values()) for per_seed in results.values())
    speedup = statistics.fmean(p.epoch_s for p in plain) / statistics.fmean(
        b.epoch_s for b in barlow
    )
    knn_gap = statistics.fmean(100 * (b.knn - p.knn) for b, p in zip(barlow, plain, strict=True))
    lin_gap = statistics.fmean(
        100 * (b.linear - p.linear) for b, p in zip(barlow, plain, strict=True)
    )
    lines += [
        "",
        f"- epoch time, plain loop / barlow: **{speedup:.2f}×**",
        f"- barlow − plain loop, mean over seeds: kNN **{knn_gap:+.1f} pt**, linear "
        f"**{lin_gap:+.1f} pt**",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--workers", type=int, default=1, help="plain loop's DataLoader workers")
    parser.add_argument("--slice", help="TRAIN,TEST: use the first images only")
    parser.add_argument("--runs", type=Path, default=Path("runs/parity-bench"))
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the plain loop")
    parser.add_argument("--out", type=Path, help="markdown report (default: print only)")
    args = parser.parse_args()
    if args.epochs < 1 or args.workers < 0:
        parser.error("--epochs must be >= 1 and --workers >= 0")
    if not have_lightly():
        parser.error("the plain loop needs lightly: pip install lightly==1.6.0")
    torch.set_num_threads(args.threads)
    root = None
    if args.slice:
        train, test = (int(v) for v in args.slice.split(","))
        root = write_slice(args.runs / f"fashion-mnist-{train}-{test}", train, test)
    started = f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M}"
    load = os.getloadavg()[0]
    results: dict[str, dict[int, Result]] = {"barlow": {}, "plain loop (lightly)": {}}
    for seed in args.seeds:
        results["barlow"][seed] = barlow_run(seed, args.epochs, args.runs, root)
        results["plain loop (lightly)"][seed] = plain_loop(seed, args.epochs, args.workers, root)
    text = report(args, results, started, load)
    emit_report(text, args.out)


if __name__ == "__main__":
    main()
