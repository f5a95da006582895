"""Datasets: facts, digits, the IDX reader, Fashion-MNIST, torchvision datasets, image folders."""

from __future__ import annotations

import gzip
import pickle
import re
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
    with pytest.raises(FileNotFoundError, match="not a directory"):
        data.dataset_info(str(tmp_path / "missing" / "dir"))


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
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError) as caught:
        data.build_dataset("fashion-mnist", root=empty)
    message = str(caught.value)
    assert "apt-get install dataset-fashion-mnist" in message
    assert str(empty) in message and "--data-root" in message
    assert "--set data.download=true" in message


def test_fashion_mnist_mismatched_files_are_an_error(tmp_path: Path, data_no_stores: Path) -> None:
    write_fashion_mnist(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(5, np.uint8))  # 6 images, 5 labels
    with pytest.raises(ValueError, match=r"6 images but .*train-labels-idx1-ubyte holds 5"):
        data.build_dataset("fashion-mnist", root=tmp_path)


def test_fashion_mnist_downloads_only_when_asked(
    tmp_path: Path, data_no_stores: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[dict[str, Any]] = []

    class FakeFashionMNIST:
        classes = torchvision.datasets.FashionMNIST.classes

        def __init__(self, root: str, train: bool = True, download: bool = False) -> None:
            calls.append({"root": root, "train": train, "download": download})
            write_fashion_mnist(Path(root) / "FashionMNIST" / "raw", n_train=3)

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", FakeFashionMNIST)
    root = tmp_path / "dl"
    with pytest.raises(FileNotFoundError):
        data.build_dataset("fashion-mnist", root=root, download=False)
    assert calls == []
    train = data.build_dataset("fashion-mnist", root=root, download=True)
    assert calls == [{"root": str(root), "train": True, "download": True}]
    assert len(train) == 3  # type: ignore[arg-type]
    data.build_dataset("fashion-mnist", root=root, download=True)
    assert len(calls) == 1  # files present: no second download


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


def test_sixteen_bit_greyscale_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 255, 256, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    image = data.read_image(tmp_path / "deep.png")
    assert image.shape == (3, 1, 5)
    assert image[0, 0].tolist() == [0, 0, 1, 128, 255]
    assert torch.equal(image[0], image[2])


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


def test_corrupt_images_name_the_file(tmp_path: Path) -> None:
    (tmp_path / "empty.jpg").write_bytes(b"")
    good = save_image(tmp_path / "good.png", "RGB", size=(64, 64))
    (tmp_path / "truncated.png").write_bytes(good.read_bytes()[:200])
    dataset = data.build_dataset(str(tmp_path))
    assert len(dataset) == 3  # type: ignore[arg-type]
    for index, name in ((0, "empty.jpg"), (2, "truncated.png")):
        with pytest.raises(data.CorruptImageError, match=re.escape(name)):
            dataset[index]
    # from a worker process too: DataLoader re-raises the error with the file in its message
    with pytest.raises(data.CorruptImageError, match=re.escape("empty.jpg")):
        list(DataLoader(dataset, batch_size=1, num_workers=1))


@pytest.mark.parametrize("side", [12, 20])  # over PIL's warning limit (100 px), over its error (2×)
def test_decompression_bombs_name_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, side: int
) -> None:
    path = save_image(tmp_path / "bomb.png", "RGB", size=(side, side))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(data.CorruptImageError, match=re.escape("bomb.png")):
        data.read_image(path)


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
