"""Datasets: facts, digits, the IDX reader, Fashion-MNIST, torchvision datasets, image folders."""

from __future__ import annotations

import ast
import gzip
import hashlib
import io
import pickle
import re
import tarfile
import traceback
import urllib.error
import urllib.request
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch.utils.data import DataLoader

from barlow import data

# ---------------------------------------------------------------------------------------------
# helpers


def write_idx(path: Path, array: np.ndarray, *, compress: bool = False) -> Path:
    """An IDX file: 0, 0, type code, ndim, big-endian uint32 dims, big-endian values."""
    codes = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C, np.dtype(np.float32): 0x0D}
    header = bytes([0, 0, codes[array.dtype], array.ndim])
    header += np.asarray(array.shape, dtype=">u4").tobytes()
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    if compress:
        payload, path = gzip.compress(payload), path.with_name(path.name + ".gz")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(payload)
    return path


def write_fashion_mnist(
    directory: Path, n_train: int = 6, n_test: int = 4, *, compress: bool = True
) -> None:
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        write_idx(directory / f"{prefix}-images-idx3-ubyte", images, compress=compress)
        labels = (np.arange(n) % 10).astype(np.uint8)
        write_idx(directory / f"{prefix}-labels-idx1-ubyte", labels, compress=compress)


def save_image(path: Path, mode: str, size: tuple[int, int] = (12, 10)) -> Path:
    """A small image of ``mode`` (W×H ``size``) saved in a format that keeps that mode."""
    w, h = size
    rng = np.random.default_rng(len(mode))
    if mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65536, size=(h, w), dtype=np.uint16))
    elif mode == "P":
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert("P")
        image.info["transparency"] = 0
    else:
        image = Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8)).convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a URL fails the test; tests that download serve fakes instead."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"a test tried to reach the network: {args[0]!r}")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)


def serve_files(monkeypatch: pytest.MonkeyPatch, files: dict[str, bytes]) -> list[str]:
    """Answer urlopen with ``files[basename of the URL]``; returns the names served, in order."""
    served: list[str] = []

    def urlopen(request: urllib.request.Request, timeout: float = 0) -> io.BytesIO:
        name = request.full_url.rsplit("/", 1)[-1]
        if name not in files:
            raise urllib.error.URLError(f"404 {request.full_url}")
        served.append(name)
        return io.BytesIO(files[name])

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    return served


def publish_hashes(monkeypatch: pytest.MonkeyPatch, name: str, files: Path) -> None:
    """Make the files under ``files`` the published ones of dataset ``name``."""
    remotes = tuple(
        data.RemoteFile(f"https://example.invalid/{p.name}", data.file_sha256(p))
        for p in sorted(files.iterdir())
    )
    monkeypatch.setitem(data.DOWNLOADS, name, remotes)


