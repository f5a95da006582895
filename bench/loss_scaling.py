"""How the Barlow Twins loss scales: measured CPU time of its two products, modelled communication.

(a) Forward + backward time of ``barlow_twins_loss(path="correlation")`` (D×D matrix, ~6·N·D²
    flops) and ``path="gram"`` (two N×N Gram matrices, ~8·N²·D flops) in this one process, over
    a grid of N and D, with the flop rate each achieves under the cost model
    (``losses.barlow_loss_cost``): if the model is right, the two rates are alike and the
    faster path is the one ``choose_path`` picks.
(b) The cost model at the paper's scale (global batch 2048, D 8192, float32) for 16 and 32
    processes: bytes each rank sends per step, flops and memory per rank, collectives, for the
    gathered paths (every rank computes everything), ``reduce_c`` and ``sharded_gram``.

    PYTHONPATH=src python bench/loss_scaling.py --out bench/results/loss_scaling.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from barlow.losses import (
    BARLOW_TWINS_COMPUTATIONS,
    barlow_loss_cost,
    barlow_twins_loss,
    choose_path,
)
from machine import command_line, cpu_name, emit_report

MEASURED = ("correlation", "gram")
LAMBD = 0.0051
MIB = 2**20


def inputs(n: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    z1 = torch.randn(n, d, generator=gen)
    z2 = 0.7 * z1 + torch.randn(n, d, generator=gen)
    return z1.requires_grad_(), z2.requires_grad_()


def time_case(path: str, n: int, d: int, repeats: int) -> list[float]:
    """Wall times of ``repeats`` forward + backward passes, after one untimed pass."""
    z1, z2 = inputs(n, d)
    times = []
    for i in range(repeats + 1):
        z1.grad = z2.grad = None
        start = time.perf_counter()
        barlow_twins_loss(z1, z2, LAMBD, path=path).loss.backward()  # type: ignore[arg-type]
        if i:
            times.append(time.perf_counter() - start)
    return times


def timing_table(
    times: dict[tuple[str, int, int], list[float]], ns: list[int], ds: list[int]
) -> list[str]:
    lines = [
        "| N | D | correlation (s) | gram (s) | faster | auto picks "
        "| correlation GFLOP/s | gram GFLOP/s |",
        "|---:|---:|---:|---:|---|---|---:|---:|",
    ]
    for n in ns:
        for d in ds:
            median = {p: statistics.median(times[p, n, d]) for p in MEASURED}
            rate = {p: barlow_loss_cost(n, d, 1, p)["flops"] / median[p] / 1e9 for p in MEASURED}
            faster = min(MEASURED, key=lambda p: median[p])
            lines.append(
                f"| {n} | {d} | {median['correlation']:.4f} | {median['gram']:.4f} | {faster} "
                f"| {choose_path(n, d)} | {rate['correlation']:.3g} | {rate['gram']:.3g} |"
            )
    return lines


def cost_table(n: int, d: int, world_sizes: list[int]) -> list[str]:
    lines = [
        "| W | path | sends per rank (MiB) | vs gathered | GFLOP per rank | memory per rank (MiB) "
        "| collectives | auto picks |",
        "|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for w in world_sizes:
        chosen = choose_path(n, d, w)
        gathered = barlow_loss_cost(n, d, w, "gram")["comm_bytes"]
        for path in BARLOW_TWINS_COMPUTATIONS:
            cost = barlow_loss_cost(n, d, w, path)
            ratio = f"{cost['comm_bytes'] / gathered:.2f}×" if gathered else "–"
            lines.append(
                f"| {w} | {path} | {cost['comm_bytes'] / MIB:.1f} | {ratio} "
                f"| {cost['flops'] / 1e9:.1f} | {cost['memory_bytes'] / MIB:.0f} "
                f"| {cost['collectives']} | {'✓' if path == chosen else ''} |"
            )
    return lines


def report(
    args: argparse.Namespace, times: dict[tuple[str, int, int], list[float]], wall_s: float
) -> str:
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    comm_n, comm_d = args.comm_size
    return "\n".join(
        [
            "# Barlow Twins loss: measured scaling on CPU, modelled communication",
            "",
            f"Command: `{command_line()}`",
            "",
            f"- date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; "
            f"torch {torch.__version__}; {cpu_name()}, {os.cpu_count()} logical CPUs, "
            f"torch.set_num_threads({args.threads}); float32",
            f"- load average at the end (1, 5, 15 min): {load}; whole run {wall_s:.0f} s",
            "",
            "## (a) One process: forward + backward time",
            "",
            f"Median of {args.repeats} timed passes after one untimed pass, one process. GFLOP/s = "
            "the cost model's matrix-product flops (correlation 6·N·D², gram 8·N²·D) / time: "
            "equal rates mean the model ranks the paths as the machine does. *auto picks* = "
            "`choose_path(N, D)` (Gram when N < 3·D/4).",
            "",
            *timing_table(times, args.n, args.d),
            "",
            "## (b) Cost model per rank and step (forward + backward)",
            "",
            f"Global batch N = {comm_n}, D = {comm_d}, float32, from `losses.barlow_loss_cost` "
            "(formulas: docs/loss_cost_model.md). *sends per rank*: bytes each rank sends (and "
            "receives) with ring algorithms, an all-gather of M elements in all (W − 1)/W·M per "
            "rank, an all-reduce 2·(W − 1)/W·M. correlation and gram both gather the embeddings "
            "(their volumes are the same); *vs gathered* divides by that volume. Memory: the "
            "largest arrays the loss holds, inputs excluded. *auto picks*: `choose_path(N, D, W)` "
            "with its default balance (500 flops per byte).",
            "",
            *cost_table(comm_n, comm_d, args.world_sizes),
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the markdown report here as well")
    parser.add_argument("--n", type=int, nargs="+", default=[128, 256, 512, 1024], help="batches")
    parser.add_argument("--d", type=int, nargs="+", default=[1024, 2048, 4096, 8192], help="widths")
    parser.add_argument("--repeats", type=int, default=2, help="timed passes per case")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument(
        "--comm-size",
        type=int,
        nargs=2,
        default=[2048, 8192],
        metavar=("N", "D"),
        help="global batch and width of the cost table (default: the paper's 2048 8192)",
    )
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[16, 32])
    args = parser.parse_args()
    if min(args.n) < 2 or min(args.d) < 1 or args.repeats < 1 or args.threads < 1:
        parser.error("--n needs values >= 2, --d >= 1, --repeats and --threads >= 1")
    torch.set_num_threads(args.threads)
    time_case("gram", 8, 16, 1)  # thread pools and kernels initialised
    start = time.perf_counter()
    times = {}
    for n in args.n:
        for d in args.d:
            for path in MEASURED:
                times[path, n, d] = time_case(path, n, d, args.repeats)
                print(
                    f"N={n} D={d} {path}: {statistics.median(times[path, n, d]):.4f} s",
                    file=sys.stderr,
                )
    text = report(args, times, time.perf_counter() - start)
    emit_report(text, args.out)


if __name__ == "__main__":
    main()
