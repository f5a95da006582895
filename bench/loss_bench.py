"""Barlow Twins loss on CPU: forward+backward time and peak extra memory, side by side.

- straightforward: written here the way the reference code writes it: BatchNorm1d(affine=False)
  on both views, the D×D matrix c = ẑ1ᵀẑ2 / N, on_diag = Σ(diag(c) − 1)², off_diag = Σ of the
  squared off-diagonal elements, taken as a copy (``off_diagonal``).
- correlation: ``barlow_twins_loss(path="correlation")`` (D×D matrix, no copies of it).
- gram: ``barlow_twins_loss(path="gram")`` (two N×N Gram matrices).
- lightly: the peer library's ``lightly.loss.BarlowTwinsLoss(lambda_param=0.0051,
  gather_distributed=False)`` (comparison only; its rows are skipped when lightly is not
  installed). Same definition as barlow: ``F.batch_norm`` in training mode (biased variance,
  eps 1e-5), c = ẑaᵀẑb / N, Σ(c_ii − 1)² + λ·Σ_{i≠j} c_ij² over a copy of the off-diagonal.
  A second table sets barlow's ``path="auto"`` (the path ``choose_path`` picks) against it.

Every (implementation, N, D) case runs in a fresh Python process, so that its peak resident set
size (``ru_maxrss``) belongs to that case alone: extra memory = peak RSS during the first
forward+backward minus the resident set just before it (inputs already allocated, libraries warmed
up on a tiny problem; glibc's mmap threshold at 64 KiB for that pass, so freed memory leaves the
RSS; 32 MiB for the timed passes). Time = median over repeated forward+backward passes after
that first one.

    python bench/loss_bench.py --out bench/results/loss_cpu.md
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import os
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
from machine import command_line, cpu_name, emit_report, have_lightly, lightly_version

SIZES = ((256, 2048), (256, 8192), (1024, 8192), (2048, 8192))
IMPLEMENTATIONS: tuple[str, ...] = ("straightforward", "correlation", "gram", "lightly")
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
    if name == "lightly":
        from lightly.loss import BarlowTwinsLoss  # imported in its own cases only

        # λ = 0.0051 as everywhere here (lightly's default is 0.005).
        lightly_loss = BarlowTwinsLoss(lambda_param=LAMBD, gather_distributed=False)
        return lambda z1, z2: lightly_loss(z1, z2)
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


def rss_mib() -> float:
    """Resident memory now (Linux /proc), MiB. The baseline of the extra peak: ru_maxrss before
    the pass may already be higher (building the inputs' temporaries), which hid small passes."""
    resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def set_mmap_threshold(size: int) -> None:
    """glibc's M_MMAP_THRESHOLD: buffers above ``size`` bytes are mmapped and unmapped on free.
    A small threshold makes the resident set follow live memory (for the memory pass); mmapped
    buffers fault their pages in again on every allocation, so the timed passes use a large one."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: the baseline is the resident set as it is
        return
    libc.mallopt(-3, size)  # M_MMAP_THRESHOLD


def run_case(name: str, n: int, d: int, budget_s: float) -> dict[str, float]:
    """One case, in this (fresh) process: first pass for memory, then timed repeats."""
    torch.set_num_threads(THREADS)
    tiny = inputs(8, 16)
    forward_backward(loss_function(name, 16), *tiny)  # thread pools and kernels initialised
    loss_fn = loss_function(name, d)
    z1, z2 = inputs(n, d)
    set_mmap_threshold(64 * 1024)  # memory pass: freed buffers leave the resident set
    before = rss_mib()
    start = time.perf_counter()
    loss = forward_backward(loss_fn, z1, z2)
    first_s = time.perf_counter() - start
    extra_mib = max_rss_mib() - before
    set_mmap_threshold(32 * 2**20)  # timed passes: glibc's largest default, buffers reused
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


Results = dict[tuple[str, int, int], dict[str, float]]


def ratio(a: float, b: float) -> str:
    """a / b, or "n/a" when b rounds to nothing (tiny sizes under the RSS resolution)."""
    return f"{a / b:.3f}" if b >= 0.5 else "n/a"


def table(
    results: Results, sizes: tuple[tuple[int, int], ...], names: tuple[str, ...]
) -> list[str]:
    lines = [
        "| N | D | implementation | auto picks | fwd+bwd median (s) | repeats | speed-up "
        "| extra peak RSS (MiB) | memory ratio | loss rel. diff. |",
        "|---:|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for n, d in sizes:
        base = results["straightforward", n, d]
        for name in names:
            r = results[name, n, d]
            lines.append(
                f"| {n} | {d} | {name} | {choose_path(n, d)} | {r['median_s']:.3f} "
                f"| {int(r['repeats'])} | {base['median_s'] / r['median_s']:.1f}× "
                f"| {r['extra_mib']:.0f} | {ratio(r['extra_mib'], base['extra_mib'])} "
                f"| {abs(r['loss'] - base['loss']) / abs(base['loss']):.1e} |"
            )
    return lines


def lightly_table(results: Results, sizes: tuple[tuple[int, int], ...]) -> list[str]:
    """barlow's ``path="auto"`` (the row of the path it picks) against lightly's loss."""
    lines = [
        "| N | D | auto picks | barlow auto (s) | lightly (s) | speed-up vs lightly "
        "| barlow auto extra RSS (MiB) | lightly extra RSS (MiB) | memory ratio vs lightly "
        "| loss rel. diff. |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n, d in sizes:
        path = choose_path(n, d)
        ours, peer = results[path, n, d], results["lightly", n, d]
        lines.append(
            f"| {n} | {d} | {path} | {ours['median_s']:.3f} | {peer['median_s']:.3f} "
            f"| {peer['median_s'] / ours['median_s']:.1f}× "
            f"| {ours['extra_mib']:.0f} | {peer['extra_mib']:.0f} "
            f"| {ratio(ours['extra_mib'], peer['extra_mib'])} "
            f"| {abs(ours['loss'] - peer['loss']) / abs(peer['loss']):.1e} |"
        )
    return lines


def report(
    results: Results, wall_s: float, sizes: tuple[tuple[int, int], ...], names: tuple[str, ...]
) -> str:
    cpu = cpu_name()
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    header = [
        "# Barlow Twins loss on CPU: forward+backward time and peak extra memory",
        "",
        f"Command: `{command_line()}`",
        "",
        f"- date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; "
        f"torch {torch.__version__}; {cpu}, {os.cpu_count()} logical CPUs, "
        f"torch.set_num_threads({THREADS}); float32 inputs",
        f"- load average at the end (1, 5, 15 min): {load}; whole run {wall_s:.0f} s",
        "- speed-up and memory ratio are relative to `straightforward` at the same (N, D); "
        "speed-up > 1 is faster, memory ratio < 1 is less memory",
        "- extra peak RSS: ru_maxrss of a fresh process during its first forward+backward minus "
        "its resident memory just before it (glibc M_MMAP_THRESHOLD 64 KiB for that pass, so "
        "freed buffers leave the resident set) (inputs allocated, libraries warmed up); "
        "includes the input "
        "gradients and allocator slack",
        "- loss rel. diff.: |loss − loss(straightforward)| / loss(straightforward), same inputs",
        "",
    ]
    lines = [*header, *table(results, sizes, names)]
    if "lightly" not in names:
        lines += ["", "lightly is not installed: its rows are skipped (bench/requirements.txt)."]
        return "\n".join([*lines, ""])
    lines += [
        "",
        '## barlow (`path="auto"`) against lightly',
        "",
        f"- lightly {lightly_version()}: `lightly.loss.BarlowTwinsLoss("
        f"lambda_param={LAMBD}, gather_distributed=False)` (its default λ is 0.005; {LAMBD} here "
        "as for every row)",
        '- barlow auto: the row of the path `choose_path(N, D)` picks (`path="auto"` runs '
        "exactly that path)",
        "- speed-up vs lightly: lightly time / barlow auto time (> 1: barlow is faster); memory "
        "ratio vs lightly: barlow auto extra peak RSS / lightly's (< 1: barlow needs less)",
        "- loss rel. diff.: |loss(barlow auto) − loss(lightly)| / loss(lightly), same inputs. "
        "Both use the same definition: each view standardised over the batch with the biased "
        "variance and eps 1e-5 (lightly: `F.batch_norm` in training mode), C = ẑaᵀẑb / N, "
        "L = Σ(1 − C_ii)² + λ·Σ_{i≠j} C_ij²; they differ only by float32 rounding",
        "",
        *lightly_table(results, sizes),
    ]
    return "\n".join([*lines, ""])


def parse_sizes(text: str) -> tuple[tuple[int, int], ...]:
    try:
        pairs = tuple(tuple(int(x) for x in item.split(":")) for item in text.split(","))
    except ValueError:
        pairs = ()
    if not pairs or any(len(p) != 2 or min(p) < 2 for p in pairs):
        raise argparse.ArgumentTypeError(f"--sizes wants N:D pairs such as 256:2048, got {text!r}")
    return pairs  # type: ignore[return-value]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the markdown report here as well")
    parser.add_argument("--budget", type=float, default=8.0, help="seconds of timed repeats")
    parser.add_argument(
        "--sizes",
        type=parse_sizes,
        default=SIZES,
        help="comma-separated N:D pairs (default 256:2048,256:8192,1024:8192,2048:8192); "
        "small ones to check the script quickly",
    )
    parser.add_argument("--case", nargs=3, metavar=("IMPL", "N", "D"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        name, n, d = args.case[0], int(args.case[1]), int(args.case[2])
        print(json.dumps(run_case(name, n, d, args.budget)))
        return
    names = IMPLEMENTATIONS
    if not have_lightly():
        names = tuple(name for name in IMPLEMENTATIONS if name != "lightly")
        print(
            "note: lightly is not importable; its rows are skipped "
            "(pip install -r bench/requirements.txt)",
            file=sys.stderr,
        )
    start = time.perf_counter()
    results = {}
    for n, d in args.sizes:
        for name in names:
            results[name, n, d] = run_in_subprocess(name, n, d, args.budget)
            r = results[name, n, d]
            print(
                f"N={n} D={d} {name}: {r['median_s']:.3f} s, +{r['extra_mib']:.0f} MiB",
                file=sys.stderr,
            )
    text = report(results, time.perf_counter() - start, args.sizes, names)
    emit_report(text, args.out)


if __name__ == "__main__":
    main()