@pytest.fixture
def data_no_stores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Default data locations pointed at an empty directory: nothing found unless a test puts it."""
    store = tmp_path / "store"
    monkeypatch.setenv("BARLOW_DATA", str(store))
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian")
    return store


# ---------------------------------------------------------------------------------------------
# facts


@pytest.mark.parametrize("name", list(data.DATASETS))
def test_dataset_facts_are_consistent(name: str) -> None:
    info = data.DATASETS[name]
    assert info.name == name
    assert len(info.mean) == len(info.std) == info.channels
    assert all(0 < m < 1 for m in info.mean) and all(0 < s < 1 for s in info.std)
    assert info.image_size >= 8 and info.source
    assert data.dataset_info(name) is info


def test_dataset_info_of_a_directory_is_the_folder_facts(tmp_path: Path) -> None:
    info = data.dataset_info(str(tmp_path))
    assert info.name == "folder" and info.channels == 3 and info.image_size == 224


def test_dataset_info_rejects_unknown_names_with_a_suggestion(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="did you mean 'cifar10'"):
        data.dataset_info("cifar1O")
    missing = tmp_path / "missing" / "dir"
    with pytest.raises(FileNotFoundError, match="does not exist") as caught:
        data.dataset_info(str(missing))
    assert str(missing) in str(caught.value) and "<class>" in str(caught.value)
    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        data.dataset_info(str(tmp_path / "file.png"))


def test_build_dataset_rejects_unknown_split() -> None:
    with pytest.raises(ValueError, match="split must be one of"):
        data.build_dataset("digits", split="val")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# digits


def test_digits_splits_shapes_and_labels() -> None:
    train = data.build_dataset("digits", split="train")
    test = data.build_dataset("digits", split="test")
    assert isinstance(train, data.TensorImages) and isinstance(test, data.TensorImages)
    assert (len(train), len(test)) == (1437, 360) == (data.DATASETS["digits"].train_size, 360)
    image, label = train[0]
    assert image.dtype == torch.uint8 and image.shape == (1, 16, 16)
    assert isinstance(label, int)
    for split in (train, test):
        assert set(split.labels.tolist()) == set(range(10))
        assert data.labelled(split)
    # the 8×8 values 0..16 fill the uint8 range after scaling
    assert train.images.min() == 0 and train.images.max() == 255
    # stratified: each class holds ~20 % of its images in the test split
    counts = Counter(train.labels.tolist()), Counter(test.labels.tolist())
    for digit in range(10):
        total = counts[0][digit] + counts[1][digit]
        assert abs(counts[1][digit] - 0.2 * total) <= 1


def test_digits_split_is_deterministic_and_disjoint() -> None:
    a, b = data.build_dataset("digits"), data.build_dataset("digits")
    assert isinstance(a, data.TensorImages) and isinstance(b, data.TensorImages)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    unlabeled = data.build_dataset("digits", split="unlabeled")
    assert isinstance(unlabeled, data.TensorImages) and torch.equal(unlabeled.images, a.images)
    test = data.build_dataset("digits", split="test")
    assert isinstance(test, data.TensorImages)
    train_rows = {img.numpy().tobytes() for img in a.images}
    assert not any(img.numpy().tobytes() in train_rows for img in test.images)


def test_digits_mean_std_facts_match_the_train_split() -> None:
    train = data.build_dataset("digits", split="train")
    assert isinstance(train, data.TensorImages)
    x = train.images.double() / 255
    info = data.DATASETS["digits"]
    assert x.mean().item() == pytest.approx(info.mean[0], abs=1e-3)
    assert x.std(unbiased=False).item() == pytest.approx(info.std[0], abs=1e-3)


def test_in_memory_images_are_the_items() -> None:
    test = data.build_dataset("digits", split="test")
    memory = data.in_memory_images(test)
    assert memory is not None
    images, labels = memory
    assert images.dtype == torch.uint8 and labels.dtype == torch.int64
    assert images.shape == (360, 1, 16, 16) and labels.shape == (360,)
    image, label = test[7]
    assert torch.equal(images[7], image) and labels[7].item() == label


# ---------------------------------------------------------------------------------------------
# IDX reader


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.float32])
def test_read_idx_round_trips(tmp_path: Path, compress: bool, dtype: Any) -> None:
    values = np.arange(30).reshape(2, 3, 5)
    # negative, multi-byte values catch byte-order mistakes; uint8 has no byte order
    array = (values if dtype == np.uint8 else (values - 7) * 1001).astype(dtype)
    path = write_idx(tmp_path / "x-idx3-ubyte", array, compress=compress)
    read = data.read_idx(path)
    assert read.dtype == np.dtype(dtype) and read.shape == (2, 3, 5)
    np.testing.assert_array_equal(read, array)


def test_read_idx_rejects_bad_magic(tmp_path: Path) -> None:
    path = tmp_path / "bad-idx1-ubyte"
    path.write_bytes(b"\x01\x02\x08\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match=r"bad-idx1-ubyte.*not an IDX file"):
        data.read_idx(path)


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_rejects_truncated_files(tmp_path: Path, compress: bool) -> None:
    path = write_idx(tmp_path / "t-idx3-ubyte", np.zeros((4, 28, 28), np.uint8), compress=compress)
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(ValueError, match=rf"{re.escape(path.name)}.*(truncated|corrupt)"):
        data.read_idx(path)


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST


def test_fashion_mnist_from_the_debian_package() -> None:
    train = data.build_dataset("fashion-mnist", split="train")
    test = data.build_dataset("fashion-mnist", split="test")
    assert isinstance(train, data.TensorImages) and isinstance(test, data.TensorImages)
    assert (len(train), len(test)) == (60000, 10000)
    image, label = train[0]
    assert image.dtype == torch.uint8 and image.shape == (1, 28, 28) and 0 <= label < 10
    assert set(test.labels.tolist()) == set(range(10)) and data.labelled(test)
    info = data.DATASETS["fashion-mnist"]
    x = train.images.float() / 255
    assert x.mean().item() == pytest.approx(info.mean[0], abs=1e-3)
    assert x.std().item() == pytest.approx(info.std[0], abs=1e-3)


@pytest.mark.parametrize("layout", ["flat", "torchvision"])
def test_fashion_mnist_from_root(tmp_path: Path, data_no_stores: Path, layout: str) -> None:
    files = tmp_path / "fm" if layout == "flat" else tmp_path / "fm" / "FashionMNIST" / "raw"
    write_fashion_mnist(files, compress=layout == "flat")
    test = data.build_dataset("fashion-mnist", split="test", root=tmp_path / "fm")
    assert isinstance(test, data.TensorImages)
    assert test.images.shape == (4, 1, 28, 28) and test.labels.tolist() == [0, 1, 2, 3]
    assert np.array_equal(
        test.images[:, 0].numpy(), data.read_idx(next(files.glob("t10k-images*")))
    )


def test_fashion_mnist_from_barlow_data(data_no_stores: Path) -> None:
    write_fashion_mnist(data_no_stores / "fashion-mnist")
    assert len(data.build_dataset("fashion-mnist")) == 6  # type: ignore[arg-type]


def test_fashion_mnist_missing_names_places_and_fixes(tmp_path: Path, data_no_stores: Path) -> None:
    with pytest.raises(FileNotFoundError) as caught:
        data.build_dataset("fashion-mnist")
    message = str(caught.value)
    assert str(data_no_stores / "fashion-mnist") in message and "no-debian" in message
    assert "apt-get install dataset-fashion-mnist" in message and "--data-root" in message
    assert "--set data.download=true" in message


@pytest.fixture
def system_copies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Fashion-MNIST (6 train, 4 test images) in the default store and the system copy."""
    store = tmp_path / "store"
    monkeypatch.setenv("BARLOW_DATA", str(store))
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", tmp_path / "system")
    write_fashion_mnist(tmp_path / "system")
    write_fashion_mnist(store / "fashion-mnist")
    return tmp_path / "system"


