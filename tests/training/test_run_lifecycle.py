"""A run's life from start to finish: re-runs, preemption with requeue, NaN steps, collapse, small
data, process counts, hostile recipes (R11, R12, R15, R16, R18, R21, R30).

Runs are tiny: the embedded digits data with views drawn on the device, a 16-16 projector, a few
steps or epochs. Faults are injected by patching ``BarlowTwins`` in this process, or, for
signals, sent to a real ``python -m barlow pretrain`` subprocess.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from barlow import checkpoint, distributed
from barlow.cli import main
from barlow.config import load_config
from barlow.methods import BarlowTwins
from barlow.preemption import EXIT_CODE, requeue_slurm_job
from barlow.rundir import LOCK_NAME
from barlow.training import CHECKPOINT_NAME, NonFiniteLossError, pretrain
from barlow.training.state import validate_training_checkpoint
from comparisons import same
from processes import pretrain_on_two_processes
from runs import FAST, records, sets

STEPS_PER_EPOCH = 1437 // 128  # 11


def file_hashes(run: Path) -> dict[str, str]:
    """SHA-256 of every file under ``run`` (TensorBoard's included), by relative path; not the
    lock file, which names whichever process last held the directory."""
    return {
        str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run.rglob("*"))
        if p.is_file() and p.name != LOCK_NAME
    }


def hash_differences(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """What a re-run added, removed or rewrote (config.json included: a no-op re-run must not
    rewrite it, though the command it would record gained ``--resume``)."""
    return (
        [f"added {k}" for k in sorted(after.keys() - before.keys())]
        + [f"removed {k}" for k in sorted(before.keys() - after.keys())]
        + [f"rewrote {k}" for k in sorted(before.keys() & after.keys()) if before[k] != after[k]]
    )


# R12: the same command on a finished run resumes, does nothing and exits 0.


def test_rerun_of_a_finished_run_does_no_step_and_rewrites_nothing(tmp_path: Path) -> None:
    run = tmp_path / "run"
    final_eval = ("eval.final=true", "eval.probe_epochs=2", "eval.knn_k=5")
    command = ["pretrain", "--quiet", "--out", str(run), *sets(*FAST, *final_eval)]
    assert main(command) == 0
    assert checkpoint.load_checkpoint(run / CHECKPOINT_NAME)["global_step"] == STEPS_PER_EPOCH
    before = file_hashes(run)
    steps_logged = len(records(run, "train"))

    assert main([*command, "--resume"]) == 0
    after = file_hashes(run)
    assert len(records(run, "train")) == steps_logged  # no step
    assert checkpoint.load_checkpoint(run / CHECKPOINT_NAME)["global_step"] == STEPS_PER_EPOCH
    problems = hash_differences(before, after)
    assert not problems, "the re-run of a finished run changed its files: " + "; ".join(problems)


def test_a_rewritten_config_json_counts_as_a_change(tmp_path: Path) -> None:
    """Negative case for the two re-run tests: config.json rewritten with the same config but
    the new command (``--resume``), which the comparison used to leave out, is reported."""
    run = tmp_path / "run"
    run.mkdir()
    record = {"config": {"train": {"epochs": 1}}, "argv": ["pretrain"]}
    (run / "config.json").write_text(json.dumps(record))
    before = file_hashes(run)
    (run / "config.json").write_text(json.dumps({**record, "argv": ["pretrain", "--resume"]}))
    assert hash_differences(before, file_hashes(run)) == ["rewrote config.json"]


def test_rerun_of_a_run_finished_by_max_steps_does_no_step(tmp_path: Path) -> None:
    run = tmp_path / "run"
    command = ["pretrain", "--quiet", "--out", str(run), *sets(*FAST, "train.max_steps=3")]
    assert main(command) == 0
    before = file_hashes(run)
    assert main([*command, "--resume"]) == 0
    steps = checkpoint.load_checkpoint(run / CHECKPOINT_NAME)["global_step"]
    assert steps == 3, f"the re-run of a run that reached train.max_steps=3 trained to step {steps}"
    problems = hash_differences(before, file_hashes(run))
    assert not problems, "; ".join(problems)


# R11: SIGUSR1 to a real `barlow pretrain` with train.requeue=true under SLURM.


def stub_scontrol(folder: Path) -> Path:
    """An executable ``scontrol`` that appends its arguments to ``$SCONTROL_LOG``."""
    folder.mkdir()
    stub = folder / "scontrol"
    stub.write_text('#!/bin/sh\nprintf \'%s\\n\' "$*" >> "$SCONTROL_LOG"\n')
    stub.chmod(0o755)
    return stub


def test_sigusr1_saves_requeues_and_exits_143(tmp_path: Path) -> None:
    run, log = tmp_path / "run", tmp_path / "scontrol.log"
    stub = stub_scontrol(tmp_path / "bin")
    env = {
        **os.environ,
        "PATH": f"{stub.parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "SLURM_JOB_ID": "4242",
        "SCONTROL_LOG": str(log),
        "OMP_NUM_THREADS": "1",
    }
    for name in ("SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        env.pop(name, None)
    long_run = ("train.epochs=20", "train.log_every=1", "train.requeue=true")
    args = [sys.executable, "-m", "barlow", "pretrain", "--quiet", "--out", str(run)]
    proc = subprocess.Popen(
        [*args, *sets(*FAST, *long_run)], env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 600  # generous: a loaded CI machine
        metrics = run / "metrics.jsonl"
        while not (metrics.exists() and '"kind": "train"' in metrics.read_text()):
            assert proc.poll() is None, "the run ended before its first logged step"
            assert time.monotonic() < deadline, "no step logged in 600 s"
            time.sleep(0.05)
        sent = time.monotonic()
        proc.send_signal(signal.SIGUSR1)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    stop_s = time.monotonic() - sent
    assert proc.returncode == EXIT_CODE == 143, err[-2000:]
    assert "SIGUSR1: saved" in err and "continue with --resume" in err
    assert "requeued SLURM job 4242" in err
    assert log.read_text().splitlines() == ["requeue 4242"]  # once, by rank 0, after the save
    state = validate_training_checkpoint(run / CHECKPOINT_NAME)
    first_logged = records(run, "train")[0]["step"]
    assert first_logged <= state["global_step"] < 20 * STEPS_PER_EPOCH
    print(f"SIGUSR1 → exit {proc.returncode} in {stop_s:.2f} s, saved step {state['global_step']}")


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"SLURM_JOB_ID": "77"}, [["requeue", "77"]]),
        # An array task's own job id and ARRAYJOB_TASK name the same task; the array's id alone
        # (4200) would requeue every task of the array.
        (
            {"SLURM_JOB_ID": "4203", "SLURM_ARRAY_JOB_ID": "4200", "SLURM_ARRAY_TASK_ID": "3"},
            [["requeue", "4203"], ["requeue", "4200_3"]],
        ),
    ],
)
def test_requeue_names_this_job_or_array_task(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, env: dict[str, str], expected: list[list[str]]
) -> None:
    log = tmp_path / "scontrol.log"
    stub = stub_scontrol(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{stub.parent}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setenv("SCONTROL_LOG", str(log))
    for name in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert requeue_slurm_job() is True
    assert log.read_text().split() in expected


def test_requeue_outside_slurm_or_failing_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert requeue_slurm_job() is False
    assert "not a SLURM job" in capsys.readouterr().err
    failing = tmp_path / "bin" / "scontrol"
    failing.parent.mkdir()
    failing.write_text("#!/bin/sh\necho 'Invalid job id specified' >&2\nexit 1\n")
    failing.chmod(0o755)
    monkeypatch.setenv("PATH", f"{failing.parent}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setenv("SLURM_JOB_ID", "5")
    assert requeue_slurm_job() is False
    assert "scontrol requeue 5 failed: Invalid job id specified" in capsys.readouterr().err


# R16: train.skip_nonfinite=N skips up to N non-finite steps; one more stops the run.


def inject(monkeypatch: pytest.MonkeyPatch, calls_to_poison: set[int], *, into: str) -> list[Any]:
    """Patch ``BarlowTwins.forward``: at the given calls (counted from 1, per patch) the loss
    becomes NaN (``into="loss"``) or one pixel of the first view does (``into="data"``). Returns
    a list receiving, at every call, a copy of the parameters as they were before it."""
    seen: list[Any] = []
    original = BarlowTwins.forward

    def poisoned(self: BarlowTwins, views: list[torch.Tensor]) -> Any:
        seen.append({k: p.detach().clone() for k, p in self.named_parameters()})
        poison = len(seen) in calls_to_poison
        if poison and into == "data":
            views = [v.clone() for v in views]
            views[0][0, 0, 0, 0] = float("nan")
        out = original(self, views)
        if poison and into == "loss":
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(BarlowTwins, "forward", poisoned)
    return seen


def test_skip_nonfinite_skips_a_nan_step_and_continues(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    seen = inject(monkeypatch, {3}, into="loss")
    cfg = load_config("digits", [*FAST, "train.skip_nonfinite=1", "train.max_steps=6"])
    pretrain(cfg, tmp_path, progress=False)
    assert len(seen) == 6
    assert not same(seen[1], seen[2])  # a normal step moves the weights ...
    assert same(seen[2], seen[3])  # ... the NaN step (call 3) does not
    assert not same(seen[3], seen[4])  # and training goes on
    state = validate_training_checkpoint(tmp_path / CHECKPOINT_NAME)  # all tensors finite
    assert state["global_step"] == 6
    skips = [r for r in records(tmp_path, "train") if "skipped_nonfinite" in r]
    assert [(r["step"], r["skipped_nonfinite"]) for r in skips] == [(2, 1)]
    assert "skipped a step (1/1 allowed)" in capsys.readouterr().err


def test_skip_nonfinite_survives_a_nan_image(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A NaN that comes from the data passes through BatchNorm, whose running statistics the
    forward pass updates before the loss is seen: a skipped step must not leave them NaN. (The
    loss's own input check would raise first; inside the loop the guard owns the decision.)"""
    seen_buffers: list[dict[str, torch.Tensor]] = []
    forward = BarlowTwins.forward

    def recording(self: BarlowTwins, views: list[torch.Tensor]) -> Any:
        seen_buffers.append({k: b.detach().clone() for k, b in self.named_buffers()})
        return forward(self, views)

    monkeypatch.setattr(BarlowTwins, "forward", recording)
    inject(monkeypatch, {3}, into="data")
    cfg = load_config("digits", [*FAST, "train.skip_nonfinite=1", "train.max_steps=6"])
    pretrain(cfg, tmp_path, progress=False)
    state = validate_training_checkpoint(tmp_path / CHECKPOINT_NAME)  # all tensors finite
    assert state["global_step"] == 6
    # the buffers the 4th forward saw are those the 3rd (skipped) one started from
    assert same(seen_buffers[2], seen_buffers[3]) and not same(seen_buffers[1], seen_buffers[2])


def test_more_nonfinite_steps_than_allowed_stop_and_the_resume_is_finite(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pretrain(load_config("digits", [*FAST, "train.max_steps=2"]), tmp_path, progress=False)
    good = validate_training_checkpoint(tmp_path / CHECKPOINT_NAME)
    allow_one = load_config("digits", [*FAST, "train.skip_nonfinite=1", "train.max_steps=8"])
    # resumed at step 2: calls 2 and 4 are steps 3 and 5; the second is one too many
    inject(monkeypatch, {2, 4}, into="loss")
    with pytest.raises(NonFiniteLossError, match=r"at step 5 .*last good checkpoint: .*checkpoint"):
        pretrain(allow_one, tmp_path, resume=True, progress=False)
    kept = validate_training_checkpoint(tmp_path / CHECKPOINT_NAME)
    assert kept["global_step"] == 2 and same(kept["method"], good["method"])
    monkeypatch.undo()  # the cause is gone: resume from the last good checkpoint
    pretrain(allow_one, tmp_path, resume=True, progress=False)
    assert validate_training_checkpoint(tmp_path / CHECKPOINT_NAME)["global_step"] == 8


# R18: train.abort_on_collapse=true stops a collapsed run; the checkpoint before it stays.


def test_abort_on_collapse_stops_the_run_and_keeps_the_last_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def constant(self: BarlowTwins, images: torch.Tensor) -> torch.Tensor:
        return torch.ones(len(images), self.backbone.num_features)  # every image → one vector

    monkeypatch.setattr(BarlowTwins, "embed", constant)
    run = tmp_path / "run"
    command = ["pretrain", "--quiet", "--out", str(run)]
    command += sets(*FAST, "train.epochs=5", "train.abort_on_collapse=true")
    assert main(command) == 1
    err = capsys.readouterr().err
    assert "epoch 3:" in err and "collapsed for 3 consecutive checks" in err  # patience 3
    state = validate_training_checkpoint(run / CHECKPOINT_NAME)
    assert (state["epoch"], state["global_step"]) == (2, 2 * STEPS_PER_EPOCH)
    assert [r["epoch"] for r in records(run, "epoch")] == [1, 2]


# R15: drop_last — a ragged tail is dropped, not an error.


def test_nine_images_in_batches_of_four_give_two_steps_per_epoch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(9):
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(images / f"{i}.png")
    cfg = load_config(
        "digits",
        [
            f'data.dataset="{images}"',
            'method.projector="16-16"',
            "train.batch_size=4",
            "train.epochs=2",
            "train.log_every=1",
            "data.crop_size=16",
            "optim.warmup_epochs=1",
            "eval.online_knn_every=0",
            "eval.final=false",
        ],
    )
    pretrain(cfg, tmp_path / "run", progress=False)
    assert "9 images" in capsys.readouterr().err
    assert [r["step"] for r in records(tmp_path / "run", "train")] == [1, 2, 3, 4]
    assert [r["epoch"] for r in records(tmp_path / "run", "epoch")] == [1, 2]
    state = validate_training_checkpoint(tmp_path / "run" / CHECKPOINT_NAME)
    assert (state["epoch"], state["global_step"]) == (2, 4)


# R21: a process count that does not fit the global batch is refused before any data is read.


@pytest.mark.parametrize(
    ("world", "batch", "problem"),
    [(3, 64, "not divisible by the 3 processes"), (4, 4, "per process"), (2, 2, "per process")],
)
def test_process_count_that_does_not_fit_the_batch_is_refused_before_reading_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, world: int, batch: int, problem: str
) -> None:
    from barlow import data

    monkeypatch.setattr(distributed, "init_from_env", lambda **_: torch.device("cpu"))
    monkeypatch.setattr(distributed, "world_size", lambda: world)
    monkeypatch.setattr(distributed, "rank", lambda: 0)
    monkeypatch.setattr(distributed, "is_main_process", lambda: True)

    def no_reading(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("data was read before the batch was checked")

    monkeypatch.setattr(data, "build_dataset", no_reading)
    cfg = load_config("digits", [*FAST, f"train.batch_size={batch}"])
    with pytest.raises(ValueError, match=problem) as caught:
        pretrain(cfg, tmp_path / "run", progress=False)
    message = str(caught.value)
    assert "train.batch_size" in message
    # and it says what to do
    assert re.search(r"choose|raise|increase|at least|fewer", message), message
    assert not (tmp_path / "run").exists()


def test_two_processes_refuse_an_odd_global_batch(tmp_path: Path) -> None:
    """The real thing: 2 gloo processes, global batch 3; both exit 2 naming the batch."""
    done = pretrain_on_two_processes(tmp_path / "run", sets(*FAST, "train.batch_size=3"))
    assert done.returncode != 0
    assert done.stderr.count("train.batch_size=3 is not divisible by the 2 processes") == 2
    assert not (tmp_path / "run").exists()


# R30: a recipe is data: a hostile one is refused and runs nothing.

PAYLOADS = {  # file name: (content, what the error says)
    "yaml-object.yaml": (
        '!!python/object/apply:os.system ["touch {marker}"]\n',
        "is not valid TOML",
    ),
    "yaml-in-a-value.toml": (
        '[method]\nname = "!!python/object/apply:os.system [\\"touch {marker}\\"]"\n',
        "unknown method '!!python/object/apply:os.system",
    ),
    "python-in-a-value.toml": (
        "[data]\ndataset = \"__import__('os').system('touch {marker}')\"\n",
        "does not exist; give a directory of images",
    ),
    "pickle-looking.toml": (
        "[train]\nseed = \"cos\\nsystem\\n(S'touch {marker}'\\ntR.\"\n",
        "train.seed must be an integer",
    ),
}


@pytest.mark.parametrize("name", sorted(PAYLOADS))
def test_a_hostile_recipe_is_refused_and_runs_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    marker = tmp_path / "marker"
    recipe = tmp_path / name
    content, message = PAYLOADS[name]
    recipe.write_text(content.format(marker=marker))
    assert main(["pretrain", str(recipe), "--quiet", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and message in err, err
    assert not marker.exists()
    assert not (tmp_path / "run").exists()


def test_a_hostile_override_is_refused_and_runs_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "marker"
    payload = f'method.name=!!python/object/apply:os.system ["touch {marker}"]'
    assert main(["pretrain", "--quiet", "--out", str(tmp_path / "run"), "--set", payload]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "unknown method '!!python/object/apply:os.system" in err, err
    assert not marker.exists()
    assert not (tmp_path / "run").exists()


def test_the_library_has_no_unsafe_deserialiser() -> None:
    """An AST scan of src/barlow: no yaml.load / full_load / unsafe_load, no pickle or marshal
    loads, no eval / exec: config and recipe files are read by tomllib and json only."""
    src = Path(__file__).resolve().parents[2] / "src" / "barlow"
    unsafe = {
        ("yaml", "load"),
        ("yaml", "load_all"),
        ("yaml", "full_load"),
        ("yaml", "unsafe_load"),
        ("pickle", "load"),
        ("pickle", "loads"),
        ("marshal", "loads"),
    }
    found = []
    for path in sorted(src.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if not isinstance(node, ast.Call):
                continue
            f = node.func
            if isinstance(f, ast.Name) and f.id in ("eval", "exec"):
                found.append(f"{path.name}:{node.lineno} {f.id}()")
            if (
                isinstance(f, ast.Attribute)
                and isinstance(f.value, ast.Name)
                and (f.value.id, f.attr) in unsafe
            ):
                found.append(f"{path.name}:{node.lineno} {f.value.id}.{f.attr}()")
    assert not found, found
