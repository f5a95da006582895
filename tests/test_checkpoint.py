import errno
import hashlib
import os
import random
import stat

import numpy as np
import pytest
import torch
from torch import nn

from barlow.checkpoint import (
    FORMAT_VERSION,
    export_backbone,
    load_backbone_weights,
    load_checkpoint,
    load_exported_backbone,
    rng_state,
    save_checkpoint,
    set_rng_state,
)


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
    if suffix == ".safetensors":
        pytest.importorskip("safetensors")
    backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    path = tmp_path / f"backbone{suffix}"
    export_backbone(backbone.state_dict(), path)
    assert os.listdir(tmp_path) == [path.name]
    weights = load_exported_backbone(path)
    fresh = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    load_backbone_weights(fresh, weights)
    for a, b in zip(backbone.state_dict().values(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_export_backbone_refuses_non_finite(tmp_path):
    with pytest.raises(ValueError, match="'w'"):
        export_backbone({"w": torch.tensor([float("nan")])}, tmp_path / "b.pt")
    assert os.listdir(tmp_path) == []
