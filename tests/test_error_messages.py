"""A sentence where a traceback was (issue 15, items 10 and 11): each bad input or failing
resource gets one line naming the problem and the fix, with exit 2 (bad input) or 1 (the run
failed, its checkpoints intact), and nothing already written is lost."""

from __future__ import annotations

import errno
import hashlib
import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from barlow import checkpoint, evaluate
from barlow.cli import main
from barlow.training import CHECKPOINT_NAME
from barlow.training import setup as training_setup
from barlow.training.loop import TrainingLoop
from runs import FAST, sets

ARGS = ["pretrain", "--quiet", *sets(*FAST, "train.max_steps=1")]


def pretrain(out: Path, *extra: str) -> int:
    return main([*ARGS, "--out", str(out), *sets(*extra)])


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("finished") / "run"
    assert pretrain(run) == 0
    return run


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_an_unknown_device_is_named_with_the_choices(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: RuntimeError traceback "Invalid device string: 'tpu9'", exit 1."""
    assert pretrain(tmp_path / "run", 'train.device="tpu9"') == 2
    assert "train.device='tpu9' is not a device barlow trains on; use auto, cpu, cuda" in (
        capsys.readouterr().err
    )


def edited_projector(finished: Path, tmp_path: Path) -> Path:
    """A copy of the finished run whose checkpoint's own config names another projector."""
    state = checkpoint.load_checkpoint(finished / CHECKPOINT_NAME)
    state["config"]["method"]["params"]["projector"] = "32-32"
    run = tmp_path / "edited"
    run.mkdir()
    checkpoint.save_checkpoint(state, run / CHECKPOINT_NAME)
    return run


@pytest.mark.parametrize("command", ["knn", "resume"])
def test_a_checkpoint_that_does_not_fit_its_own_config_is_named(
    finished: Path, tmp_path: Path, command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: a RuntimeError traceback from load_state_dict ("size mismatch for …")."""
    run = edited_projector(finished, tmp_path)
    before = digest(run / CHECKPOINT_NAME)
    if command == "knn":
        code = main(["knn", str(run / CHECKPOINT_NAME)])
    else:
        code = main([*ARGS, "--out", str(run), "--resume", *sets('method.projector="32-32"')])
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    assert "does not fit the model its own config describes" in err
    assert "shape mismatches" in err and "projector" in err
    assert digest(run / CHECKPOINT_NAME) == before


def never_load_data(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the data was loaded before --out was checked")

    monkeypatch.setattr(training_setup, "pretraining_data", refuse)


def test_out_that_is_a_file_or_below_one_is_refused_before_the_data_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: a NotADirectoryError traceback, and "[Errno 17] File exists"."""
    never_load_data(monkeypatch)
    (tmp_path / "afile").write_text("mine\n")
    assert pretrain(tmp_path / "afile") == 2
    assert pretrain(tmp_path / "afile" / "run") == 2
    err = capsys.readouterr().err
    assert f"--out {tmp_path / 'afile'} is a file, not a directory; choose another --out" in err
    assert f"{tmp_path / 'afile'} is a file, so no directory can be made below it" in err
    assert (tmp_path / "afile").read_text() == "mine\n"


@pytest.mark.parametrize(
    "error",
    [OSError(errno.EACCES, "Permission denied"), OSError(errno.EROFS, "Read-only file system")],
    ids=["no permission", "read-only file system"],
)
def test_out_that_cannot_be_created_is_refused_before_the_data_loads(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    error: OSError,
) -> None:
    """The mkdir fails as the kernel would fail it (root ignores permission bits, so the
    failure is made at the system call)."""
    never_load_data(monkeypatch)

    def refused(path: Any, mode: int = 0o777) -> None:
        raise OSError(error.errno, error.strerror, str(path))

    monkeypatch.setattr(os, "mkdir", refused)
    assert pretrain(tmp_path / "run") == 2
    assert f"--out {tmp_path / 'run'} cannot be created: {error.strerror}" in (
        capsys.readouterr().err
    )


def test_knn_on_a_read_only_run_prints_the_accuracy_and_says_it_could_not_save_it(
    finished: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: the accuracy, then a PermissionError traceback."""

    def read_only(path: Path, text: str) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(evaluate, "atomic_write_text", read_only)
    assert main(["knn", str(finished / CHECKPOINT_NAME)]) == 0
    out, err = capsys.readouterr()
    assert "kNN top-1" in out
    assert f"could not save the result in {finished / 'metrics.json'} (Permission denied)" in err


class FullDisk:
    """A file that takes ``room`` bytes, then fails as a full disk does."""

    def __init__(self, file: Any, room: int) -> None:
        self.file, self.room = file, room

    def write(self, data: Any) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return int(self.file.write(data))

    def flush(self) -> None:
        self.file.flush()


def test_a_full_disk_at_a_save_is_named_and_the_last_checkpoint_stays(
    finished: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Before: "[enforce fail at inline_container.cc:672] . unexpected pos …" (torch's zip
    writer hides the ENOSPC), exit 1 with a traceback."""
    run = tmp_path / "run"
    os.makedirs(run)
    for path in finished.iterdir():
        if path.is_file():
            (run / path.name).write_bytes(path.read_bytes())
    before = digest(run / CHECKPOINT_NAME)
    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, file: real_save(obj, FullDisk(file, 4096)))
    assert main([*ARGS, "--out", str(run), "--resume", *sets("train.max_steps=2")]) == 1
    err = capsys.readouterr().err
    assert f"no space left on the device to write {run / CHECKPOINT_NAME}" in err, err[-2000:]
    assert "from the previous save is intact" in err and "continue with --resume" in err
    assert digest(run / CHECKPOINT_NAME) == before
    assert "inline_container" not in err and "Traceback" not in err


def allocator_fails(*args: Any) -> bool:
    raise RuntimeError(
        "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
        "memory: you tried to allocate 40000000000 bytes. Error code 12 (Cannot allocate memory)"
    )


@pytest.mark.parametrize("batch_size", [128, 2])
def test_cpu_out_of_memory_in_a_step_names_what_to_shrink(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    batch_size: int,
) -> None:
    """The CPU allocator's own error (as ``ulimit -v`` makes it, text copied from torch 2.14);
    before, only ``torch.OutOfMemoryError`` (a GPU's) got the message. At batch 2 the message
    does not advise a smaller batch."""
    monkeypatch.setattr(TrainingLoop, "step", allocator_fails)
    assert pretrain(tmp_path / "run", f"train.batch_size={batch_size}") == 1
    err = capsys.readouterr().err
    assert f"out of memory at step 0 (epoch 1) with train.batch_size={batch_size}" in err
    assert "crop 16 px" in err and "method.projector='16-16'" in err, err[-1500:]
    assert "train.precision=" in err
    assert ("Lower train.batch_size" in err) == (batch_size > 2)
    assert ("train.batch_size is already the least" in err) == (batch_size == 2)


def test_cpu_out_of_memory_building_the_model_under_ulimit_names_what_to_shrink(
    tmp_path: Path,
) -> None:
    """A real process under a 6 GiB address-space limit (``ulimit -v``) asked for a
    100000-wide projector (a 40 GB matrix)."""
    limit = 6 * 2**30

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    argv = [sys.executable, "-m", "barlow", *ARGS, "--out", str(tmp_path / "run")]
    argv += sets('method.projector="100000-100000"')
    proc = subprocess.run(argv, capture_output=True, text=True, preexec_fn=limited, timeout=600)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "out of memory building the model and its data" in proc.stderr
    assert "method.projector='100000-100000'" in proc.stderr and "crop 16 px" in proc.stderr
    assert "Traceback" not in proc.stderr


# Item 11: messages that misled.


def test_a_directory_given_as_checkpoint_hints_at_checkpoint_pt(
    finished: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: "e.g. RUN/last.pt", a file barlow never writes."""
    assert main(["knn", str(finished)]) == 2
    assert f"e.g. {finished / CHECKPOINT_NAME}" in capsys.readouterr().err


def test_a_dataset_smaller_than_the_least_batch_does_not_advise_a_lower_batch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: "fewer than one batch of 2; lower train.batch_size" (2 is the least)."""
    folder = tmp_path / "one"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "only.png")
    dataset = f'data.dataset="{folder}"'
    assert (
        pretrain(tmp_path / "run", dataset, "train.batch_size=2", 'data.augment_on="workers"') == 2
    )
    err = capsys.readouterr().err
    assert "has 1 image(s), fewer than one batch of 2; it needs at least 2 images" in err
    assert "lower train.batch_size" not in err


def test_a_dataset_smaller_than_the_batch_says_how_low_to_go(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert pretrain(tmp_path / "run", "train.batch_size=4096") == 2
    assert "lower train.batch_size to at most 1437" in capsys.readouterr().err


def test_a_top_level_setting_in_a_recipe_names_its_section(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: "unknown config section [epochs]"."""
    recipe = tmp_path / "top.toml"
    recipe.write_text('epochs = 1\n[data]\ndataset = "digits"\n')
    assert main(["pretrain", str(recipe), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "recipe setting epochs = 1 stands outside any [section]; it belongs in [train]" in err
    assert "--set train.epochs=1" in err
