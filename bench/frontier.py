"""Accuracy against minutes on Fashion-MNIST: barlow's recipes and the plain lightly loop under
wall-clock budgets, evaluation included.

For each loop and budget B (minutes), the number of epochs that fits is taken from that loop's
1-epoch point (its smallest budget, run first; a later run reads it from points.jsonl):
E = max(1, ⌊(60·B − overhead) / epoch⌋), where ``epoch`` is its median epoch time and
``overhead`` the rest of its wall-clock (start, data, evaluation). Each point is a fresh
process timed from its start to its printed result:

- a barlow recipe: ``barlow pretrain RECIPE --epochs E --set train.seed=S`` (baselines off), scored
  by its own final evaluation (weighted kNN k 200, linear probe on frozen features);
- the plain loop: ``step_bench.PlainTrainer`` (lightly's loss and LARS, torchvision views per
  sample, 1 DataLoader worker, fp32) on the ``fashion-mnist`` recipe's settings for E epochs,
  scored by the same ``assessment.evaluate_encoder`` on the same splits.

Points go to ``OUT/points.jsonl`` as they finish; a rerun skips the points there (a frontier
takes hours on 2 cores). ``--holdout N`` scores on N held-out training images instead of the test
split (``data.holdout``): the mode for choosing a recipe. The table and the plot are written at
the end of every run, from every point in the file: when a recipe changes, its old points are
relabelled there (e.g. "fashion-mnist-fast, global pooling (before the grid)") and kept.

    PYTHONPATH=src python bench/frontier.py --recipes fashion-mnist fashion-mnist-fast plain \
        --budgets 2 5 10 15 30 --seeds 0 --out bench/results/frontier
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from machine import command_line, cpu_name, have_lightly, simd_flags

PLAIN = "plain"


def point_key(loop: str, budget: float, seed: int, holdout: int) -> str:
    return f"{loop}|{budget:g}|{seed}|{holdout}"


def load_points(out: Path) -> dict[str, dict[str, Any]]:
    path = out / "points.jsonl"
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {point_key(r["loop"], r["budget"], r["seed"], r["holdout"]): r for r in rows}


def barlow_point(recipe: str, epochs: int, seed: int, holdout: int, run: Path) -> dict[str, Any]:
    """``barlow pretrain`` in a fresh process: its accuracy, epoch times and wall-clock."""
    sets = [f"train.seed={seed}", "eval.baselines=false", f"data.holdout={holdout}"]
    command = [sys.executable, "-m", "barlow", "pretrain", recipe, "--out", str(run)]
    command += ["--epochs", str(epochs), "--overwrite"]
    command += [a for s in sets for a in ("--set", s)]
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    metrics = json.loads((run / "metrics.json").read_text())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epochs_s = [r["epoch_time_s"] for r in records if r["kind"] == "epoch"]
    pretrained = metrics["evaluation"]["pretrained"]
    return {
        "knn": pretrained["knn_top1"],
        "linear": pretrained["linear_top1"],
        "wall_s": wall,
        "epoch_s": statistics.median(epochs_s),
        "images_per_s": statistics.median(
            r["images_per_s"] for r in records if r["kind"] == "epoch"
        ),
        "peak_rss_mib": max(r.get("peak_memory_mib", 0) for r in records if r["kind"] == "epoch"),
    }


def plain_point(epochs: int, seed: int, holdout: int, run: Path) -> dict[str, Any]:
    """The plain loop in a fresh process (this script's ``--job-plain``), timed the same way."""
    run.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, __file__, "--job-plain", str(run), "--epochs", str(epochs)]
    command += ["--seeds", str(seed), "--holdout", str(holdout)]
    start = time.perf_counter()
    subprocess.run(command, check=True)
    wall = time.perf_counter() - start
    return {**json.loads((run / "plain.json").read_text()), "wall_s": wall}


def plain_job(run: Path, epochs: int, seed: int, holdout: int) -> None:
    from barlow import data
    from barlow.assessment import EvalData, evaluate_encoder
    from step_bench import SETTINGS, PlainTrainer, recipe_config, training_images

    sets = [f"train.seed={seed}", f"train.epochs={epochs}", f"data.holdout={holdout}"]
    cfg = recipe_config("fashion-mnist", None, sets)
    images = training_images(SETTINGS["fmnist"], cfg, None)
    if holdout:  # the barlow runs' pretraining images: the held-out ones left out
        kept, _ = data.holdout_indices(len(images), holdout)
        images = data.TensorImages(images.images[kept], images.labels[kept], images.classes)
    trainer = PlainTrainer(cfg, images, workers=(1,))
    times = []
    for epoch in range(epochs):
        start = time.perf_counter()
        for x1, x2 in trainer.loaders[1]:
            trainer.train_step(x1, x2)
        times.append(time.perf_counter() - start)
        print(f"[plain] epoch {epoch + 1}/{epochs}: {times[-1]:.0f} s", file=sys.stderr)
    scores = evaluate_encoder(
        trainer.backbone, EvalData.from_config(cfg), cfg.eval, device=torch.device("cpu"), seed=seed
    )
    steps = len(images) // cfg.train.batch_size
    result = {
        "knn": scores["knn_top1"],
        "linear": scores["linear_top1"],
        "epoch_s": statistics.median(times),
        "images_per_s": steps * cfg.train.batch_size / statistics.median(times),
        "peak_rss_mib": None,
    }
    (run / "plain.json").write_text(json.dumps(result))


