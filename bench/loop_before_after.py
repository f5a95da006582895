"""The real training loop of two checkouts, side by side: `barlow pretrain` images/s and losses.

Runs ``python -m barlow pretrain RECIPE`` from each checkout's ``src`` in turn (``--rounds``
interleaved rounds, a fresh process each), ``train.max_steps`` steps with evaluation off, and
reads ``metrics.jsonl``: images per second between the first and the last logged record (steady
state: the first ``train.log_every`` steps, with their warm-up, are left out), and the logged
losses, which must be equal when the two checkouts compute the same thing.

    git worktree add /tmp/before <commit>
    PYTHONPATH=src python bench/loop_before_after.py --before /tmp/before --after . \\
        --out bench/results/loop_before_after.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from machine import command_line, cpu_name, emit_report, simd_flags


def run_once(checkout: Path, recipe: str, steps: int, log_every: int) -> tuple[float, list]:
    """One pretraining process from ``checkout``; (steady images/s, logged (step, loss) pairs)."""
    with tempfile.TemporaryDirectory() as out:
        overrides = [
            f"train.max_steps={steps}",
            f"train.log_every={log_every}",
            "eval.final=false",
            "eval.online_knn_every=0",
        ]
        argv = [sys.executable, "-m", "barlow", "pretrain", recipe, "--quiet", "--out", out]
        argv += [arg for o in overrides for arg in ("--set", o)]
        env = {**os.environ, "PYTHONPATH": str(checkout / "src")}
        subprocess.run(argv, env=env, check=True, capture_output=True, cwd=checkout)
        rows = [json.loads(line) for line in Path(out, "metrics.jsonl").read_text().splitlines()]
        config = json.loads(Path(out, "config.json").read_text())["config"]
    train = [r for r in rows if r["kind"] == "train"]
    batch = config["train"]["batch_size"]

    def elapsed(r: dict) -> float:  # images_per_s is counted from the epoch's start
        return r["step"] * batch / r["images_per_s"]

    first, last = train[0], train[-1]
    rate = (last["step"] - first["step"]) * batch / (elapsed(last) - elapsed(first))
    return rate, [(r["step"], r["loss"]) for r in train]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", type=Path, required=True, help="checkout to compare against")
    parser.add_argument("--after", type=Path, default=Path("."), help="this checkout")
    parser.add_argument("--recipe", default="fashion-mnist")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--log-every", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, help="write the Markdown report here too")
    args = parser.parse_args()
    rates: dict[str, list[float]] = {"before": [], "after": []}
    losses: dict[str, list] = {}
    load_before = os.getloadavg()
    for r in range(args.rounds):
        for side in ("before", "after"):
            checkout = (args.before if side == "before" else args.after).resolve()
            rate, logged = run_once(checkout, args.recipe, args.steps, args.log_every)
            rates[side].append(rate)
            losses.setdefault(side, logged)
            print(f"round {r + 1}: {side} {rate:.0f} images/s", file=sys.stderr)
    before, after = (statistics.median(rates[s]) for s in ("before", "after"))
    lines = [
        f"# `barlow pretrain {args.recipe}`: the loop of two checkouts",
        "",
        f"- machine: {os.cpu_count()} CPU cores, {cpu_name()} ({simd_flags()}); load average "
        f"before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}",
        f"- before: `{args.before}`, after: `{args.after}`; {args.steps} steps per run, "
        f"{args.rounds} interleaved rounds (a fresh process each), evaluation off",
        "",
        "| checkout | images/s (median) | per round |",
        "|---|---:|---|",
        *(
            f"| {s} | {statistics.median(rates[s]):,.0f} | "
            + ", ".join(f"{v:,.0f}" for v in rates[s])
            + " |"
            for s in ("before", "after")
        ),
        "",
        f"- after / before: **{after / before:.3f}×**",
        f"- logged losses equal (every {args.log_every} steps, bitwise): "
        f"**{losses['before'] == losses['after']}**",
        "",
        f"Command: `{command_line()}`",
    ]
    emit_report("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
