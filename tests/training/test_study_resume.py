"""A study killed inside its second point (SIGKILL of the study and its training process) and run
again finishes with the numbers of an uninterrupted run: the finished point is skipped, the
killed one resumes bit for bit from its last checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from processes import run_group
from runs import sets

# 3 epochs of 4 steps on 512 digits images, a checkpoint after each epoch.
SWEEP = [
    "sweep",
    "digits",
    "--grid",
    "method.lambd=0.005,0.01",
    *sets(
        'method.projector="16-16"',
        "data.train_subset=512",
        "train.batch_size=128",
        "train.epochs=3",
        "train.log_every=2",
        "optim.warmup_epochs=1",
        "eval.online_knn_every=0",
        "eval.baselines=false",
        "eval.probe_epochs=5",
        "eval.knn_k=20",
        'data.augment_on="device"',
    ),
]
SECOND = "method.lambd=0.01,seed=0"


def _command(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "barlow", *SWEEP, "--out", str(out), *extra]


def _records(out: Path) -> dict[str, dict[str, Any]]:
    lines = (out / "results.jsonl").read_text().splitlines()
    return {r["name"]: r for r in map(json.loads, lines)}


def _kill_inside_second_point(out: Path, timeout: float = 600) -> None:
    """Start the sweep; SIGKILL its process group once the second point has written its first
    checkpoint (it is then training its second epoch)."""
    proc = subprocess.Popen(
        _command(out),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    checkpoint, deadline = out / SECOND / "checkpoint.pt", time.monotonic() + timeout
    try:
        while not checkpoint.exists():
            assert proc.poll() is None, "the sweep ended before its second point checkpointed"
            assert time.monotonic() < deadline, "the second point wrote no checkpoint in time"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.mark.slow
def test_killed_study_resumes_to_the_uninterrupted_numbers(tmp_path: Path) -> None:
    env = dict(os.environ)
    env.pop("SLURM_ARRAY_TASK_ID", None)
    reference = run_group(_command(tmp_path / "reference", "--point", "1"), env, 900)
    assert reference.returncode == 0, reference.stderr

    out = tmp_path / "study"
    _kill_inside_second_point(out)
    assert not (out / SECOND / "metrics.json").exists()  # killed inside the point
    first_checkpoint = out / "method.lambd=0.005,seed=0" / "checkpoint.pt"
    first_mtime = first_checkpoint.stat().st_mtime_ns

    again = run_group(_command(out), env, 900)
    assert again.returncode == 0, again.stderr
    assert "finished before, skipped" in again.stderr
    assert f"resumed from {out / SECOND / 'checkpoint.pt'} at epoch 2" in again.stderr
    assert first_checkpoint.stat().st_mtime_ns == first_mtime
    records, expected = _records(out), _records(tmp_path / "reference")[SECOND]
    assert [r["status"] for r in records.values()] == ["ok", "ok"]
    resumed = records[SECOND]
    assert (resumed["knn_top1"], resumed["linear_top1"]) == (
        expected["knn_top1"],
        expected["linear_top1"],
    )
    assert resumed["loss"] == expected["loss"] and resumed["epochs"] == 3
    assert (out / "results.md").is_file() and (out / "results.png").is_file()
