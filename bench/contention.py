"""Two jobs on one machine: training throughput alone, two jobs at once, and beside a busy process.

Each job trains the ``fashion-mnist`` recipe on 2,560 training images (10 steps an epoch) for
``--seconds`` seconds, then stops; its throughput is the images of its epochs after the first over
their time. The loops:

- barlow, ``train.threads=2`` (torch's default on 2 cores: before ``barlow.cpu_share``);
- barlow, ``train.threads=0`` (auto: the thread team follows the cores the others leave free);
- the plain lightly loop of ``bench/step_bench.py`` (``PlainTrainer``, 1 DataLoader worker), with
  torch's default thread count.

The scenarios: alone; two identical jobs started together (each one's throughput); beside a
pure-Python busy process (one core's worth of load that is not torch). Each row gives the images
per second and the share of the quiet throughput it kept; a fair share is 50 % for two jobs on a
2-core machine.

    PYTHONPATH=src python bench/contention.py --seconds 90 --out bench/results/contention.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from machine import command_line, cpu_name, emit_report, have_lightly, simd_flags

SUBSET = 2560
BARLOW_SETS = [
    f"data.train_subset={SUBSET}",
    "train.epochs=100000",
    "train.keep_last=0",
    "train.log_every=100",
    "eval.final=false",
    "eval.online_knn_every=0",
    "eval.online_linear=false",
    "eval.insight=false",
    "log.tensorboard=false",
]
BUSY = "import time\nend = time.monotonic() + {s}\nwhile time.monotonic() < end:\n    pass\n"
LOOPS = {
    "barlow, threads 2 (before)": "barlow:2",
    "barlow, threads auto (after)": "barlow:0",
    "plain lightly loop": "plain",
}


def job_command(loop: str, out: Path) -> list[str]:
    """The command of one training job of ``loop`` ("barlow:T" or "plain")."""
    if loop == "plain":
        return [sys.executable, __file__, "--job-plain", str(out)]
    threads = loop.split(":")[1]
    sets = [a for s in [*BARLOW_SETS, f"train.threads={threads}"] for a in ("--set", s)]
    return [sys.executable, "-m", "barlow", "pretrain", "fashion-mnist", "--out", str(out), *sets]


def throughput(out: Path) -> float:
    """Images per second over a job's epochs after its first (from its epoch records)."""
    source = out / "metrics.jsonl" if (out / "metrics.jsonl").exists() else out / "plain.jsonl"
    epochs = [
        r for r in map(json.loads, source.read_text().splitlines()) if r.get("kind") == "epoch"
    ][1:]
    if not epochs:
        raise RuntimeError(f"{out}: fewer than 2 epochs finished; give the jobs more --seconds")
    return SUBSET // 256 * 256 * len(epochs) / sum(r["epoch_time_s"] for r in epochs)


