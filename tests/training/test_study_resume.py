"""A study killed inside its second point (SIGKILL of the study and its training process) and run
again finishes with the numbers of an uninterrupted run: the finished point is skipped, the
killed one resumes bit for bit from its last checkpoint. A point stopped by a signal to its
training process alone stops the study."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from processes import run_group
from runs import TINY_POINT, sets

# 3 epochs of 4 steps on 512 digits images, a checkpoint after each epoch.
SWEEP = [
    "sweep",
    "digits",
    "--grid",
    "method.lambd=0.005,0.01",
    *sets(*TINY_POINT, "train.epochs=3"),
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


FIRST = "method.lambd=0.005,seed=0"


@pytest.mark.slow
def test_a_point_stopped_by_a_signal_stops_the_study(tmp_path: Path) -> None:
    """SIGTERM (a preemption) to the training process alone: its run saves and stops, and the
    study stops with it (exit 143) instead of calling the point failed and starting the next;
    the same command then finishes both points."""
    out = tmp_path / "study"
    proc = subprocess.Popen(
        _command(out),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    checkpoint, deadline = out / FIRST / "checkpoint.pt", time.monotonic() + 600
    try:
        while not checkpoint.exists():
            assert proc.poll() is None, "the sweep ended before its first point checkpointed"
            assert time.monotonic() < deadline, "the first point wrote no checkpoint in time"
            time.sleep(0.05)
        (trainer,) = psutil.Process(proc.pid).children()
        trainer.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 143, err
    assert f"point {FIRST} stopped" in err and "run the same command again" in err
    assert not (out / SECOND).exists()  # the next point never started
    assert _records(out)[FIRST]["status"] == "interrupted"
    env = {k: v for k, v in os.environ.items() if k != "SLURM_ARRAY_TASK_ID"}
    again = run_group(_command(out), env, 900)
    assert again.returncode == 0, again.stderr
    assert [r["status"] for r in _records(out).values()] == ["ok", "ok"]