def test_fashion_mnist_explicit_root_without_the_files_is_an_error(
    tmp_path: Path, system_copies: Path
) -> None:
    """--data-root is never silently replaced by the store or the system copy."""
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError) as caught:
        data.build_dataset("fashion-mnist", root=empty)
    message = str(caught.value)
    assert f"{empty} lacks train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz]" in message
    assert "Point data.root at the folder that holds" in message and "leave it unset" in message
    assert str(system_copies) in message and "--set data.download=true" in message
    write_idx(empty / "t10k-images-idx3-ubyte", np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(FileNotFoundError, match=r"lacks t10k-labels-idx1-ubyte\[\.gz\]\ "):
        data.build_dataset("fashion-mnist", split="test", root=empty)
    with pytest.raises(FileNotFoundError, match=re.escape(f"{tmp_path / 'nowhere'} does not")):
        data.build_dataset("fashion-mnist", root=tmp_path / "nowhere")


def test_fashion_mnist_explicit_root_is_used_over_the_system_copy(
    tmp_path: Path, system_copies: Path
) -> None:
    write_fashion_mnist(tmp_path / "mine", n_train=3, compress=False)
    assert len(data.build_dataset("fashion-mnist", root=tmp_path / "mine")) == 3  # type: ignore[arg-type]
    assert len(data.build_dataset("fashion-mnist")) == 6  # type: ignore[arg-type]


def test_fashion_mnist_mismatched_files_are_an_error(tmp_path: Path, data_no_stores: Path) -> None:
    write_fashion_mnist(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(5, np.uint8))  # 6 images, 5 labels
    with pytest.raises(ValueError, match=r"6 images but .*train-labels-idx1-ubyte holds 5"):
        data.build_dataset("fashion-mnist", root=tmp_path)


def test_fashion_mnist_downloads_only_when_asked(
    tmp_path: Path, data_no_stores: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = tmp_path / "upstream"
    write_fashion_mnist(files, n_train=3)
    served = serve_files(monkeypatch, {p.name: p.read_bytes() for p in files.iterdir()})
    publish_hashes(monkeypatch, "fashion-mnist", files)
    root = tmp_path / "dl"
    with pytest.raises(FileNotFoundError):
        data.build_dataset("fashion-mnist", root=root, download=False)
    assert served == []
    train = data.build_dataset("fashion-mnist", root=root, download=True)
    assert sorted(served) == sorted(p.name for p in files.iterdir())
    assert len(train) == 3  # type: ignore[arg-type]
    assert sorted(p.name for p in root.iterdir()) == sorted(p.name for p in files.iterdir())
    data.build_dataset("fashion-mnist", split="test", root=root, download=True)
    assert len(served) == 4  # files present: no second download


def test_tampered_fashion_mnist_download_is_deleted_and_not_used(
    tmp_path: Path, data_no_stores: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = tmp_path / "upstream"
    write_fashion_mnist(files)
    publish_hashes(monkeypatch, "fashion-mnist", files)
    tampered = {p.name: p.read_bytes() for p in files.iterdir()}
    tampered["train-images-idx3-ubyte.gz"] += b"\x00"
    serve_files(monkeypatch, tampered)
    root = tmp_path / "dl"
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte\.gz has SHA-256") as caught:
        data.build_dataset("fashion-mnist", root=root, download=True)
    expected = data.file_sha256(files / "train-images-idx3-ubyte.gz")
    assert expected in str(caught.value) and "deleted" in str(caught.value)
    assert not (root / "train-images-idx3-ubyte.gz").exists()
    assert not [p.name for p in root.iterdir() if p.name.startswith(".")]  # no partial file
    with pytest.raises(FileNotFoundError):
        data.build_dataset("fashion-mnist", root=root)


# ---------------------------------------------------------------------------------------------
# CIFAR / STL-10 through torchvision


def write_cifar10(root: Path, per_batch: int = 2) -> np.ndarray:
    """torchvision's on-disk CIFAR-10 layout with tiny batches; returns the train images NCHW."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    train = []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        images = rng.integers(0, 256, size=(per_batch, 3, 32, 32), dtype=np.uint8)
        labels = [(i + len(train)) % 10 for i in range(per_batch)]
        entry = {"data": images.reshape(per_batch, -1), "labels": labels}
        (folder / name).write_bytes(pickle.dumps(entry))
        if name != "test_batch":
            train.append(images)
    classes = ["airplane", "automobile", "bird", "cat", "deer"]
    classes += ["dog", "frog", "horse", "ship", "truck"]
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": classes}))
    return np.concatenate(train)


def test_cifar10_in_memory_conversion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The fake files cannot match torchvision's md5s; its integrity check is its own business.
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    expected = write_cifar10(tmp_path)
    train = data.build_dataset("cifar10", root=tmp_path)
    assert isinstance(train, data.TensorImages) and len(train) == 10
    assert train.images.is_contiguous() and train.images.shape == (10, 3, 32, 32)
    assert torch.equal(train.images, torch.from_numpy(expected))  # CHW, channel planes intact
    assert train.classes[0] == "airplane" and data.labelled(train)
    image, label = train[3]
    assert image.dtype == torch.uint8 and isinstance(label, int)
    assert len(data.build_dataset("cifar10", split="test", root=tmp_path)) == 2  # type: ignore[arg-type]


def make_tar(path: Path, members: dict[str, bytes], links: dict[str, str] | None = None) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    return path


def test_cifar10_download_is_checked_then_unpacked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # torchvision's md5 check, minus the md5 the fake files cannot match
    monkeypatch.setattr(
        torchvision.datasets.cifar, "check_integrity", lambda p, *a: Path(p).is_file()
    )
    upstream = tmp_path / "upstream"
    expected = write_cifar10(upstream)
    archive_dir = tmp_path / "published"
    archive_dir.mkdir()
    folder = upstream / "cifar-10-batches-py"
    make_tar(
        archive_dir / "cifar-10-python.tar.gz",
        {f"cifar-10-batches-py/{p.name}": p.read_bytes() for p in sorted(folder.iterdir())},
    )
    publish_hashes(monkeypatch, "cifar10", archive_dir)
    served = serve_files(monkeypatch, {"cifar-10-python.tar.gz": b"tampered"})
    root = tmp_path / "root"
    with pytest.raises(ValueError, match="SHA-256"):
        data.build_dataset("cifar10", root=root, download=True)
    assert served == ["cifar-10-python.tar.gz"] and not (root / "cifar-10-batches-py").exists()
    good = (archive_dir / "cifar-10-python.tar.gz").read_bytes()
    served = serve_files(monkeypatch, {"cifar-10-python.tar.gz": good})
    train = data.build_dataset("cifar10", root=root, download=True)
    assert isinstance(train, data.TensorImages)
    assert torch.equal(train.images, torch.from_numpy(expected))
    assert data.build_dataset("cifar10", split="test", root=root, download=True)
    assert served == ["cifar-10-python.tar.gz"]  # once


@pytest.mark.parametrize("archive", ["good", "escaping"])
def test_stl10_download_is_md5_checked_by_torchvision_and_unpacked_safely(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, archive: str
) -> None:
    monkeypatch.setattr(
        torchvision.datasets.stl10, "check_integrity", lambda p, *a: Path(p).is_file()
    )
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(2, 3, 96, 96), dtype=np.uint8)
    members = {
        "stl10_binary/train_X.bin": images.transpose(0, 1, 3, 2).tobytes(),
        "stl10_binary/train_y.bin": bytes([3, 4]),
        "stl10_binary/test_X.bin": images[:1].tobytes(),
        "stl10_binary/test_y.bin": bytes([1]),
        "stl10_binary/unlabeled_X.bin": images[1:].tobytes(),
    }
    if archive == "escaping":
        members["../../outside.bin"] = b"x"
    calls = []

    def download_url(url: str, root: Path, filename: str, md5: str) -> None:
        calls.append((url, md5))
        make_tar(Path(root) / filename, members)

    monkeypatch.setattr(torchvision.datasets.utils, "download_url", download_url)
    root = tmp_path / "a" / "root"
    root.mkdir(parents=True)
    if archive == "escaping":
        with pytest.raises(ValueError, match="refusing to unpack"):
            data.build_dataset("stl10", root=root, download=True)
        assert not (tmp_path / "outside.bin").exists()
        return
    train = data.build_dataset("stl10", root=root, download=True)
    assert isinstance(train, data.TensorImages) and train.labels.tolist() == [2, 3]
    assert torch.equal(train.images, torch.from_numpy(images))
    assert calls == [(torchvision.datasets.STL10.url, torchvision.datasets.STL10.tgz_md5)]


def test_archive_members_outside_the_target_are_refused(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.mkdir()
    escape = make_tar(tmp_path / "escape.tar.gz", {"ok.txt": b"fine", "../escaped.txt": b"x"})
    with pytest.raises(ValueError, match=r"escape\.tar\.gz"):
        data.extract_tar(escape, target)
    assert not (tmp_path / "escaped.txt").exists()
    link = make_tar(tmp_path / "link.tar.gz", {}, links={"passwd": "/etc/passwd"})
    with pytest.raises(ValueError, match="refusing to unpack"):
        data.extract_tar(link, target)
    assert not (target / "passwd").exists()
    (tmp_path / "junk.tar.gz").write_bytes(b"not a tar")
    with pytest.raises(ValueError, match="not a readable tar"):
        data.extract_tar(tmp_path / "junk.tar.gz", target)


def test_download_file_checks_the_hash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    payload = b"weights" * 1000
    sha = hashlib.sha256(payload).hexdigest()
    served = serve_files(monkeypatch, {"w.bin": payload})
    dest = tmp_path / "d" / "w.bin"
    assert data.download_file("https://example.invalid/w.bin", dest, sha256=sha.upper()) == dest
    assert dest.read_bytes() == payload and served == ["w.bin"]
    assert sorted(p.name for p in dest.parent.iterdir()) == ["w.bin"]  # no partial file
    data.download_file("https://example.invalid/w.bin", dest, sha256=sha)
    assert served == ["w.bin"]  # present and verified: not fetched again
    dest.write_bytes(b"changed on disk")
    with pytest.raises(ValueError, match="exists but its SHA-256"):
        data.download_file("https://example.invalid/w.bin", dest, sha256=sha)
    assert dest.exists()  # not ours to delete


def test_download_file_network_errors_name_the_url(tmp_path: Path, monkeypatch) -> None:
    serve_files(monkeypatch, {})
    with pytest.raises(ConnectionError, match=r"https://example\.invalid/gone\.bin"):
        data.download_file("https://example.invalid/gone.bin", tmp_path / "g.bin", sha256="0")
    assert list(tmp_path.iterdir()) == []


def test_published_hashes_look_like_sha256() -> None:
    for remotes in data.DOWNLOADS.values():
        for remote in remotes:
            assert re.fullmatch(r"[0-9a-f]{64}", remote.sha256), remote
            assert remote.url.endswith(remote.filename) and remote.filename


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "stl10"])
def test_torchvision_dataset_missing_names_the_flag(
    tmp_path: Path, data_no_stores: Path, name: str
) -> None:
    with pytest.raises(FileNotFoundError, match=re.escape("--set data.download=true")) as caught:
        data.build_dataset(name, root=tmp_path)
    assert str(tmp_path) in str(caught.value)
    with pytest.raises(FileNotFoundError, match=re.escape(str(data_no_stores / name))):
        data.build_dataset(name)


def test_stl10_unlabeled_split_is_train_plus_unlabeled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torchvision.datasets.stl10, "check_integrity", lambda *a, **k: True)
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, size=(2, 3, 96, 96), dtype=np.uint8)
    unlabeled = rng.integers(0, 256, size=(3, 3, 96, 96), dtype=np.uint8)
    # STL-10 stores each channel plane column-major
    (folder / "train_X.bin").write_bytes(train.transpose(0, 1, 3, 2).tobytes())
    (folder / "train_y.bin").write_bytes(bytes([1, 10]))  # 1-based on disk
    (folder / "unlabeled_X.bin").write_bytes(unlabeled.transpose(0, 1, 3, 2).tobytes())
    labelled_train = data.build_dataset("stl10", root=tmp_path)
    assert isinstance(labelled_train, data.TensorImages) and data.labelled(labelled_train)
    assert labelled_train.labels.tolist() == [0, 9]
    everything = data.build_dataset("stl10", split="unlabeled", root=tmp_path)
    assert isinstance(everything, data.TensorImages) and not data.labelled(everything)
    assert everything.labels.tolist() == [0, 9, -1, -1, -1]
    assert torch.equal(everything.images, torch.from_numpy(np.concatenate([train, unlabeled])))


# ---------------------------------------------------------------------------------------------
# image folders

MODES = ["RGB", "L", "LA", "P", "RGBA", "CMYK", "I;16", "1"]


def _suffix(mode: str) -> str:
    return ".jpg" if mode == "CMYK" else ".png"


def test_labelled_folder_with_mixed_modes(tmp_path: Path) -> None:
    for i, mode in enumerate(MODES):
        save_image(tmp_path / ("cat" if i % 2 else "dog") / f"{i}{_suffix(mode)}", mode)
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    dataset = data.build_dataset(str(tmp_path))
    assert isinstance(dataset, data.ImageFiles)
    assert data.labelled(dataset) and dataset.classes == ["cat", "dog"]
    assert len(dataset) == len(MODES)
    assert sorted(label for _, label in dataset.samples) == [0] * 4 + [1] * 4
    assert data.in_memory_images(dataset) is None
    images, labels = next(iter(DataLoader(dataset, batch_size=len(MODES))))
    assert images.shape == (len(MODES), 3, 10, 12) and images.dtype == torch.uint8
    assert labels.dtype == torch.int64


def expected_pixels(path: Path, mode: str, channels: int) -> np.ndarray:
    """What each mode should become, from PIL's own per-mode conversions: (H, W, channels)."""
    with Image.open(path) as image:
        if mode == "I;16":
            grey = (np.asarray(image, dtype=np.int64) >> 8).astype(np.uint8)
            return np.repeat(grey[:, :, None], channels, axis=2)
        rgba = image.convert("RGBA") if mode in ("P", "LA", "RGBA") else None
        rgb = Image.fromarray(np.asarray(rgba)[:, :, :3]) if rgba else image.convert("RGB")
    if channels == 1:
        return np.asarray(rgb.convert("L"))[:, :, None]
    return np.asarray(rgb)


@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "RGB", "1"])
def test_each_mode_becomes_the_declared_channels(tmp_path: Path, mode: str, channels: int) -> None:
    path = save_image(tmp_path / f"x{'.tiff' if mode == 'CMYK' else '.png'}", mode)
    with Image.open(path) as image:
        assert image.mode == mode or (mode == "I;16" and image.mode.startswith("I"))
    image = data.read_image(path, channels=channels)
    assert image.dtype == torch.uint8 and image.shape == (channels, 10, 12)
    np.testing.assert_array_equal(
        image.permute(1, 2, 0).numpy(), expected_pixels(path, mode, channels)
    )
    if mode in ("L", "LA", "I;16", "1") and channels == 3:
        assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])


