"""What ``eval.insight`` costs: the recording of ``<run>/insight/`` against the time of an epoch.

Runs ``pretrain`` of a recipe (fashion-mnist, or digits where its data is absent) for a short
slice (``train.max_steps``, so the one recording in a run is epoch 0's, before the first step),
with insight on and off in alternating order (``--rounds`` of an on and an off run, the order
swapped every round), in this one process. Times each recording call
(``InsightRecorder.record``: the probe's forward, C, the spectra, the file and the TensorBoard
image) and reads the steady training rate from ``metrics.jsonl`` (images/s between the first and
the last logged record). Epoch time = the recipe's images per epoch / that rate; overhead = one
recording / one epoch, the cost of an epoch that records (the recipe records every
``eval.online_knn_every`` epochs, and at epoch 0 and the last). The on/off rate ratio shows that
training steps themselves are untouched.

    PYTHONPATH=src nice -n 15 python bench/insight_overhead.py \\
        --out bench/results/insight_overhead.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from barlow import data, insight
from barlow.config import Config, load_config
from barlow.training import pretrain
from machine import command_line, cpu_name, emit_report

TIMES: list[float] = []


def timed_recordings() -> None:
    """Wrap ``InsightRecorder.record`` to keep the wall time of each call in ``TIMES``."""
    record = insight.InsightRecorder.record

    def timed(self: insight.InsightRecorder, epoch: int, *, step: int) -> dict[str, float]:
        start = time.perf_counter()
        out = record(self, epoch, step=step)
        TIMES.append(time.perf_counter() - start)
        return out

    insight.InsightRecorder.record = timed  # type: ignore[method-assign]


def recipe() -> str:
    try:
        data.build_dataset("fashion-mnist", split="train")
    except (FileNotFoundError, ValueError):
        return "digits"
    return "fashion-mnist"


def run_once(name: str, steps: int, on: bool) -> tuple[float, Config]:
    """One short run; its steady training rate (images/s) and config."""
    overrides = [
        f"train.max_steps={steps}",
        "train.log_every=5",
        "eval.final=false",
        "eval.online_knn_every=0",
        f"eval.insight={'true' if on else 'false'}",
    ]
    cfg = load_config(name, overrides)
    with tempfile.TemporaryDirectory() as out:
        pretrain(cfg, out, progress=False)
        rows = [json.loads(line) for line in Path(out, "metrics.jsonl").read_text().splitlines()]
    train, batch = [r for r in rows if r["kind"] == "train"], cfg.train.batch_size

    def elapsed(r: dict[str, Any]) -> float:  # images_per_s is counted from the epoch's start
        return float(r["step"] * batch / r["images_per_s"])

    first, last = train[0], train[-1]
    return (last["step"] - first["step"]) * batch / (elapsed(last) - elapsed(first)), cfg


def machine_lines() -> list[str]:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
    keep = ("Model name", "CPU(s):", "Thread(s) per core", "Flags")
    return [line.strip() for line in lscpu if line.strip().startswith(keep)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, help="write the Markdown report here too")
    args = parser.parse_args()
    timed_recordings()
    name, load = recipe(), os.getloadavg()
    images = len(data.build_dataset(name, split="unlabeled"))
    rows, started = [], time.time()
    for r in range(args.rounds):
        for on in (True, False) if r % 2 == 0 else (False, True):
            before = len(TIMES)
            rate, cfg = run_once(name, args.steps, on)
            epoch_s = images // cfg.train.batch_size * cfg.train.batch_size / rate
            recorded = TIMES[before:]
            rows.append((on, rate, epoch_s, sum(recorded) if on else None))
    overheads = [record / epoch for on, _, epoch, record in rows if on and record is not None]
    rates = {on: statistics.median(r for o, r, _, _ in rows if o == on) for on in (True, False)}
    lines = [
        f"| {i + 1} | {'on' if on else 'off'} | {rate:.0f} | {epoch:.0f} | "
        + ("–" if record is None else f"{1e3 * record:.0f}")
        + " | "
        + ("–" if record is None else f"{100 * record / epoch:.2f} %")
        + " |"
        for i, (on, rate, epoch, record) in enumerate(rows)
    ]
    text = "\n".join(
        [
            "# Insight recording overhead",
            "",
            f"Command: `{command_line()}`",
            "",
            f"- recipe `{name}` ({images} images, batch {cfg.train.batch_size}, "
            f"{cfg.model.backbone}, projector {cfg.method.params.get('projector')}), "
            f"{args.steps} steps per run, {args.rounds} rounds of an insight-on and an "
            f"insight-off run (order alternating), one process; {time.time() - started:.0f} s",
            f"- CPU: {cpu_name()}; load average at the start {load[0]:.1f} / {load[1]:.1f} "
            "(1 / 5 min): **a shared, loaded machine** (others were measuring on the same 2 "
            "cores); absolute times are noisy, the ratios are what counts",
            *(f"- lscpu: {line}" for line in machine_lines()),
            "",
            "| run | insight | training images/s | epoch (s) at that rate | recording (ms) "
            "| recording / epoch |",
            "|---:|---|---:|---:|---:|---:|",
            *lines,
            "",
            f"- **overhead of a recording epoch: {100 * statistics.median(overheads):.2f} %** "
            "(median over the insight-on runs of one recording / that run's epoch time)",
            f"- training rate on / off (medians): {rates[True] / rates[False]:.3f} "
            "(the steps run the same code either way: this is the machine's noise)",
            "",
        ]
    )
    emit_report(text, args.out)


if __name__ == "__main__":
    main()
