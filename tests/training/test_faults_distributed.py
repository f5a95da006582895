"""Faults on one of 2 gloo processes end both: an exception, a hang, a NaN loss, a signal.

Each test starts 2 `barlow pretrain` processes the way torchrun would (``WORLD_SIZE``, ``RANK``,
``MASTER_*`` in the environment) but without torchrun's agent, which would kill the survivor for
us: what ends rank 0 here is barlow and its collectives. A fault is injected into rank 1 only, at
its k-th forward pass (= step k, counted from 1).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from barlow import checkpoint
from barlow.preemption import EXIT_CODE
from barlow.training import CHECKPOINT_NAME
from barlow.training.state import validate_training_checkpoint
from processes import free_port
from runs import records, sets

BOUND_S = 60  # R22: every rank has exited this long after the fault
STEPS_PER_EPOCH = 1437 // 256  # digits, 2 processes × 128
RUN = [
    'method.projector="32-32"',
    "train.batch_size=256",
    "train.epochs=2",
    "train.log_every=1",
    "optim.warmup_epochs=1",
    "eval.online_knn_every=0",
    "eval.final=false",
]
WORKER = """
import os, signal, sys, time
from barlow.cli import main
from barlow.methods import BarlowTwins

mode, fault_step, hang_s, stamp = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
rank, calls, forward = int(os.environ["RANK"]), 0, BarlowTwins.forward

def faulty(self, views):
    global calls
    calls += 1
    hit = rank == 1 and calls == fault_step
    if hit:
        with open(stamp, "w") as fh:
            fh.write(repr(time.time()))
    if hit and mode == "raise":
        raise RuntimeError("fault injected on rank 1")
    if hit and mode == "hang":
        time.sleep(hang_s)
    if hit and mode == "sigterm":
        os.kill(os.getpid(), signal.SIGTERM)
    if hit and mode == "nan-data":
        views = [v.clone() for v in views]
        views[0][0, 0, 0, 0] = float("nan")
    out = forward(self, views)
    if hit and mode == "nan":
        out.loss = out.loss * float("nan")
    return out

BarlowTwins.forward = faulty
sys.exit(main(sys.argv[5:]))
"""


@dataclass
class Rank:
    code: int
    exited_after_fault_s: float
    stderr: str


def launch(
    tmp_path: Path, mode: str, fault_step: int, *extra: str, hang_s: float = 0.0
) -> list[Rank]:
    """Run 2 processes with a fault on rank 1; every rank's exit code, exit time and stderr."""
    script, stamp, out = tmp_path / "worker.py", tmp_path / "fault-time", tmp_path / "run"
    script.write_text(WORKER)
    argv = [sys.executable, str(script), mode, str(fault_step), str(hang_s), str(stamp)]
    argv += ["pretrain", "--quiet", "--out", str(out), *sets(*RUN, *extra)]
    port = free_port()
    procs, logs = [], []
    for rank in range(2):
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "WORLD_SIZE": "2",
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        # stderr to a file: a full pipe would block the child and look like a hang
        logs.append((tmp_path / f"rank{rank}.err").open("w+"))
        procs.append(subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=logs[-1]))
    exits: list[float | None] = [None, None]
    deadline = time.time() + 600  # startup (imports, data) on a busy machine; then the bound
    try:
        while None in exits and time.time() < deadline:
            written = stamp.read_text() if stamp.exists() else ""  # empty while being written
            if written:
                deadline = min(deadline, float(written) + BOUND_S)
            for rank, proc in enumerate(procs):
                if exits[rank] is None and proc.poll() is not None:
                    exits[rank] = time.time()
            time.sleep(0.05)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    stderr = []
    for log in logs:
        log.seek(0)
        stderr.append(log.read())
        log.close()
    assert stamp.exists(), f"the fault was never reached: {[e[-1500:] for e in stderr]}"
    assert None not in exits, f"a rank was still running {BOUND_S} s after the fault: {stderr}"
    fault = float(stamp.read_text())
    ranks = [
        Rank(p.returncode, exit - fault, err)
        for p, exit, err in zip(procs, exits, stderr, strict=True)  # type: ignore[operator]
    ]
    print(
        f"{mode}: exit codes {[r.code for r in ranks]}, exited "
        f"{[round(r.exited_after_fault_s, 1) for r in ranks]} s after the fault"
    )
    return ranks