def run_scenario(loops: list[str], busy: bool, seconds: float, work: Path) -> list[float]:
    """Start the jobs (and the busy process) together, stop them after ``seconds``; each job's
    images per second."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    outs = [Path(tempfile.mkdtemp(dir=work)) / "run" for _ in loops]
    logs = [open(out.parent / "log", "w") for out in outs]  # noqa: SIM115 (closed below)
    jobs = [
        subprocess.Popen(job_command(loop, out), env=env, stdout=subprocess.DEVNULL, stderr=log)
        for loop, out, log in zip(loops, outs, logs, strict=True)
    ]
    spinner = (
        subprocess.Popen([sys.executable, "-c", BUSY.format(s=seconds + 60)]) if busy else None
    )
    time.sleep(seconds)
    for job in jobs:
        job.terminate()  # SIGTERM: barlow saves and stops; the plain loop just stops
    for job in jobs:
        job.wait()
    if spinner is not None:
        spinner.kill()
        spinner.wait()
    for log in logs:
        log.close()
    return [throughput(out) for out in outs]


def plain_job(out: Path) -> None:
    """The plain loop for ever (until terminated), an epoch record per epoch in plain.jsonl."""
    from step_bench import SETTINGS, PlainTrainer, recipe_config, training_images

    cfg = recipe_config("fashion-mnist", None, ["train.epochs=100000"])
    trainer = PlainTrainer(cfg, training_images(SETTINGS["fmnist"], cfg, SUBSET), workers=(1,))
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "plain.jsonl", "a") as records:
        while True:
            start = time.perf_counter()
            for x1, x2 in trainer.loaders[1]:
                trainer.train_step(x1, x2)
            took = time.perf_counter() - start
            records.write(json.dumps({"kind": "epoch", "epoch_time_s": took}) + "\n")
            records.flush()


def report(
    rows: dict[str, dict[str, float]], args: argparse.Namespace, started: str, load: float
) -> str:
    quiet_before = rows["barlow, threads 2 (before)"]["quiet"]
    quiet_after = rows["barlow, threads auto (after)"]["quiet"]
    lines = [
        "# Two jobs on one machine: throughput alone, two at once, beside a busy process",
        "",
        f"Command: `{command_line()}`",
        "",
        f"- date: {started} – {datetime.datetime.now(datetime.UTC):%H:%M} UTC; "
        f"{os.cpu_count()} CPU cores ({cpu_name()}; {simd_flags()}), torch {torch.__version__}; "
        f"{args.seconds:.0f} s a scenario, the first epoch of each job left out; load average "
        f"(1 min) {load:.2f} before the run",
        f"- job: the `fashion-mnist` recipe on {SUBSET} training images, batch 256, no "
        "evaluation; images/s over the epochs after the first",
        "",
        "| loop | alone (img/s) | two at once, each (img/s) | share kept | beside a busy "
        "process (img/s) | share kept |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, row in rows.items():
        quiet, pair, busy = row["quiet"], row["pair"], row["busy"]
        lines.append(
            f"| {name} | {quiet:.0f} | {pair:.0f} | {100 * pair / quiet:.0f} % | {busy:.0f} | "
            f"{100 * busy / quiet:.0f} % |"
        )
    lines += [
        "",
        f"- cost of auto threads on a quiet machine: {quiet_after:.0f} vs {quiet_before:.0f} "
        f"img/s (**{100 * (quiet_after / quiet_before - 1):+.1f} %**), each the mean of "
        f"{rows['barlow, threads 2 (before)']['quiet_runs']:.0f} runs alone in A B B A order",
        '- "two at once, each": the mean of the two jobs\' throughputs (their lowest: '
        + ", ".join(f"{n} {row['pair_min']:.0f}" for n, row in rows.items())
        + ")",
    ]
    return "\n".join(lines) + "\n"


def measure_alone(rows: dict[str, dict[str, float]], args: argparse.Namespace, work: Path) -> None:
    """Each loop alone; the two barlow loops ``--rounds`` times in A B B A order, so that a drift
    of the machine's speed over the run weighs on both alike (their mean is the row)."""
    before, after, plain = LOOPS
    order = [before, after, after, before] * args.rounds
    runs: dict[str, list[float]] = {before: [], after: []}
    for name in order:
        (speed,) = run_scenario([LOOPS[name]], False, args.seconds, work)
        runs[name].append(speed)
        print(f"[contention] {name} alone: {speed:.0f} images/s", flush=True)
    for name, speeds in runs.items():
        rows[name]["quiet"], rows[name]["quiet_runs"] = sum(speeds) / len(speeds), len(speeds)
    (rows[plain]["quiet"],) = run_scenario([LOOPS[plain]], False, args.seconds, work)
    rows[plain]["quiet_runs"] = 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=90.0, help="length of each scenario")
    parser.add_argument("--rounds", type=int, default=1, help="A B B A rounds of barlow alone")
    parser.add_argument("--out", type=Path, help="markdown report (default: print only)")
    parser.add_argument("--job-plain", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job_plain:
        plain_job(args.job_plain)
        return
    if not have_lightly():
        parser.error("the plain loop needs lightly: pip install -r bench/requirements.txt")
    started = f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M}"
    load = os.getloadavg()[0]
    rows: dict[str, dict[str, float]] = {name: {} for name in LOOPS}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        measure_alone(rows, args, work)
        for name, loop in LOOPS.items():
            print(f"[contention] {name}: two at once, beside a busy process", flush=True)
            pair = run_scenario([loop, loop], False, args.seconds, work)
            rows[name]["pair"], rows[name]["pair_min"] = sum(pair) / 2, min(pair)
            (rows[name]["busy"],) = run_scenario([loop], True, args.seconds, work)
            print(f"[contention] {name}: {rows[name]}", flush=True)
    emit_report(report(rows, args, started, load), args.out)


if __name__ == "__main__":
    main()