def test_image_files_declare_their_channels(tmp_path: Path) -> None:
    for i, mode in enumerate(MODES):
        save_image(tmp_path / f"{i}{_suffix(mode)}", mode)
    dataset = data.build_dataset(str(tmp_path))
    assert isinstance(dataset, data.ImageFiles) and dataset.channels == 3
    grey = data.ImageFiles(dataset.root, dataset.samples, dataset.classes, channels=1)
    images, _ = next(iter(DataLoader(grey, batch_size=len(MODES))))
    assert images.shape == (len(MODES), 1, 10, 12)
    with pytest.raises(ValueError, match="channels must be 1"):
        data.read_image(dataset.samples[0][0], channels=4)


def test_tiny_images_go_through_every_methods_views(tmp_path: Path) -> None:
    from barlow.augment import MultiView, build_specs, recipe_for
    from barlow.methods import METHODS

    for i, mode in enumerate(["RGB", "L", "P", "RGBA"]):
        save_image(tmp_path / f"{i}.png", mode, size=(8, 8))
    dataset = data.build_dataset(str(tmp_path))
    info = data.dataset_info(str(tmp_path))
    for name, method in METHODS.items():
        recipe = recipe_for(method.views, channels=3, image_size=32)
        views = MultiView(build_specs(recipe, crop_size=32, mean=info.mean, std=info.std))
        drawn = [views(image) for image, _ in dataset]  # type: ignore[attr-defined]
        assert len(drawn[0]) == method.num_views, name
        for view in (v for sample in drawn for v in sample):
            assert view.shape == (3, 32, 32) and torch.isfinite(view).all(), (name, recipe)


