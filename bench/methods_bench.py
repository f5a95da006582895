"""Every method on Fashion-MNIST by its CPU recipe, for the same number of epochs, side by side.

Each method runs ``barlow pretrain <recipe>`` in a fresh process (so that peak memory is its own),
with the same backbone (the small CNN), batch (256), data and epochs; only what the method's
recipe sets differs (its head, loss, optimizer, views). After pretraining each run evaluates its
encoder on the 10,000 test images (weighted kNN, k 200, and a linear probe on frozen features);
the first run also evaluates the random-init encoder and raw pixels. Reports, per method: kNN and
linear top-1, median seconds per epoch and images/s, peak memory of training (``ru_maxrss`` of the
process, logged by the training loop each epoch), and the collapse monitors of the last epoch.

    PYTHONPATH=src python bench/methods_bench.py --epochs 3 --out bench/results/methods_fmnist.md

``--slice 6000,2000`` runs on the first 6,000 training / 2,000 test images instead (IDX files
written next to the runs): a quick way to compare recipe settings (``--set optim.lr=0.1``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from barlow.data import DEBIAN_FASHION_MNIST, read_idx
from machine import command_line, cpu_name, emit_report

METHOD_RECIPES = {
    "barlow_twins": "fashion-mnist",
    "simclr": "simclr-fashion-mnist",
    "moco": "moco-fashion-mnist",
    "byol": "byol-fashion-mnist",
    "simsiam": "simsiam-fashion-mnist",
    "cmc": "cmc-fashion-mnist",
    "vicreg": "vicreg-fashion-mnist",
}
DISPLAY = {
    "barlow_twins": "Barlow Twins",
    "simclr": "SimCLR",
    "moco": "MoCo v2",
    "byol": "BYOL",
    "simsiam": "SimSiam",
    "cmc": "CMC (2 views)",
    "vicreg": "VICReg",
}


def write_slice(root: Path, train: int, test: int) -> Path:
    """The first ``train`` / ``test`` Fashion-MNIST images as uncompressed IDX files in ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    for prefix, count in (("train", train), ("t10k", test)):
        for kind in ("images-idx3", "labels-idx1"):
            array = read_idx(DEBIAN_FASHION_MNIST / f"{prefix}-{kind}-ubyte.gz")[:count]
            header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
            header += struct.pack(f">{array.ndim}I", *array.shape)
            (root / f"{prefix}-{kind}-ubyte").write_bytes(header + array.astype(np.uint8).tobytes())
    return root


def run_method(
    method: str, epochs: int, run_dir: Path, overrides: list[str], baselines: bool
) -> dict[str, Any]:
    """Pretrain + evaluate one method in a fresh process; its per-epoch records and results."""
    command = [
        sys.executable,
        "-m",
        "barlow",
        "pretrain",
        METHOD_RECIPES[method],
        "--out",
        str(run_dir),
        "--overwrite",
        "--epochs",
        str(epochs),
        "--set",
        "eval.online_knn_every=0",
        "--set",
        f"eval.baselines={'true' if baselines else 'false'}",
    ]
    for override in overrides:
        command += ["--set", override]
    print(f"[{method}] {' '.join(command[2:])}", flush=True)
    start = time.perf_counter()
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:  # the run's own plain progress lines (no terminal here)
            print(f"[{method}] {line.rstrip()}", flush=True)
    if proc.returncode != 0:
        raise SystemExit(f"{method}: barlow pretrain exited {proc.returncode}; see the lines above")
    wall = time.perf_counter() - start
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    epochs_log = [r for r in map(json.loads, lines) if r.get("kind") == "epoch"]
    results = json.loads((run_dir / "metrics.json").read_text())
    return {"wall_s": wall, "epochs": epochs_log, "evaluation": results["evaluation"]}


