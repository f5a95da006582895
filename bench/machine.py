"""What every benchmark script shares: the machine and the command its report names, the peers it
compares against, and how the report is written."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from pathlib import Path


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def simd_flags() -> str:
    """The CPU's vector extensions that decide the default precision (bf16 where native)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "flags unknown"
    flags = set(next((line for line in text.splitlines() if line.startswith("flags")), "").split())
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
    return " ".join(f for f in wanted if f in flags) or "no AVX2"


def command_line() -> str:
    """The command that ran this script, as a reader repeats it (with its ``PYTHONPATH``)."""
    pythonpath = f"PYTHONPATH={os.environ['PYTHONPATH']} " if "PYTHONPATH" in os.environ else ""
    return f"{pythonpath}python {' '.join(sys.argv)}"


def have_lightly() -> bool:
    """Whether the peer library lightly imports (bench/requirements.txt; never a dependency)."""
    try:
        from lightly.loss import BarlowTwinsLoss  # noqa: F401
    except Exception:  # ImportError, or a lightly that breaks on this torch
        return False
    return True


def lightly_version() -> str:
    try:
        return importlib.metadata.version("lightly")
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def emit_report(text: str, out: Path | None) -> None:
    """Print the Markdown report, and write it to ``out`` too when given (folders created)."""
    print(text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
