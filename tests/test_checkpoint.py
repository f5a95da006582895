import ast
import errno
import hashlib
import importlib.util
import os
import random
import re
import shutil
import stat
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from barlow.checkpoint import (
    FORMAT_VERSION,
    export_backbone,
    latest_valid_checkpoint,
    load_backbone_weights,
    load_checkpoint,
    load_exported_backbone,
    retain,
    rng_state,
    save_checkpoint,
    set_rng_state,
    snapshot_name,
    validate_checkpoint,
)
from barlow.config import apply_overrides
from barlow.training.state import CHECKPOINT_KEYS, validate_training_checkpoint

SRC = Path(__file__).resolve().parents[1] / "src" / "barlow"


def example_state() -> dict:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(5, 3)).sum().backward()
    optimizer.step()
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": 7,
        "loss": 0.25,
        "config": {"name": "barlow", "sizes": [8192, 8192], "eps": None, "flag": True},
        "pair": (1, "two"),
        "rng": rng_state(),
    }


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, list | tuple):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    else:
        assert a == b


def test_round_trip_loads_with_weights_only(tmp_path):
    state = example_state()
    path = tmp_path / "run" / "last.pt"  # parent directory is created
    save_checkpoint(state, path)
    loaded = load_checkpoint(path)
    assert loaded["format_version"] == FORMAT_VERSION
    assert_same({**state, "format_version": FORMAT_VERSION}, loaded)
    torch.load(path, weights_only=True)  # readable by plain torch too
    assert os.listdir(path.parent) == ["last.pt"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


def test_save_overwrites_previous_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint({"step": 1}, path)
    save_checkpoint({"step": 2}, path)
    assert load_checkpoint(path)["step"] == 2


class Unpicklable:
    def __reduce__(self):
        raise RuntimeError("cannot pickle")


@pytest.mark.parametrize(
    ("value", "error", "where"),
    [
        ({"extra": {"thing": Unpicklable()}}, TypeError, "['extra']['thing']"),
        ({"extra": [1, np.zeros(2)]}, TypeError, "['extra'][1]"),
        ({"extra": {("a", "b"): 1}}, TypeError, "['extra']"),
        ({"model": {"w": torch.tensor([1.0, float("nan")])}}, ValueError, "['model']['w']"),
        ({"model": {"w": torch.tensor([float("inf")])}}, ValueError, "['model']['w']"),
    ],
)
def test_invalid_state_is_refused_before_writing(tmp_path, value, error, where):
    path = tmp_path / "last.pt"
    save_checkpoint({"step": 1}, path)
    before, listing = digest(path), sorted(os.listdir(tmp_path))
    with pytest.raises(error) as info:
        save_checkpoint({"step": 2, **value}, path)
    assert where in str(info.value)
    assert digest(path) == before
    assert sorted(os.listdir(tmp_path)) == listing


def test_failed_write_keeps_previous_file_and_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"step": 1, "w": torch.ones(3)}, path)
    before, listing = digest(path), sorted(os.listdir(tmp_path))

    def disk_full(obj, file):
        file.write(b"partial checkpoint bytes")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError) as info:
        save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    assert info.value.errno == errno.ENOSPC
    assert digest(path) == before
    assert sorted(os.listdir(tmp_path)) == listing


def test_mismatched_format_version_is_refused(tmp_path):
    with pytest.raises(ValueError, match="format_version"):
        save_checkpoint({"format_version": 99}, tmp_path / "x.pt")


class Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_not_executed(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"format_version": 1, "payload": Exploit(marker)}, path)
    # even the environment override must not turn weights_only off
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(ValueError, match=r"evil\.pt"):
        load_checkpoint(path)
    assert not marker.exists()