def epochs_for(budget_min: float, first: dict[str, Any]) -> int:
    """Epochs that fit the budget, from a loop's 1-epoch point (see the module docstring)."""
    overhead = first["wall_s"] - first["epoch_s"] * first["epochs"]
    return max(1, int((60 * budget_min - overhead) // first["epoch_s"]))


def calibration_point(
    points: dict[str, dict[str, Any]], loop: str, seed: int, holdout: int
) -> dict[str, Any] | None:
    """The loop's stored 1-epoch point (its smallest budget), or None before it has run: a later
    run with larger budgets only (``--budgets 30``) still sizes them from it."""
    rows = [
        r
        for r in points.values()
        if (r["loop"], r["seed"], r["holdout"], r["epochs"]) == (loop, seed, holdout, 1)
    ]
    return min(rows, key=lambda r: r["budget"]) if rows else None


def run_frontier(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    points = load_points(args.out)
    for loop in args.recipes:
        for seed in args.seeds:
            first = calibration_point(points, loop, seed, args.holdout)
            for budget in sorted(args.budgets):
                key = point_key(loop, budget, seed, args.holdout)
                if key not in points:
                    epochs = 1 if first is None else epochs_for(budget, first)
                    points[key] = run_point(loop, budget, epochs, seed, args)
                first = first or points[key]
    return points


def run_point(loop: str, budget: float, epochs: int, seed: int, args: argparse.Namespace) -> Any:
    run = args.runs / f"{loop}-{budget:g}min-seed{seed}-holdout{args.holdout}"
    print(f"[frontier] {loop}, {budget:g} min: {epochs} epoch(s), seed {seed}", flush=True)
    if loop == PLAIN:
        result = plain_point(epochs, seed, args.holdout, run)
    else:
        result = barlow_point(loop, epochs, seed, args.holdout, run)
    row = {"loop": loop, "budget": budget, "seed": seed, "holdout": args.holdout}
    row |= {"epochs": epochs, **result, "load_after": os.getloadavg()[0]}
    print(
        f"[frontier] {loop}, {budget:g} min: kNN {100 * row['knn']:.1f} %, linear "
        f"{100 * row['linear']:.1f} % in {row['wall_s'] / 60:.1f} min",
        flush=True,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "points.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    return row


def table(points: dict[str, dict[str, Any]], args: argparse.Namespace) -> str:
    split = f"{args.holdout} held-out training images" if args.holdout else "the 10,000 test images"
    lines = [
        "# Fashion-MNIST frontier: accuracy against wall-clock minutes, evaluation included",
        "",
        f"Command: `{command_line()}`",
        "",
        f"- {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; {os.cpu_count()} CPU cores "
        f"({cpu_name()}; {simd_flags()}), torch {torch.__version__}; scored on {split}",
        "- minutes: from the command's start to its printed result; load: 1-min load average "
        "after the point (about 2 is this job alone: its 2 busy threads)",
        "",
        "| loop | budget (min) | seed | epochs | minutes | kNN top-1 | linear top-1 | img/s | "
        "load |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rows = sorted(points.values(), key=lambda r: (r["loop"], r["seed"], r["budget"]))
    for r in rows:
        if r["holdout"] != args.holdout:
            continue
        lines.append(
            f"| {r['loop']} | {r['budget']:g} | {r['seed']} | {r['epochs']} | "
            f"{r['wall_s'] / 60:.1f} | {100 * r['knn']:.1f} | {100 * r['linear']:.1f} | "
            f"{r['images_per_s']:.0f} | {r['load_after']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def plot(points: dict[str, dict[str, Any]], args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6), sharex=True)
    for ax, metric, title in zip(
        axes, ("knn", "linear"), ("kNN top-1", "linear top-1"), strict=True
    ):
        for loop in dict.fromkeys([*args.recipes, *(r["loop"] for r in points.values())]):
            rows = sorted(
                (r for r in points.values() if r["loop"] == loop and r["holdout"] == args.holdout),
                key=lambda r: r["wall_s"],
            )
            if rows:
                xs = [r["wall_s"] / 60 for r in rows]
                ax.plot(xs, [100 * r[metric] for r in rows], marker="o", label=loop)
        ax.set(title=title, xlabel="minutes (2 CPU cores, evaluation included)", ylabel="%")
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, frameon=False)
    fig.tight_layout(rect=(0, 0.12, 1, 1))  # the legend below the plots, clear of the curves
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", default=["fashion-mnist", PLAIN])
    parser.add_argument("--budgets", type=float, nargs="+", default=[2, 5, 10, 15, 30])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--holdout", type=int, default=0, help="score on N held-out train images")
    parser.add_argument("--out", type=Path, default=Path("bench/results/frontier"))
    parser.add_argument("--runs", type=Path, default=Path("runs/frontier"))
    parser.add_argument("--epochs", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--job-plain", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job_plain:
        plain_job(args.job_plain, args.epochs, args.seeds[0], args.holdout)
        return
    if PLAIN in args.recipes and not have_lightly():
        parser.error("the plain loop needs lightly: pip install -r bench/requirements.txt")
    points = run_frontier(args)
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = f"-holdout{args.holdout}" if args.holdout else ""
    (args.out / f"frontier{suffix}.md").write_text(table(points, args))
    plot(points, args, args.out / f"frontier{suffix}.png")
    print(table(points, args))


if __name__ == "__main__":
    main()
