"""``--overwrite`` never loses the old run to a new one that fails (issue 15, item 1): the new run
trains in ``.overwrite-staging/`` until its first checkpoint, then swaps itself in; a failure or
a kill before that leaves the old run byte-identical, a kill during the swap is finished at the
next start, and a finished overwrite leaves nothing of the old run (no stale TensorBoard events)
but the user's own files."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from barlow import checkpoint
from barlow.cli import main
from barlow.rundir import REPLACED_NAME, STAGING_NAME, Replacement, RunDir, recover_replacement
from barlow.training import CHECKPOINT_NAME
from barlow.training.loop import TrainingLoop
from runs import FAST, records, sets

OLD = [*FAST, "train.epochs=2", "eval.final=true", "eval.baselines=false", "eval.probe_epochs=2"]
NEW = [*FAST, "train.seed=7", 'method.projector="32-32"', "train.log_every=1"]
TRIALS = int(os.environ.get("BARLOW_OVERWRITE_TRIALS", "2"))


def digest(run: Path) -> dict[str, str]:
    """SHA-256 of every file of a run (config.json, logs, events, snapshots) but its lock."""
    return {
        str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


@pytest.fixture(scope="module")
def old_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished, evaluated run with snapshots, TensorBoard events and a file of the user's."""
    run = tmp_path_factory.mktemp("old") / "run"
    assert main(["pretrain", "--quiet", "--out", str(run), *sets(*OLD)]) == 0
    (run / "notes.txt").write_text("the user's own file\n")
    assert list(run.glob("checkpoint-step*.pt")) and (run / "metrics.json").is_file()
    return run


@pytest.fixture
def run(old_run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(old_run, copy)
    return copy


def overwrite(run: Path, *overrides: str) -> int:
    return main(["pretrain", "--quiet", "--out", str(run), "--overwrite", *sets(*overrides)])


def no_replacement_left(run: Path) -> bool:
    return not (run / STAGING_NAME).exists() and not (run / REPLACED_NAME).exists()


def interrupt_at_step_3(monkeypatch: pytest.MonkeyPatch) -> None:
    step = TrainingLoop.step

    def interrupted(self: TrainingLoop, *args: Any) -> bool:
        if self.state.global_step == 3:
            raise KeyboardInterrupt
        return step(self, *args)

    monkeypatch.setattr(TrainingLoop, "step", interrupted)


FAILURES: dict[str, tuple[list[str], int, Callable[[pytest.MonkeyPatch], None] | None]] = {
    "bad data": (['data.dataset="{empty}"'], 2, None),
    "impossible batch size": (["train.batch_size=100000"], 2, None),
    "diverges before its first checkpoint": (["optim.lr=1e6", "train.skip_nonfinite=0"], 1, None),
    "interrupted (Ctrl-C) before its first checkpoint": ([], 130, interrupt_at_step_3),
}


@pytest.mark.parametrize("failure", FAILURES)
def test_a_failed_overwrite_leaves_the_old_run_byte_identical(
    run: Path, tmp_path: Path, failure: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: the old run's checkpoint, snapshots, config.json and metrics were deleted first,
    then the new run failed (exit 2) and nothing was left."""
    (tmp_path / "empty").mkdir()
    overrides, code, patch = FAILURES[failure]
    if patch is not None:
        patch(monkeypatch)
    before = digest(run)
    overrides = [o.format(empty=tmp_path / "empty") for o in overrides]
    assert overwrite(run, *NEW, *overrides) == code
    assert digest(run) == before
    assert no_replacement_left(run)


def test_the_old_run_is_whole_until_the_new_one_has_written_its_first_checkpoint(
    run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before, seen = digest(run), []
    save = TrainingLoop.save

    def watched(self: TrainingLoop) -> None:
        outside_staging = {k: v for k, v in digest(run).items() if not k.startswith(STAGING_NAME)}
        seen.append(outside_staging == before)  # the new run so far is in its staging folder
        save(self)

    monkeypatch.setattr(TrainingLoop, "save", watched)
    assert overwrite(run, *NEW) == 0
    assert seen == [True]


def test_a_finished_overwrite_leaves_nothing_of_the_old_run_but_the_users_files(
    run: Path, old_run: Path
) -> None:
    old_events = {p.name for p in (old_run / "tensorboard").iterdir()}
    assert overwrite(run, *NEW) == 0
    saved = checkpoint.load_checkpoint(run / CHECKPOINT_NAME)
    assert saved["config"]["train"]["seed"] == 7 and saved["global_step"] == 11
    assert json.loads((run / "config.json").read_text())["config"]["train"]["seed"] == 7
    assert [r["step"] for r in records(run, "train")] == list(range(1, 12))  # the new run's only
    assert not (run / "metrics.json").exists()  # the old evaluation is gone; this run has none
    assert [p.name for p in run.glob("checkpoint-step*.pt")] == ["checkpoint-step00000011.pt"]
    events = {p.name for p in (run / "tensorboard").iterdir()}
    assert events and not events & old_events  # no stale TensorBoard events
    assert (run / "notes.txt").read_text() == "the user's own file\n"
    assert no_replacement_left(run)


def test_overwrite_of_a_directory_without_a_run_writes_there_directly(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine\n")
    assert overwrite(tmp_path, *NEW, "train.max_steps=2") == 0
    assert (tmp_path / CHECKPOINT_NAME).is_file() and (tmp_path / "notes.txt").is_file()
    assert no_replacement_left(tmp_path)


# The swap itself: a kill between any two of its renames is finished at the next start.


def staged_swap(base: Path) -> Replacement:
    """A directory holding an old run, a user file and a staged new run (files named after
    what they hold), ready to commit."""
    target = RunDir(base / "run")
    target.path.mkdir()
    for name in ("config.json", "metrics.jsonl", "metrics.json", CHECKPOINT_NAME,
                 "checkpoint-step00000001.pt", "backbone.safetensors", ".config.json.x.tmp",
                 "tensorboard/events.old", "notes.txt"):  # fmt: skip
        (target.path / name).parent.mkdir(exist_ok=True)
        (target.path / name).write_text(f"old {name}")
    replacement = Replacement(target)
    staging = replacement.begin().path
    for name in ("config.json", "metrics.jsonl", CHECKPOINT_NAME, "tensorboard/events.new"):
        (staging / name).parent.mkdir(exist_ok=True)
        (staging / name).write_text(f"new {name}")
    return replacement


SWAPPED = {
    "config.json": "new config.json",
    "metrics.jsonl": "new metrics.jsonl",
    CHECKPOINT_NAME: f"new {CHECKPOINT_NAME}",
    "tensorboard/events.new": "new tensorboard/events.new",
    "notes.txt": "old notes.txt",
}


def files(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): p.read_text() for p in path.rglob("*") if p.is_file()}


def test_a_swap_without_a_kill_gives_the_new_run_and_the_users_files(tmp_path: Path) -> None:
    replacement = staged_swap(tmp_path)
    replacement.commit()
    assert files(replacement.target.path) == SWAPPED


@pytest.mark.parametrize("renames_done", range(12))
def test_a_kill_during_the_swap_is_finished_at_the_next_start(
    tmp_path: Path, renames_done: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kill comes after ``renames_done`` renames (there are 11 in all); the run's own error
    handler (abandon) must not delete the staged run once the swap has begun."""
    replacement, replace, count = staged_swap(tmp_path), os.replace, [0]

    def killed_after_some(src: Any, dst: Any) -> None:
        if count[0] == renames_done:
            raise OSError("killed")
        count[0] += 1
        replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_after_some)
    with pytest.raises(OSError, match="killed"):
        replacement.commit()
        raise OSError("killed")  # more renames than expected: the kill came after the swap
    replacement.abandon()
    monkeypatch.setattr(os, "replace", replace)
    message = recover_replacement(replacement.target)
    assert message is not None and "finished replacing" in message
    assert files(replacement.target.path) == SWAPPED


def test_a_staging_left_by_a_kill_before_the_swap_is_removed_at_the_next_start(
    tmp_path: Path,
) -> None:
    replacement = staged_swap(tmp_path)
    before = files(replacement.target.path / ".." / "run" / "tensorboard")
    message = recover_replacement(replacement.target)
    assert message is not None and "as it was before it" in message
    assert "old notes.txt" in files(replacement.target.path).values()
    assert files(replacement.target.path / "tensorboard") == before
    assert no_replacement_left(replacement.target.path)
    assert recover_replacement(replacement.target) is None


# Real processes: 2 trials by default, BARLOW_OVERWRITE_TRIALS=20 for the figures.


# Two epochs: the swap comes with the first epoch's checkpoint, halfway through.
TWO_EPOCHS = [*NEW, "train.epochs=2", "optim.warmup_epochs=1"]


def overwrite_process(run: Path) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "barlow", "pretrain", "--quiet", "--out", str(run)]
    return subprocess.Popen([*argv, "--overwrite", *sets(*TWO_EPOCHS)], stderr=subprocess.DEVNULL)