def test_truncated_file_names_the_path(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint({"w": torch.randn(1000)}, path)
    data = path.read_bytes()
    for size in (0, 10, len(data) // 2, len(data) - 10):
        path.write_bytes(data[:size])
        with pytest.raises(ValueError, match="interrupted write") as info:
            load_checkpoint(path)
        assert str(path) in str(info.value)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.pt"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(ValueError, match="not a file"):
        load_checkpoint(tmp_path)


def test_file_without_format_version_is_refused(tmp_path):
    path = tmp_path / "plain.pt"
    torch.save({"model": {"w": torch.ones(1)}}, path)
    with pytest.raises(ValueError, match="format_version"):
        load_checkpoint(path)
    torch.save({"format_version": FORMAT_VERSION + 1}, path)
    with pytest.raises(ValueError, match="upgrade"):
        load_checkpoint(path)


def draw() -> tuple:
    return (
        torch.rand(4),
        np.random.rand(4),
        np.random.randn(3),
        [random.random() for _ in range(4)],
    )


def test_rng_state_round_trip_through_a_checkpoint(tmp_path):
    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    np.random.randn(1)  # leaves a cached Gaussian in numpy's state
    save_checkpoint({"rng": rng_state()}, tmp_path / "rng.pt")
    first = draw()
    set_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    second = draw()
    assert torch.equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])
    np.testing.assert_array_equal(first[2], second[2])
    assert first[3] == second[3]
    assert not torch.equal(draw()[0], first[0])  # the streams really advance


def test_set_rng_state_rejects_incomplete_state():
    with pytest.raises(ValueError, match="numpy"):
        set_rng_state({"torch": torch.get_rng_state(), "python": {}})


def test_load_backbone_weights_strict_messages():
    source = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    target = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    load_backbone_weights(target, source.state_dict())
    assert torch.equal(target[0].weight, source[0].weight)

    weights = dict(source.state_dict())
    del weights["0.bias"]
    weights["head.weight"] = torch.ones(2)
    with pytest.raises(ValueError) as info:
        load_backbone_weights(target, weights)
    message = str(info.value)
    assert "1 missing keys (0.bias)" in message
    assert "1 unexpected keys (head.weight)" in message

    wrong_shape = dict(source.state_dict(), **{"0.weight": torch.ones(5, 3)})
    with pytest.raises(ValueError, match=r"0.weight: file \(5, 3\) vs model \(4, 3\)"):
        load_backbone_weights(target, wrong_shape)


