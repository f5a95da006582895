"""What ``model.feature_grid`` costs: training steps and the final evaluation, G = 1, 2, 3.

The grid only changes small_cnn's last pooling (8w·G² features instead of 8w), so the encoder's
compute is the same; what can grow is the projector's first layer (8w·G² inputs) and the
evaluation (kNN similarities and the linear probe over 8w·G²-wide features). Measured side by
side in one run, rounds interleaved, the median round counts:

- training: ``barlow pretrain``'s step (``step_bench.LibraryStep``) on the ``fashion-mnist-fast``
  recipe with ``--set model.feature_grid=G``, on the Fashion-MNIST training images;
- evaluation: ``assessment.knn_and_probe`` (weighted kNN k 200, L-BFGS linear probe) on
  60,000 × D train and 10,000 × D test features, D = 256·G², drawn as a 10-class Gaussian mixture
  (the time depends on D and the iteration count, not on what the features hold).

    PYTHONPATH=src:bench python bench/feature_grid_cost.py --out bench/results/feature_grid_cost.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from barlow import assessment, evaluate
from barlow.config import EvalConfig
from barlow.rundir import RunDir
from machine import command_line, cpu_name, emit_report, simd_flags
from step_bench import SETTINGS, LibraryStep, recipe_config, training_images

GRIDS = (1, 2, 3)


def mixture(n: int, dim: int, seed: int) -> evaluate.Features:
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(10, dim, generator=torch.Generator().manual_seed(99))
    labels = torch.randint(0, 10, (n,), generator=g)
    return evaluate.Features(means[labels] + 3 * torch.randn(n, dim, generator=g), labels)


def training_rates(steps: int, rounds: int) -> dict[int, list[float]]:
    cfgs = {
        g: recipe_config("fashion-mnist-fast", None, [f"model.feature_grid={g}"]) for g in GRIDS
    }
    images = training_images(SETTINGS["fmnist"], cfgs[1], None)
    rates: dict[int, list[float]] = {g: [] for g in GRIDS}
    with tempfile.TemporaryDirectory(prefix="grid_cost-") as scratch:
        paths = {g: LibraryStep(cfgs[g], images, RunDir(Path(scratch) / str(g))) for g in GRIDS}
        for r in range(rounds):
            for g, path in paths.items():
                path.step()  # untimed
                start = time.perf_counter()
                for _ in range(steps):
                    path.step()
                rates[g].append(steps * cfgs[g].train.batch_size / (time.perf_counter() - start))
                print(f"  round {r + 1}: grid {g}: {rates[g][-1]:.0f} images/s", file=sys.stderr)
    return rates


def evaluation_seconds(rounds: int) -> dict[int, list[float]]:
    seconds: dict[int, list[float]] = {g: [] for g in GRIDS}
    sets = {g: (mixture(60000, 256 * g * g, 0), mixture(10000, 256 * g * g, 1)) for g in GRIDS}
    for r in range(rounds):
        for g, (train, test) in sets.items():
            start = time.perf_counter()
            assessment.knn_and_probe(train, test, EvalConfig(), num_classes=10)
            seconds[g].append(time.perf_counter() - start)
            print(f"  round {r + 1}: grid {g}: evaluation {seconds[g][-1]:.1f} s", file=sys.stderr)
    return seconds


def report(rates: dict[int, list[float]], seconds: dict[int, list[float]], args: Any) -> str:
    base = statistics.median(rates[1])
    lines = [
        "# Cost of `model.feature_grid` (fashion-mnist-fast recipe)",
        "",
        f"- command: `{command_line()}`",
        f"- CPU: {cpu_name()} ({simd_flags()}), {torch.get_num_threads()} torch threads, "
        f"1-min load at the end {os.getloadavg()[0]:.2f} (about 2 is this job alone)",
        f"- {args.steps} timed training steps per grid per round after 1 untimed; "
        f"{args.rounds} rounds interleaved; medians",
        "",
        "| grid | features | training images/s | min–max | × grid 1 | evaluation (kNN + probe) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for g in GRIDS:
        rate = statistics.median(rates[g])
        lines.append(
            f"| {g} | {256 * g * g} | {rate:,.0f} | {min(rates[g]):,.0f}–{max(rates[g]):,.0f} "
            f"| {rate / base:.2f}× | {statistics.median(seconds[g]):.1f} s |"
        )
    return "\n".join([*lines, ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(2)
    rates = training_rates(args.steps, args.rounds)
    seconds = evaluation_seconds(args.rounds)
    emit_report(report(rates, seconds, args), args.out)


if __name__ == "__main__":
    main()