def test_sigkill_of_an_overwrite_at_random_moments_leaves_one_whole_run(
    run: Path, tmp_path: Path
) -> None:
    """Killed at a moment drawn uniformly over an uninterrupted overwrite's duration (timed
    first, so the draws cover the swap on a slow machine too), then the same command with
    --resume: either the kill came before the swap (the old run is byte-identical, and --resume
    of the new settings is refused as a different run) or after it (--resume finishes the new
    run, nothing of the old one is left)."""
    old, rng, outcomes = digest(run), random.Random(1), []
    timed = tmp_path / "timed"
    shutil.copytree(run, timed)
    start = time.monotonic()
    assert overwrite_process(timed).wait(timeout=600) == 0
    duration = time.monotonic() - start
    for trial in range(TRIALS):
        copy = tmp_path / f"trial{trial}"
        shutil.copytree(run, copy)
        proc = overwrite_process(copy)
        time.sleep(rng.uniform(0.0, duration))
        proc.kill()
        proc.wait()
        resume = ["pretrain", "--quiet", "--out", str(copy), "--resume", *sets(*TWO_EPOCHS)]
        code = main(resume)
        if code == 2:
            assert digest(copy) == old, trial
        else:
            assert code == 0, trial
            saved = checkpoint.load_checkpoint(copy / CHECKPOINT_NAME)
            assert saved["config"]["train"]["seed"] == 7 and saved["global_step"] == 22
            assert not (copy / "metrics.json").exists() and (copy / "notes.txt").exists()
        assert no_replacement_left(copy), trial
        outcomes.append(code)
    print(
        f"overwrite kill trials (uninterrupted: {duration:.1f} s): {outcomes.count(2)} before "
        f"the swap, {outcomes.count(0)} after"
    )