def test_load_backbone_weights_counts_and_prefix_hint():
    target = nn.Sequential(*[nn.Linear(2, 2) for _ in range(4)])
    prefixed = {f"module.{key}": value for key, value in target.state_dict().items()}
    with pytest.raises(ValueError) as info:
        load_backbone_weights(target, prefixed)
    message = str(info.value)
    assert "8 missing keys" in message and "3 more" in message
    assert "strip the prefix 'module.'" in message


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_export_backbone_round_trip(tmp_path, suffix):
    # safetensors is a required dependency: a broken install fails here, it is not skipped
    backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    path = tmp_path / f"backbone{suffix}"
    export_backbone(backbone.state_dict(), path)
    assert os.listdir(tmp_path) == [path.name]
    weights = load_exported_backbone(path)
    fresh = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    load_backbone_weights(fresh, weights)
    for a, b in zip(backbone.state_dict().values(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_a_missing_safetensors_fails_the_export_instead_of_skipping(tmp_path, monkeypatch):
    """The broken install the round trip above used to skip (importorskip): now an error that
    names the package."""
    for name in ("safetensors", "safetensors.torch"):
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
    with pytest.raises(ImportError, match="needs the safetensors package"):
        export_backbone({"w": torch.ones(2)}, tmp_path / "backbone.safetensors")
    with pytest.raises(pytest.skip.Exception):
        pytest.importorskip("safetensors")  # what the old check did with it: a skip


def test_export_backbone_refuses_non_finite(tmp_path):
    with pytest.raises(ValueError, match="'w'"):
        export_backbone({"w": torch.tensor([float("nan")])}, tmp_path / "b.pt")
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# R1: a save that fails at any point leaves the previous checkpoint and the directory as they were


class _DiskFills:
    """A file object that accepts ``room`` bytes, then fails like a full disk."""

    def __init__(self, file, room: int) -> None:
        self.file, self.room = file, room

    def write(self, data) -> int:
        if len(data) > self.room:
            self.file.write(bytes(data[: self.room]))
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()


def _fail_in_torch_save(monkeypatch, error):
    real_save = torch.save

    def save_then_fail(obj, file):
        real_save(obj, file)  # a whole checkpoint's bytes reach the temp file first
        raise error

    monkeypatch.setattr(torch, "save", save_then_fail)


def _disk_fills_after(monkeypatch, room):
    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, file: real_save(obj, _DiskFills(file, room)))


def _fail_at(monkeypatch, name, error):
    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(os, name, fail)


FAILURES = {
    "exception after writing": lambda mp: _fail_in_torch_save(mp, RuntimeError("boom")),
    "disk full mid-write": lambda mp: _disk_fills_after(mp, 5000),
    "interrupt mid-write": lambda mp: _fail_in_torch_save(mp, KeyboardInterrupt()),
    "fsync fails": lambda mp: _fail_at(mp, "fsync", OSError(errno.EIO, "I/O error")),
    "rename fails": lambda mp: _fail_at(mp, "replace", OSError(errno.EACCES, "denied")),
}


@pytest.mark.parametrize("failure", list(FAILURES))
def test_failed_save_at_any_point_keeps_previous_checkpoint(tmp_path, monkeypatch, failure):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(train_state(1), path)
    before, listing = digest(path), sorted(os.listdir(tmp_path))
    FAILURES[failure](monkeypatch)
    with pytest.raises((OSError, RuntimeError, KeyboardInterrupt)):
        save_checkpoint(train_state(2, size=10_000), path)
    monkeypatch.undo()
    assert digest(path) == before
    assert sorted(os.listdir(tmp_path)) == listing
    assert load_checkpoint(path)["global_step"] == 1


# ---------------------------------------------------------------------------------------------
# R2: resume from the newest checkpoint that validates; R3: retention


def train_state(step: int, size: int = 16) -> dict:
    """A state with every key a training checkpoint holds, its tensors tagged with ``step``."""
    return {
        "barlow_version": "test",
        "config": {"method": {"name": "barlow_twins"}},
        "epoch": step // 4,
        "global_step": step,
        "method": {"w": torch.full((size,), float(step))},
        "optimizer": {"state": {}, "param_groups": []},
        "scaler": {},
        "rng": [rng_state()],
    }


def snapshots(run_dir) -> list[str]:
    return sorted(name for name in os.listdir(run_dir) if name.startswith("checkpoint-step"))


def test_validate_checkpoint_names_what_is_wrong(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(train_state(3), path)
    assert validate_checkpoint(path, required_keys=CHECKPOINT_KEYS)["global_step"] == 3
    save_checkpoint({"global_step": 3}, path)
    with pytest.raises(ValueError, match=r"c\.pt is incomplete: it lacks \['barlow_version'"):
        validate_checkpoint(path, required_keys=CHECKPOINT_KEYS)
    assert validate_checkpoint(path, required_keys=("global_step",))["global_step"] == 3
    state = train_state(3)
    state["method"]["w"][0] = float("nan")
    torch.save({**state, "format_version": FORMAT_VERSION}, path)  # save_checkpoint refuses NaN
    with pytest.raises(ValueError, match=r"c\.pt is corrupt: state\['method'\]\['w'\]"):
        validate_checkpoint(path, required_keys=CHECKPOINT_KEYS)


def test_latest_valid_skips_a_truncated_newer_snapshot(tmp_path):
    save_checkpoint(train_state(10), tmp_path / snapshot_name(10))
    save_checkpoint(train_state(20), tmp_path / snapshot_name(20))
    truncated = tmp_path / snapshot_name(20)
    truncated.write_bytes(truncated.read_bytes()[:1000])
    with pytest.warns(RuntimeWarning, match=re.escape(str(truncated))) as caught:
        found = latest_valid_checkpoint(tmp_path, required_keys=CHECKPOINT_KEYS)
    assert found == tmp_path / snapshot_name(10) and len(caught) == 1
    assert f"using {found}" in str(caught[0].message)
    assert load_checkpoint(found)["global_step"] == 10


def test_latest_valid_prefers_checkpoint_pt_and_opens_nothing_older(tmp_path, recwarn):
    save_checkpoint(train_state(30), tmp_path / "checkpoint.pt")
    (tmp_path / snapshot_name(20)).write_bytes(b"garbage")  # older: never opened, no warning
    assert (
        latest_valid_checkpoint(tmp_path, required_keys=CHECKPOINT_KEYS)
        == tmp_path / "checkpoint.pt"
    )
    assert not recwarn.list
    save_checkpoint(train_state(40), tmp_path / snapshot_name(40))  # newer snapshot wins
    assert latest_valid_checkpoint(
        tmp_path, required_keys=CHECKPOINT_KEYS
    ) == tmp_path / snapshot_name(40)


@pytest.mark.parametrize("damage", ["truncated", "empty", "incomplete", "not a checkpoint"])
def test_latest_valid_falls_back_from_a_damaged_checkpoint_pt(tmp_path, damage):
    save_checkpoint(train_state(10), tmp_path / snapshot_name(10))
    latest = tmp_path / "checkpoint.pt"
    save_checkpoint(train_state(12), latest)
    if damage == "truncated":
        latest.write_bytes(latest.read_bytes()[:-100])
    elif damage == "empty":
        latest.write_bytes(b"")
    elif damage == "incomplete":
        save_checkpoint({"global_step": 12}, latest)
    else:
        latest.write_text("hello")
    with pytest.warns(RuntimeWarning, match=re.escape(str(latest))):
        assert latest_valid_checkpoint(
            tmp_path, required_keys=CHECKPOINT_KEYS
        ) == tmp_path / snapshot_name(10)


def test_latest_valid_with_nothing_valid(tmp_path):
    assert latest_valid_checkpoint(tmp_path / "missing", required_keys=CHECKPOINT_KEYS) is None
    assert latest_valid_checkpoint(tmp_path, required_keys=CHECKPOINT_KEYS) is None
    (tmp_path / "checkpoint.pt").write_bytes(b"\x00" * 10)
    with pytest.warns(RuntimeWarning, match="no valid checkpoint is left"):
        assert latest_valid_checkpoint(tmp_path, required_keys=CHECKPOINT_KEYS) is None


def test_retain_keeps_the_last_k_and_a_failed_save_deletes_nothing(tmp_path, monkeypatch):
    latest = tmp_path / "checkpoint.pt"
    (tmp_path / "best.pt").write_bytes(b"not ours")
    for step in range(1, 6):
        save_checkpoint(train_state(step), latest)
        retain(tmp_path, keep_last=2, required_keys=CHECKPOINT_KEYS)
    assert snapshots(tmp_path) == [snapshot_name(4), snapshot_name(5)]
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["best.pt", "checkpoint.pt", *snapshots(tmp_path)]
    )
    for step in (4, 5):
        assert load_checkpoint(tmp_path / snapshot_name(step))["global_step"] == step
    assert not os.path.samefile(latest, tmp_path / snapshot_name(5))  # a copy, not a hard link
    before = {name: digest(tmp_path / name) for name in os.listdir(tmp_path)}
    _disk_fills_after(monkeypatch, 100)
    with pytest.raises((OSError, RuntimeError)):  # torch's zip writer may rewrap the OSError
        save_checkpoint(train_state(6), latest)
    monkeypatch.undo()
    assert {name: digest(tmp_path / name) for name in os.listdir(tmp_path)} == before


def test_retain_refuses_an_invalid_latest_and_deletes_nothing(tmp_path):
    for step in (1, 2):
        save_checkpoint(train_state(step), tmp_path / "checkpoint.pt")
        retain(tmp_path, keep_last=1, required_keys=CHECKPOINT_KEYS)
    listing = sorted(os.listdir(tmp_path))
    (tmp_path / "checkpoint.pt").unlink()
    save_checkpoint({"global_step": 3}, tmp_path / "checkpoint.pt")  # lacks the training keys
    with pytest.raises(ValueError, match="incomplete"):
        retain(tmp_path, keep_last=1, required_keys=CHECKPOINT_KEYS)
    assert sorted(os.listdir(tmp_path)) == listing


def test_retain_cleans_stale_temps_and_abandoned_snapshots(tmp_path):
    save_checkpoint(train_state(9), tmp_path / snapshot_name(9))  # from a timeline resumed at 5
    stale = [".checkpoint.pt.abc123.tmp", f".{snapshot_name(3)}.def.tmp"]
    kept = [".other.tmp", "backbone.safetensors", "checkpoint-step12.txt"]
    for name in stale + kept:
        (tmp_path / name).write_bytes(b"x")
    save_checkpoint(train_state(6), tmp_path / "checkpoint.pt")
    removed = retain(tmp_path, keep_last=3, required_keys=CHECKPOINT_KEYS)
    assert sorted(p.name for p in removed) == sorted([snapshot_name(9), *stale])
    assert sorted(os.listdir(tmp_path)) == sorted(["checkpoint.pt", snapshot_name(6), *kept])


def test_retain_zero_keeps_only_the_latest(tmp_path):
    for step in (1, 2):
        save_checkpoint(train_state(step), tmp_path / "checkpoint.pt")
        retain(tmp_path, keep_last=2, required_keys=CHECKPOINT_KEYS)
    retain(tmp_path, keep_last=0, required_keys=CHECKPOINT_KEYS)
    assert os.listdir(tmp_path) == ["checkpoint.pt"]
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="keep_last"):
            retain(tmp_path, keep_last=bad, required_keys=CHECKPOINT_KEYS)


