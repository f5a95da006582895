"""The run directory is never lost: one command for the first launch and a requeued restart, a
failed attempt that leaves config.json as its checkpoint wrote it, and the last mile (export,
final evaluation) completed by --resume after a kill."""

from __future__ import annotations

import importlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from barlow import checkpoint
from barlow.cli import main
from barlow.config import Config, load_config
from barlow.methods import BarlowTwins
from barlow.rundir import LOCK_NAME, RunDir, run_lock
from barlow.training import CHECKPOINT_NAME, pretrain
from runs import FAST, records, sets, weights

EVALUATED = [
    *(o for o in FAST if not o.startswith("eval.final")),
    "eval.final=true",
    "eval.baselines=false",
    "eval.probe_epochs=5",
]
# what the machine decides: the clock, memory, and the thread count (cpu_share)
TIMINGS = ("epoch_time_s", "images_per_s", "peak_memory_mib", "knn_time_s", "threads")


def outputs(run: Path) -> list[Path]:
    """Every file of a run but its lock (which names the last process to hold it)."""
    return [p for p in run.rglob("*") if p.is_file() and p.name != LOCK_NAME]


def contents(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in outputs(run)}


def fast(*extra: str) -> Config:
    return load_config("digits", [*FAST, *extra])


# Item 4: --resume on an existing directory without a checkpoint starts the run, saying so.


def test_resume_in_an_empty_directory_starts_the_run_and_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pretrain(fast("train.max_steps=3"), tmp_path / "plain", progress=False)
    (tmp_path / "requeued").mkdir()
    pretrain(fast("train.max_steps=3"), tmp_path / "requeued", resume=True, progress=False)
    assert "holds no checkpoint yet; starting the run from the beginning" in capsys.readouterr().err
    plain, requeued = weights(tmp_path / "plain"), weights(tmp_path / "requeued")
    assert all(torch.equal(plain[k], requeued[k]) for k in plain)