def test_an_exception_on_one_rank_ends_both(tmp_path: Path) -> None:
    ranks = launch(tmp_path, "raise", 2)
    # exit 1: the uncaught RuntimeError on rank 1, the collective's error on rank 0 (a code
    # other than 1 would be a crash, a signal or a refusal, not this fault)
    assert [r.code for r in ranks] == [1, 1], [r.stderr[-1500:] for r in ranks]
    assert "fault injected on rank 1" in ranks[1].stderr
    # rank 0 learns it from its collective (gloo: "Connection closed by peer", or reset)
    assert "fault injected" not in ranks[0].stderr and "gloo" in ranks[0].stderr


def test_a_hung_rank_times_out_the_other(tmp_path: Path) -> None:
    """Rank 1 stalls 10 s at step 2; with train.dist_timeout_s=3 rank 0's collective gives up and
    rank 0 exits, its error naming the timeout; rank 1 then finds rank 0 gone and exits too."""
    ranks = launch(tmp_path, "hang", 2, "train.dist_timeout_s=3", hang_s=10)
    assert all(r.code != 0 for r in ranks), [r.stderr[-1500:] for r in ranks]
    # the timeout, not rank 1's later exit, is what ended rank 0
    assert "timed out" in ranks[0].stderr.lower(), ranks[0].stderr[-1500:]


def test_a_non_finite_loss_on_one_rank_stops_both_at_the_same_step(tmp_path: Path) -> None:
    fault_step = STEPS_PER_EPOCH + 2  # inside epoch 2, after the epoch-1 checkpoint
    ranks = launch(tmp_path, "nan", fault_step)
    step = f"at step {fault_step - 1} (epoch 2)"
    for rank in ranks:
        assert rank.code == 1, rank.stderr[-1500:]
        assert "error: loss per process is [" in rank.stderr and "nan]" in rank.stderr
        assert step in rank.stderr and "last good checkpoint:" in rank.stderr
        assert f"{CHECKPOINT_NAME} (epoch 1)" in rank.stderr
    run = tmp_path / "run"
    state = validate_training_checkpoint(run / CHECKPOINT_NAME)  # complete, every tensor finite
    assert (state["epoch"], state["global_step"]) == (1, STEPS_PER_EPOCH)
    for snapshot in run.glob("checkpoint-step*.pt"):
        validate_training_checkpoint(snapshot)
    assert all(torch.isfinite(t).all() for t in state["method"].values() if t.is_floating_point())


@pytest.mark.parametrize("mode", ["nan", "nan-data"])
def test_skip_nonfinite_skips_a_step_that_is_non_finite_on_one_rank(
    tmp_path: Path, mode: str
) -> None:
    """train.skip_nonfinite=1 with 2 processes: a NaN loss (or a NaN pixel, which also passes
    through BatchNorm) on rank 1 alone is skipped by both ranks at the same step; the run
    finishes with every tensor finite, and the log names the skipped step once."""
    fault_step = STEPS_PER_EPOCH + 2
    ranks = launch(tmp_path, mode, fault_step, "train.skip_nonfinite=1")
    assert [r.code for r in ranks] == [0, 0], [r.stderr[-1500:] for r in ranks]
    state = validate_training_checkpoint(tmp_path / "run" / CHECKPOINT_NAME)  # every tensor finite
    assert (state["epoch"], state["global_step"]) == (2, 2 * STEPS_PER_EPOCH)
    skips = [r for r in records(tmp_path / "run") if "skipped_nonfinite" in r]
    assert [(r["step"], r["skipped_nonfinite"]) for r in skips] == [(fault_step - 1, 1)]
    assert "loss per process is [" in ranks[0].stderr and "skipped a step (1/1" in ranks[0].stderr


def test_a_signal_to_one_rank_stops_both(tmp_path: Path) -> None:
    """R11: SIGTERM reaches rank 1 only; the ranks agree, rank 0 saves, both exit 143."""
    ranks = launch(tmp_path, "sigterm", 3)
    assert [r.code for r in ranks] == [EXIT_CODE, EXIT_CODE], [r.stderr[-1500:] for r in ranks]
    state = checkpoint.load_checkpoint(tmp_path / "run" / CHECKPOINT_NAME)
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (0, 3, 3)