def test_damage_written_into_checkpoint_pt_in_place_leaves_its_snapshot_whole(tmp_path):
    """Item 13 of the run-directory issue: the newest snapshot was a hard link of checkpoint.pt,
    so bytes written into one in place (a ``cp other.pt checkpoint.pt``, a tool that edits
    files) changed both."""
    latest = tmp_path / "checkpoint.pt"
    save_checkpoint(train_state(7), latest)
    retain(tmp_path, keep_last=1, required_keys=CHECKPOINT_KEYS)
    snapshot = tmp_path / snapshot_name(7)
    before = digest(snapshot)
    with open(latest, "r+b") as file:  # in place: same inode
        file.seek(100)
        file.write(b"\0" * 64)
    assert digest(snapshot) == before
    assert load_checkpoint(snapshot)["global_step"] == 7
    with pytest.warns(RuntimeWarning, match="skipping checkpoint: cannot read checkpoint"):
        assert latest_valid_checkpoint(tmp_path, required_keys=CHECKPOINT_KEYS) == snapshot


# ---------------------------------------------------------------------------------------------
# R7 / R29: safe loading


def test_every_torch_load_in_the_library_sets_weights_only_true():
    """AST scan of src/barlow: each ``*.load(...)`` on torch passes ``weights_only=True``."""
    calls = []
    for source in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(source.read_text(), filename=str(source))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "load"
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "torch"
            ):
                flags = [k for k in node.keywords if k.arg == "weights_only"]
                safe = len(flags) == 1 and isinstance(flags[0].value, ast.Constant)
                calls.append((f"{source.name}:{node.lineno}", safe and flags[0].value.value))
    assert calls, "the scan found no torch.load call at all"
    assert [where for where, safe in calls if safe is not True] == []


