"""Barlow Twins loss on CPU: forward+backward time and peak extra memory of three implementations.

- straightforward: written here the way the reference code writes it: BatchNorm1d(affine=False)
  on both views, the D×D matrix c = ẑ1ᵀẑ2 / N, on_diag = Σ(diag(c) − 1)², off_diag = Σ of the
  squared off-diagonal elements, taken as a copy (``off_diagonal``).
- correlation: ``barlow_twins_loss(path="correlation")`` (D×D matrix, no copies of it).
- gram: ``barlow_twins_loss(path="gram")`` (two N×N Gram matrices).

Every (implementation, N, D) case runs in a fresh Python process, so that its peak resident set
size (``ru_maxrss``) belongs to that case alone: extra memory = peak RSS during the first
forward+backward minus RSS just before it (inputs already allocated, libraries warmed up on a tiny
problem). Time = median over repeated forward+backward passes after that first one.

    python bench/loss_bench.py --out bench/results/loss_cpu.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from barlow.losses import barlow_twins_loss, choose_path, off_diagonal

SIZES = ((256, 2048), (256, 8192), (1024, 8192), (2048, 8192))
IMPLEMENTATIONS = ("straightforward", "correlation", "gram")
LAMBD = 0.0051
THREADS = 2


def straightforward_loss(z1: Tensor, z2: Tensor, bn: nn.Module) -> Tensor:
    n = z1.shape[0]
    c = bn(z1).T @ bn(z2)
    c.div_(n)
    on_diag = torch.diagonal(c).add(-1).pow_(2).sum()
    off_diag = off_diagonal(c).pow_(2).sum()
    return on_diag + LAMBD * off_diag


def loss_function(name: str, d: int) -> Callable[[Tensor, Tensor], Tensor]:
    if name == "straightforward":
        bn = nn.BatchNorm1d(d, affine=False).train()
        return lambda z1, z2: straightforward_loss(z1, z2, bn)
    return lambda z1, z2: barlow_twins_loss(z1, z2, LAMBD, path=name).loss  # type: ignore[arg-type]


def inputs(n: int, d: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(0)
    z1 = torch.randn(n, d, generator=gen)
    z2 = 0.7 * z1 + torch.randn(n, d, generator=gen)
    return z1.requires_grad_(), z2.requires_grad_()


def forward_backward(loss_fn: Callable[[Tensor, Tensor], Tensor], z1: Tensor, z2: Tensor) -> float:
    z1.grad = z2.grad = None
    loss = loss_fn(z1, z2)
    loss.backward()
    return float(loss.detach())


def max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_case(name: str, n: int, d: int, budget_s: float) -> dict[str, float]:
    """One case, in this (fresh) process: first pass for memory, then timed repeats."""
    torch.set_num_threads(THREADS)
    tiny = inputs(8, 16)
    forward_backward(loss_function(name, 16), *tiny)  # thread pools and kernels initialised
    loss_fn = loss_function(name, d)
    z1, z2 = inputs(n, d)
    before = max_rss_mib()
    start = time.perf_counter()
    loss = forward_backward(loss_fn, z1, z2)
    first_s = time.perf_counter() - start
    extra_mib = max_rss_mib() - before
    repeats = int(min(9, max(2, budget_s // first_s)))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        forward_backward(loss_fn, z1, z2)
        times.append(time.perf_counter() - start)
    median_s = statistics.median(times)
    return {"median_s": median_s, "repeats": repeats, "extra_mib": extra_mib, "loss": loss}


def run_in_subprocess(name: str, n: int, d: int, budget_s: float) -> dict[str, float]:
    command = [sys.executable, __file__, "--case", name, str(n), str(d), "--budget", str(budget_s)]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def table(results: dict[tuple[str, int, int], dict[str, float]]) -> list[str]:
    lines = [
        "| N | D | implementation | auto picks | fwd+bwd median (s) | repeats | speed-up "
        "| extra peak RSS (MiB) | memory ratio | loss rel. diff. |",
        "|---:|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for n, d in SIZES:
        base = results["straightforward", n, d]
        for name in IMPLEMENTATIONS:
            r = results[name, n, d]
            lines.append(
                f"| {n} | {d} | {name} | {choose_path(n, d)} | {r['median_s']:.3f} "
                f"| {int(r['repeats'])} | {base['median_s'] / r['median_s']:.1f}× "
                f"| {r['extra_mib']:.0f} | {r['extra_mib'] / base['extra_mib']:.3f} "
                f"| {abs(r['loss'] - base['loss']) / abs(base['loss']):.1e} |"
            )
    return lines


def report(results: dict[tuple[str, int, int], dict[str, float]], wall_s: float) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    header = [
        "# Barlow Twins loss on CPU: forward+backward time and peak extra memory",
        "",
        "Command: `PYTHONPATH=src python bench/loss_bench.py --out bench/results/loss_cpu.md`",
        "",
        f"- date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; "
        f"torch {torch.__version__}; {cpu}, {os.cpu_count()} logical CPUs, "
        f"torch.set_num_threads({THREADS}); float32 inputs",
        f"- load average at the end (1, 5, 15 min): {load}; whole run {wall_s:.0f} s",
        "- speed-up and memory ratio are relative to `straightforward` at the same (N, D); "
        "speed-up > 1 is faster, memory ratio < 1 is less memory",
        "- extra peak RSS: ru_maxrss of a fresh process during its first forward+backward minus "
        "ru_maxrss just before it (inputs allocated, libraries warmed up); includes the input "
        "gradients and allocator slack",
        "- loss rel. diff.: |loss − loss(straightforward)| / loss(straightforward), same inputs",
        "",
    ]
    return "\n".join([*header, *table(results), ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the markdown report here as well")
    parser.add_argument("--budget", type=float, default=8.0, help="seconds of timed repeats")
    parser.add_argument("--case", nargs=3, metavar=("IMPL", "N", "D"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        name, n, d = args.case[0], int(args.case[1]), int(args.case[2])
        print(json.dumps(run_case(name, n, d, args.budget)))
        return
    start = time.perf_counter()
    results = {}
    for n, d in SIZES:
        for name in IMPLEMENTATIONS:
            results[name, n, d] = run_in_subprocess(name, n, d, args.budget)
            r = results[name, n, d]
            print(
                f"N={n} D={d} {name}: {r['median_s']:.3f} s, +{r['extra_mib']:.0f} MiB",
                file=sys.stderr,
            )
    text = report(results, time.perf_counter() - start)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