def test_resume_after_a_death_before_the_first_checkpoint_starts_the_run(tmp_path: Path) -> None:
    """The directory of a run killed before its first checkpoint: config.json and a log, no
    checkpoint. The same command with --resume (a requeue) runs it; without, it is refused."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"config": fast().to_dict()}))
    (run / "metrics.jsonl").write_text('{"kind": "train", "step": 1, "loss": 9.0}\n')
    args = ["pretrain", "--quiet", "--out", str(run), *sets(*FAST, "train.max_steps=2")]
    assert main(args) == 2  # without --resume: "already holds a run"
    assert main([*args, "--resume"]) == 0
    assert checkpoint.load_checkpoint(run / CHECKPOINT_NAME)["global_step"] == 2


def test_resume_of_damaged_checkpoints_only_is_refused_and_touches_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / CHECKPOINT_NAME).write_bytes(b"not a checkpoint")
    (tmp_path / "config.json").write_text("{}")
    before = contents(tmp_path)
    args = ["pretrain", "--quiet", "--out", str(tmp_path), "--resume", *sets(*FAST)]
    with pytest.warns(RuntimeWarning, match="skipping checkpoint: cannot read checkpoint"):
        assert main(args) == 2
    err = capsys.readouterr().err
    assert "holds no valid checkpoint (every one is damaged: checkpoint.pt)" in err
    assert contents(tmp_path) == before


# Item 5: a diverging resume skips within its budget, else stops naming the step and the last
# checkpoint (exit 1), and config.json stays the one of the run that wrote that checkpoint.


def test_a_diverging_resume_leaves_config_json_as_the_checkpoint_wrote_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["pretrain", "--quiet", "--out", str(tmp_path), *sets(*FAST)]
    assert main([*args, *sets("train.max_steps=2")]) == 0
    kept = {name: (tmp_path / name).read_bytes() for name in ("config.json", CHECKPOINT_NAME)}
    forward = BarlowTwins.forward

    def diverged(self: BarlowTwins, views: list[torch.Tensor]) -> Any:
        views = [v.clone() for v in views]
        views[0][0, 0, 0, 0] = float("inf")  # what a learning rate of 1e4 does to the weights
        return forward(self, views)

    monkeypatch.setattr(BarlowTwins, "forward", diverged)
    capsys.readouterr()
    code = main([*args, "--resume", *sets("optim.lr=10000.0", "train.max_steps=4")])
    err = capsys.readouterr().err
    assert code == 1, err  # the run failed (not "bad input", 2): the loss's check did not raise
    assert "at step 2 (epoch 1)" in err and f"last good checkpoint: {tmp_path}" in err
    assert {name: (tmp_path / name).read_bytes() for name in kept} == kept
    assert json.loads(kept["config.json"])["config"]["optim"]["lr"] != 10000.0


def test_config_json_follows_the_checkpoint_of_a_resumed_run(tmp_path: Path) -> None:
    pretrain(fast("train.max_steps=2"), tmp_path, progress=False)
    pretrain(fast("train.max_steps=4", "optim.lr=0.3"), tmp_path, resume=True, progress=False)
    saved = checkpoint.load_checkpoint(tmp_path / CHECKPOINT_NAME)
    record = json.loads((tmp_path / "config.json").read_text())
    assert saved["global_step"] == 4 and record["config"] == saved["config"]
    assert record["config"]["optim"]["lr"] == 0.3


# Item 3: a run is finished when its outputs exist; --resume writes whatever a kill left out.


def comparable(metrics: dict[str, Any]) -> dict[str, Any]:
    """metrics.json without the wall-clock fields (they differ between any two runs)."""
    pretrain_part = {k: v for k, v in metrics["pretrain"].items() if k not in TIMINGS}
    return {**metrics, "pretrain": pretrain_part}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("uninterrupted")
    pretrain(load_config("digits", [*EVALUATED, "train.max_steps=4"]), run, progress=False)
    return run


def test_a_run_killed_in_its_final_evaluation_is_completed_by_resume(
    tmp_path: Path, uninterrupted: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = importlib.import_module("barlow.training.pretrain")  # the package exports pretrain()

    cfg = load_config("digits", [*EVALUATED, "train.max_steps=4"])

    def killed(*args: Any, **kwargs: Any) -> Any:
        (tmp_path / ".metrics.json.x1y2.tmp").write_text("{")  # a write cut short
        raise KeyboardInterrupt

    monkeypatch.setattr(module, "final_evaluation", killed)
    with pytest.raises(KeyboardInterrupt):
        pretrain(cfg, tmp_path, progress=False)
    assert (tmp_path / "backbone.safetensors").exists() and not (tmp_path / "metrics.json").exists()
    monkeypatch.undo()
    result = pretrain(cfg, tmp_path, resume=True, progress=False)
    written = json.loads((tmp_path / "metrics.json").read_text())
    expected = json.loads((uninterrupted / "metrics.json").read_text())
    assert comparable(written) == comparable(expected) and comparable(result) == comparable(written)
    assert not list(tmp_path.glob(".*.tmp"))
    before = {p: p.stat().st_mtime_ns for p in outputs(tmp_path)}
    pretrain(cfg, tmp_path, resume=True, progress=False)  # complete now: a no-op
    assert {p: p.stat().st_mtime_ns for p in outputs(tmp_path)} == before


def kill_when(run: Path, path: Path, delay_s: float, overrides: list[str]) -> bool:
    """Start ``barlow pretrain`` into ``run``, SIGKILL it ``delay_s`` after ``path`` appears;
    whether it was still running then with ``metrics.json`` not yet written."""
    argv = [sys.executable, "-m", "barlow", "pretrain", "--quiet", "--out", str(run), *overrides]
    proc = subprocess.Popen(argv, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not path.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    time.sleep(delay_s)
    cut_short = proc.poll() is None and not (run / "metrics.json").exists()
    proc.kill()
    proc.wait()
    return cut_short


def test_sigkill_after_the_last_checkpoint_then_resume_gives_the_uninterrupted_outputs(
    tmp_path: Path, uninterrupted: Path
) -> None:
    """A real process killed (SIGKILL) after its last checkpoint was written: as the checkpoint
    appears, as the backbone appears (in the final evaluation), and at random moments after
    (``BARLOW_KILL_TRIALS``, default 2). --resume writes the same metrics.json (but its timings)
    and the same backbone.safetensors, byte for byte, and no temp file is left."""
    overrides = sets(*EVALUATED, "train.max_steps=4")
    rng = random.Random(0)
    trials = [("checkpoint.pt", 0.0), ("backbone.safetensors", 0.0)]
    trials += [("checkpoint.pt", rng.uniform(0.0, 1.0))
               for _ in range(int(os.environ.get("BARLOW_KILL_TRIALS", "2")))]  # fmt: skip
    for n, (name, delay) in enumerate(trials):
        run = tmp_path / f"trial{n}"
        cut_short = kill_when(run, run / name, delay, overrides)
        assert cut_short or delay > 0, f"trial {n}: the kill came after the run had finished"
        assert main(["pretrain", "--quiet", "--out", str(run), "--resume", *overrides]) == 0
        written = json.loads((run / "metrics.json").read_text())
        expected = json.loads((uninterrupted / "metrics.json").read_text())
        assert comparable(written) == comparable(expected), n
        backbone = (run / "backbone.safetensors").read_bytes()
        assert backbone == (uninterrupted / "backbone.safetensors").read_bytes(), n
        assert not list(run.glob(".*.tmp")), n


def test_every_output_of_a_run_gets_the_same_file_mode(uninterrupted: Path) -> None:
    """Item 13: metrics.json was written 0600 while the other files were 0644 (the umask's)."""
    names = ("config.json", "metrics.json", "backbone.safetensors", CHECKPOINT_NAME)
    modes = {name: (uninterrupted / name).stat().st_mode & 0o777 for name in names}
    assert len(set(modes.values())) == 1, modes


# Item 2: one run per directory at a time; a dead holder does not block it.

HOLDER = """
import sys, time
from pathlib import Path
from barlow.rundir import RunDir, run_lock
with run_lock(RunDir(Path(sys.argv[1]))):
    print("locked", flush=True)
    time.sleep(120)
"""


def test_a_second_run_into_a_locked_directory_is_refused_naming_the_holder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["pretrain", "--quiet", "--out", str(tmp_path), *sets(*FAST, "train.max_steps=2")]
    with run_lock(RunDir(tmp_path)):
        assert main(args) == 2
        assert main([*args, "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count(f"is in use by another barlow run (pid {os.getpid()} on ") == 2, err
    assert not (tmp_path / CHECKPOINT_NAME).exists()
    assert main(args) == 0  # released: the directory is free again


def test_a_lock_left_by_a_killed_process_does_not_block_resume(tmp_path: Path) -> None:
    """The holder is SIGKILLed (``BARLOW_LOCK_TRIALS`` times, default 2): while it lives a run is
    refused; once it is dead the same command (with --resume) runs."""
    args = ["pretrain", "--quiet", "--out", str(tmp_path), *sets(*FAST, "train.epochs=3")]
    for trial in range(int(os.environ.get("BARLOW_LOCK_TRIALS", "2"))):  # 1 step each, ≤ 33
        holder = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True
        )
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        assert main([*args, "--resume", *sets(f"train.max_steps={1 + trial}")]) == 2
        holder.kill()
        holder.wait()
        assert main([*args, "--resume", *sets(f"train.max_steps={1 + trial}")]) == 0
        assert checkpoint.load_checkpoint(tmp_path / CHECKPOINT_NAME)["global_step"] == 1 + trial


def test_two_runs_started_at_once_into_one_directory_do_not_mix(tmp_path: Path) -> None:
    """Two real processes (seeds 1 and 2) into one --out: one is refused (exit 2, naming the
    other), the other finishes; config.json, the checkpoint and every log line are the winner's."""
    argv = [sys.executable, "-m", "barlow", "pretrain", "--quiet", "--out", str(tmp_path)]
    runs = [
        subprocess.Popen(
            [*argv, *sets(*FAST, "train.max_steps=3", "train.log_every=1", f"train.seed={seed}")],
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed in (1, 2)
    ]
    results = [(run.wait(timeout=600), run.stderr.read() if run.stderr else "") for run in runs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert "is in use by another barlow run (pid " in loser
    winner_seed = 1 if results[0][0] == 0 else 2
    record = json.loads((tmp_path / "config.json").read_text())
    assert record["config"]["train"]["seed"] == winner_seed
    saved = checkpoint.load_checkpoint(tmp_path / CHECKPOINT_NAME)
    assert saved["config"]["train"]["seed"] == winner_seed and saved["global_step"] == 3
    steps = [
        json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == sorted(steps) and len(steps) == len(set(steps))  # one run's records


# Item 13: the epoch's loss after a mid-epoch resume is over the whole epoch.


def test_the_epoch_loss_after_a_mid_epoch_resume_covers_the_whole_epoch(tmp_path: Path) -> None:
    """Before, the resumed run's epoch record held the mean over the 6 resumed steps only."""
    logged = "train.log_every=1"
    pretrain(fast(logged), tmp_path / "whole", progress=False)
    pretrain(fast(logged, "train.max_steps=5"), tmp_path / "resumed", progress=False)
    pretrain(fast(logged), tmp_path / "resumed", resume=True, progress=False)
    (whole,) = records(tmp_path / "whole", "epoch")
    (resumed,) = records(tmp_path / "resumed", "epoch")
    assert resumed["loss"] == whole["loss"]
    steps = [r["loss"] for r in records(tmp_path / "whole", "train")]
    # the epoch's mean is a float32 sum; 1e-5 relative is float32 rounding over 11 terms
    assert len(steps) == 11 and abs(sum(steps) / 11 - whole["loss"]) < 1e-5 * abs(whole["loss"])


# Item 12: Ctrl-C saves a checkpoint as SIGTERM does, says how to resume, and exits 130.


def test_ctrl_c_saves_a_checkpoint_says_how_to_resume_and_exits_130(tmp_path: Path) -> None:
    """SIGINT to the whole process group, as a terminal sends it (the DataLoader worker gets it
    too). Before: exit 130 with no checkpoint of the steps done."""
    run = tmp_path / "run"
    overrides = sets(*FAST, "train.epochs=20", "train.log_every=1", "data.num_workers=1")
    argv = [sys.executable, "-m", "barlow", "pretrain", "--quiet", "--out", str(run), *overrides]
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        log = run / "metrics.jsonl"
        while not (log.exists() and '"kind": "train"' in log.read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, "no step logged"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err[-2000:]
    assert "SIGINT: saved" in err and "continue with --resume" in err, err[-2000:]
    assert "Traceback" not in err and "exited unexpectedly" not in err, err[-2000:]
    saved = checkpoint.load_checkpoint(run / CHECKPOINT_NAME)["global_step"]
    assert 1 <= saved < 20 * 11
    resumed = ["pretrain", "--quiet", "--out", str(run), "--resume", *overrides]
    assert main([*resumed, *sets(f"train.max_steps={saved + 1}")]) == 0
    assert checkpoint.load_checkpoint(run / CHECKPOINT_NAME)["global_step"] == saved + 1