def test_old_torch_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    save_checkpoint({"step": 1}, path)
    monkeypatch.setattr(torch, "__version__", "2.5.1")
    with pytest.raises(RuntimeError, match="CVE-2025-32434"):
        load_checkpoint(path)


def test_malicious_checkpoint_is_refused_by_every_loader(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "checkpoint.pt"
    torch.save({**train_state(1), "format_version": 1, "x": Exploit(marker)}, path)
    for load in (load_checkpoint, validate_training_checkpoint, load_exported_backbone):
        with pytest.raises(ValueError, match="it was not executed") as refused:
            load(path)
        # never the advice torch's own message gives (it would run the file's code)
        assert "weights_only=False" not in str(refused.value)
        assert "will likely succeed" not in str(refused.value)
    with pytest.warns(RuntimeWarning, match="not executed"):
        assert latest_valid_checkpoint(tmp_path, required_keys=CHECKPOINT_KEYS) is None
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# R9: checkpoints of every released format version keep loading and training

FIXTURES = Path(__file__).resolve().parent / "fixtures"
COMMITTED = sorted(FIXTURES.glob("checkpoint-v*.pt"))


def _fixture_script():
    spec = importlib.util.spec_from_file_location(
        "make_checkpoint_fixture", FIXTURES / "make_checkpoint_fixture.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def fixture_width(monkeypatch):
    """The small CNN at the width the fixtures were made with (restored after the test)."""
    from barlow import backbones

    monkeypatch.setattr(backbones, "SmallCNN", backbones.SmallCNN)
    _fixture_script().use_fixture_width()


def test_the_current_format_version_has_a_committed_fixture():
    assert FIXTURES / f"checkpoint-v{FORMAT_VERSION}.pt" in COMMITTED, (
        "run `python tests/fixtures/make_checkpoint_fixture.py` and commit its file"
    )


def zero_momentum_after_loading(optimizer):
    """Deliberately broken, for the negative case: the state comes back, the momentum zeroed."""
    for slots in optimizer.state.values():
        for value in slots.values():
            if torch.is_tensor(value):
                value.zero_()


@pytest.mark.parametrize("path", COMMITTED, ids=lambda path: path.name)
@pytest.mark.parametrize("load", ["load_state_dict", "broken: zero momentum"])
def test_committed_checkpoint_loads_and_trains_one_step(path, load, fixture_width):
    from barlow.assessment import load_pretrained
    from barlow.optim import build_optimizer

    assert path.stat().st_size < 100_000
    state = validate_checkpoint(path, required_keys=CHECKPOINT_KEYS)
    method, cfg, _ = load_pretrained(path)
    optimizer = build_optimizer(
        cfg.optim.name,
        method,
        lr=0.1,
        weight_decay=cfg.optim.weight_decay,
        momentum=cfg.optim.momentum,
        eta=cfg.optim.eta,
    )
    saved = {
        i: slots["momentum_buffer"].clone() for i, slots in state["optimizer"]["state"].items()
    }
    assert saved and all(v.abs().sum() > 0 for v in saved.values())  # real momentum in the file
    optimizer.load_state_dict(state["optimizer"])
    if load != "load_state_dict":
        zero_momentum_after_loading(optimizer)
    assert optimizer.state, "the optimizer state came back"  # the old check
    restored = optimizer.state_dict()["state"]
    assert restored.keys() == saved.keys()
    same = all(torch.equal(v, restored[i]["momentum_buffer"]) for i, v in saved.items())
    assert same == (load == "load_state_dict"), "the momentum buffers came back exactly"
    set_rng_state(state["rng"][0])
    before = {k: v.clone() for k, v in method.state_dict().items()}
    views = [torch.rand(16, 1, 16, 16) for _ in range(method.num_views)]
    loss = method(views).loss
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(before[k], v) for k, v in method.state_dict().items())


@pytest.mark.parametrize("path", COMMITTED, ids=lambda path: path.name)
def test_committed_checkpoint_resumes_through_pretrain(path, tmp_path, fixture_width):
    from barlow.config import from_dict
    from barlow.training import pretrain

    state = load_checkpoint(path)
    cfg = from_dict(state["config"])
    shutil.copyfile(path, tmp_path / "checkpoint.pt")
    resumed_from = int(state["global_step"])
    cfg = from_dict(apply_overrides(cfg.to_dict(), [f"train.max_steps={resumed_from + 1}"]))
    pretrain(cfg, tmp_path, resume=True, progress=False)
    after = validate_checkpoint(tmp_path / "checkpoint.pt", required_keys=CHECKPOINT_KEYS)
    assert int(after["global_step"]) == resumed_from + 1