def summarise(method: str, run: dict[str, Any]) -> dict[str, Any]:
    last = run["epochs"][-1]
    pretrained = run["evaluation"]["pretrained"]
    return {
        "method": method,
        "knn": pretrained["knn_top1"],
        "linear": pretrained["linear_top1"],
        "epoch_s": statistics.median(r["epoch_time_s"] for r in run["epochs"]),
        "images_per_s": statistics.median(r["images_per_s"] for r in run["epochs"]),
        "peak_mib": max(r.get("peak_memory_mib", float("nan")) for r in run["epochs"]),
        "std_ratio": last["std_ratio"],
        "effective_rank": last["effective_rank"],
        "wall_s": run["wall_s"],
    }


def report(
    rows: list[dict[str, Any]],
    baselines: dict[str, dict[str, float]],
    args: argparse.Namespace,
    started: str,
    loads: tuple[float, float],
) -> str:
    data = f"first {args.slice} train/test images" if args.slice else "60,000 train / 10,000 test"
    lines = [
        f"# Every method on Fashion-MNIST, {args.epochs} epochs each, CPU recipes",
        "",
        f"Command: `{command_line()}`",
        "",
        f"- date: {started} – {time.strftime('%H:%M UTC', time.gmtime())}; "
        f"{os.cpu_count()} CPU cores ({cpu_name()}), "
        f"torch {torch.__version__}; load average (1 min) {loads[0]:.2f} before, "
        f"{loads[1]:.2f} after",
        f"- data: Fashion-MNIST, {data}; backbone: small CNN (256 features); batch 256; "
        "views drawn on whole batches (`data.augment_on=device`)",
        "- kNN: weighted, k 200, T 0.1; linear: logistic regression on frozen features (L-BFGS)",
        "- peak memory: `ru_maxrss` of the training process at the end of pretraining (data in "
        "memory, model, optimizer, activations)",
    ]
    if args.set:
        lines.append(f"- overrides for every method: {', '.join(args.set)}")
    lines += [
        "",
        "| method | recipe | kNN top-1 | linear top-1 | s / epoch | images/s | peak memory "
        "| feature std·√D | effective rank |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {DISPLAY[row['method']]} | `{METHOD_RECIPES[row['method']]}` "
            f"| {100 * row['knn']:.1f} % | {100 * row['linear']:.1f} % | {row['epoch_s']:.0f} "
            f"| {row['images_per_s']:.0f} | {row['peak_mib']:.0f} MiB "
            f"| {row['std_ratio']:.3f} | {row['effective_rank']:.1f} |"
        )
    for name in ("random init", "raw pixels"):
        if name in baselines:
            b = baselines[name]
            lines.append(
                f"| *{name}* | — | {100 * b['knn_top1']:.1f} % | {100 * b['linear_top1']:.1f} % "
                "| | | | | |"
            )
    lines += ["", "Whole command per method (pretraining + evaluation), wall time:", ""]
    lines += [f"- {DISPLAY[r['method']]}: {r['wall_s'] / 60:.1f} min" for r in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--methods", default=",".join(METHOD_RECIPES))
    parser.add_argument("--slice", help="TRAIN,TEST: use the first images only")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--runs", default="runs/methods-bench", help="where the runs are written")
    parser.add_argument("--out", type=Path, help="markdown report (default: print only)")
    args = parser.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHOD_RECIPES))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {', '.join(METHOD_RECIPES)}")
    runs = Path(args.runs)
    overrides = list(args.set)
    if args.slice:
        train, test = (int(v) for v in args.slice.split(","))
        root = write_slice(runs / f"fashion-mnist-{train}-{test}", train, test)
        overrides.append(f'data.root="{root.resolve()}"')

    started = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    load_before = os.getloadavg()[0]
    rows, baselines = [], {}
    for i, method in enumerate(methods):
        run = run_method(method, args.epochs, runs / method, overrides, baselines=i == 0)
        rows.append(summarise(method, run))
        baselines = baselines or {k: v for k, v in run["evaluation"].items() if k != "pretrained"}
        print(json.dumps(rows[-1]), flush=True)
    text = report(rows, baselines, args, started, (load_before, os.getloadavg()[0]))
    emit_report(text, args.out)


if __name__ == "__main__":
    main()