@pytest.mark.parametrize("suffix", [".png", ".tiff"])
def test_sixteen_bit_greyscale_is_scaled_not_clipped(tmp_path: Path, suffix: str) -> None:
    values = np.array([[0, 255, 256, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / f"deep{suffix}")
    image = data.read_image(tmp_path / f"deep{suffix}")
    assert image.shape == (3, 1, 5)
    assert image[0, 0].tolist() == [0, 0, 1, 128, 255]
    assert torch.equal(image[0], image[2])


def test_float_images_in_0_1_are_scaled_by_255(tmp_path: Path) -> None:
    Image.fromarray(np.array([[0, 0.25, 0.5, 1]], np.float32)).save(tmp_path / "f.tiff")
    with Image.open(tmp_path / "f.tiff") as image:
        assert image.mode == "F"
    image = data.read_image(tmp_path / "f.tiff")
    assert image[0, 0].tolist() == [0, 64, 128, 255] and torch.equal(image[0], image[2])
    assert data.read_image(tmp_path / "f.tiff", channels=1).shape == (1, 1, 4)


def test_int32_images_holding_16_bit_values_are_read_as_16_bit(tmp_path: Path) -> None:
    # how older Pillow opens a 16-bit PNG: mode "I"
    Image.fromarray(np.array([[0, 256, 32768, 65535]], np.int32)).save(tmp_path / "i.tiff")
    with Image.open(tmp_path / "i.tiff") as image:
        assert image.mode == "I"
    assert data.read_image(tmp_path / "i.tiff")[0, 0].tolist() == [0, 1, 128, 255]


@pytest.mark.parametrize(
    "values",
    [
        np.array([[0, 10, 500, 1000]], np.float32),  # not in [0, 1]: units unknown
        np.array([[0, np.nan, 0.5, 1]], np.float32),
        np.array([[100_000, 150_000, 2_000_000]], np.int32),  # 32-bit counts: was all 255
        np.array([[-5, 0, 300]], np.int32),
        np.array([[0, 17, 200, 255]], np.int32),  # 8-bit values stored wide: was all 0
    ],
)
def test_deep_images_without_one_8_bit_reading_are_refused(
    tmp_path: Path, values: np.ndarray
) -> None:
    path = tmp_path / "deep.tiff"
    Image.fromarray(values).save(path)
    mode = "F" if values.dtype == np.float32 else "I"
    with pytest.raises(data.CorruptImageError, match=re.escape(f"{path} has PIL mode {mode} ")):
        data.read_image(path)
    with pytest.raises(data.CorruptImageError, match="convert it to an 8-bit PNG"):
        data.read_image(path, channels=1)


def test_unlabelled_folder_is_searched_recursively(tmp_path: Path) -> None:
    save_image(tmp_path / "top.png", "RGB")
    save_image(tmp_path / "a" / "b" / "deep.jpg", "L")
    save_image(tmp_path / ".hidden" / "skipped.png", "RGB")
    (tmp_path / "readme.md").write_text("hello")
    dataset = data.build_dataset(str(tmp_path), split="unlabeled")
    assert isinstance(dataset, data.ImageFiles) and not data.labelled(dataset)
    assert [Path(p).name for p, _ in dataset.samples] == ["top.png", "deep.jpg"]
    image, label = dataset[1]
    assert image.shape == (3, 10, 12) and image.dtype == torch.uint8 and label == -1


def test_folder_splits_share_the_train_classes(tmp_path: Path) -> None:
    for cls in ("ant", "bee", "cow"):
        save_image(tmp_path / "train" / cls / "x.png", "RGB")
    for cls in ("bee", "cow"):
        save_image(tmp_path / "val" / cls / "y.png", "RGB")
    train = data.build_dataset("folder", root=tmp_path)
    test = data.build_dataset("folder", split="test", root=tmp_path)
    assert isinstance(train, data.ImageFiles) and isinstance(test, data.ImageFiles)
    assert train.classes == test.classes == ["ant", "bee", "cow"]
    assert [label for _, label in test.samples] == [1, 2]  # not renumbered to 0, 1
    save_image(tmp_path / "val" / "dog" / "z.png", "RGB")
    with pytest.raises(ValueError, match="dog"):
        data.build_dataset(str(tmp_path), split="test")


def test_folder_without_val_has_no_test_split(tmp_path: Path) -> None:
    save_image(tmp_path / "c" / "x.png", "RGB")
    with pytest.raises(FileNotFoundError, match="no test split"):
        data.build_dataset(str(tmp_path), split="test")
    with pytest.raises(ValueError, match="--data-root"):
        data.build_dataset("folder")


def test_empty_folder_names_path_and_layout(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="no images found in") as caught:
        data.build_dataset(str(tmp_path))
    assert str(tmp_path) in str(caught.value) and "<class>" in str(caught.value)


def worker_error(loader: DataLoader[Any]) -> tuple[type[BaseException], str]:
    """Iterate ``loader``; return the type and message of the error it raised.

    The re-raised worker error sits in a reference cycle with the frames that hold the loader's
    iterator; left to the garbage collector, the iterator's shutdown waits 5 s for its worker.
    Clearing the frames frees the iterator at once.
    """
    try:
        for _ in loader:
            pass
    except Exception as e:
        traceback.clear_frames(e.__traceback__)
        return type(e), str(e)
    raise AssertionError("the loader raised nothing")


def test_corrupt_images_name_the_file(tmp_path: Path) -> None:
    (tmp_path / "empty.jpg").write_bytes(b"")
    good = save_image(tmp_path / "good.png", "RGB", size=(64, 64))
    (tmp_path / "truncated.png").write_bytes(good.read_bytes()[:200])
    dataset = data.build_dataset(str(tmp_path))
    assert len(dataset) == 3  # type: ignore[arg-type]
    for index, name in ((0, "empty.jpg"), (2, "truncated.png")):
        with pytest.raises(data.CorruptImageError, match=re.escape(name)) as caught:
            dataset[index]
        # the way out: skip such files, or remove this one
        assert "--skip-corrupt (config data.skip_corrupt=true)" in str(caught.value)
        assert "remove the file" in str(caught.value)
    # from a worker process too: DataLoader re-raises the error with the file in its message
    kind, message = worker_error(DataLoader(dataset, batch_size=1, num_workers=1))
    assert kind is data.CorruptImageError and "empty.jpg" in message


@pytest.mark.parametrize("side", [12, 20])  # over PIL's warning limit (100 px), over its error (2×)
def test_decompression_bombs_name_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, side: int
) -> None:
    path = save_image(tmp_path / "bomb.png", "RGB", size=(side, side))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(data.CorruptImageError, match=re.escape(str(path))) as caught:
        data.read_image(path)
    assert "decompression bomb" in str(caught.value) and "never None" in str(caught.value)
    kind, message = worker_error(DataLoader(data.build_dataset(str(tmp_path)), num_workers=1))
    assert kind is data.CorruptImageError and "decompression bomb" in message


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` × ``height`` RGB pixels, with no pixel data."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(kind + payload).to_bytes(4, "big")
        return len(payload).to_bytes(4, "big") + kind + payload + crc

    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_a_bomb_sized_header_is_refused_at_the_default_limit(tmp_path: Path) -> None:
    # 50 000² = 2.5 G pixels: over twice PIL's default limit (89.5 M), refused before decoding
    path = tmp_path / "huge.png"
    path.write_bytes(png_header(50_000, 50_000))
    with pytest.raises(data.CorruptImageError, match="decompression bomb") as caught:
        data.read_image(path)
    assert str(path) in str(caught.value)
    assert isinstance(caught.value.__cause__, Image.DecompressionBombError)


def test_the_decompression_bomb_limit_is_never_lifted() -> None:
    """No module sets PIL.Image.MAX_IMAGE_PIXELS (to None or anything); PIL's default holds."""
    src = Path(data.__file__).parent
    for source in sorted(src.rglob("*.py")):
        for node in ast.walk(ast.parse(source.read_text())):
            targets = getattr(node, "targets", None) or [getattr(node, "target", None)]
            for target in targets:
                assert getattr(target, "attr", None) != "MAX_IMAGE_PIXELS", source
                assert getattr(target, "id", None) != "MAX_IMAGE_PIXELS", source
    assert Image.MAX_IMAGE_PIXELS == (1024 * 1024 * 1024 // 4 // 3)


def test_imagenet_layout(tmp_path: Path, data_no_stores: Path) -> None:
    with pytest.raises(FileNotFoundError, match=re.escape("image-net.org")):
        data.build_dataset("imagenet")
    for wnid in ("n01440764", "n01443537"):
        save_image(tmp_path / "train" / wnid / "a.JPEG", "RGB")
    save_image(tmp_path / "val" / "ILSVRC2012_val_00000001.JPEG", "RGB")
    train = data.build_dataset("imagenet", root=tmp_path)
    assert data.labelled(train) and len(train) == 2  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not in class folders"):
        data.build_dataset("imagenet", split="test", root=tmp_path)
