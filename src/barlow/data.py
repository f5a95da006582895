"""Datasets, their facts, and the in-memory fast path.

Every dataset yields ``(image, label)``: ``image`` a uint8 tensor (C, H, W) with the dataset's
channels (1 for digits and Fashion-MNIST, 3 otherwise) and ``label`` an int, −1 when unlabelled.
Small datasets (digits, Fashion-MNIST, CIFAR, STL-10) live in memory as one (N, C, H, W) tensor;
image folders decode one file per item with PIL.

Nothing is downloaded unless ``download=True`` (``--set data.download=true``); a missing dataset
fails with the command or flag that gets it. Every file barlow downloads itself is checked against
its SHA-256 before use (:data:`DOWNLOADS`, :func:`download_file`) and archives are unpacked with
the ``"data"`` tar filter, which refuses members that would land outside the target directory.
"""

from __future__ import annotations

import difflib
import gzip
import hashlib
import os
import stat
import tarfile
import urllib.request
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.datasets as tv_datasets
import torchvision.datasets.utils as tv_utils
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset, Subset
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

from barlow.rundir import atomic_write

Split = Literal["train", "test", "unlabeled"]
SPLITS: tuple[str, ...] = ("train", "test", "unlabeled")

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DatasetInfo:
    """Facts about a dataset, kept here so recipes name a dataset instead of copying them."""

    name: str
    channels: int
    image_size: int  # side length of training crops
    mean: tuple[float, ...]  # per channel, in [0, 1] units, over the training images
    std: tuple[float, ...]
    num_classes: int | None
    train_size: int | None  # images in the "train" split (None: depends on the folder)
    source: str  # where the data comes from and how to get it


DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        DatasetInfo(
            "digits",
            channels=1,
            image_size=16,
            # Measured on the 16×16 train split (test_data.py recomputes them).
            mean=(0.3054,),
            std=(0.3186,),
            num_classes=10,
            train_size=1437,
            source="scikit-learn's bundled load_digits (1797 8×8 images, upsampled to 16×16); "
            "no download",
        ),
        DatasetInfo(
            "fashion-mnist",
            channels=1,
            image_size=28,
            mean=(0.2860,),
            std=(0.3530,),
            num_classes=10,
            train_size=60000,
            source="IDX files: apt-get install dataset-fashion-mnist (/usr/share/datasets/"
            "fashion-mnist), --data-root DIR, or --set data.download=true",
        ),
        DatasetInfo(
            "cifar10",
            channels=3,
            image_size=32,
            mean=(0.4914, 0.4822, 0.4465),
            std=(0.2470, 0.2435, 0.2616),
            num_classes=10,
            train_size=50000,
            source="torchvision CIFAR10 (cifar-10-batches-py/); --set data.download=true gets it",
        ),
        DatasetInfo(
            "cifar100",
            channels=3,
            image_size=32,
            mean=(0.5071, 0.4865, 0.4409),
            std=(0.2673, 0.2564, 0.2762),
            num_classes=100,
            train_size=50000,
            source="torchvision CIFAR100 (cifar-100-python/); --set data.download=true gets it",
        ),
        DatasetInfo(
            "stl10",
            channels=3,
            image_size=96,
            mean=(0.4467, 0.4398, 0.4066),
            std=(0.2603, 0.2566, 0.2713),
            num_classes=10,
            train_size=5000,  # split "unlabeled" adds the 100 000 unlabelled images
            source="torchvision STL10 (stl10_binary/); --set data.download=true gets it",
        ),
        DatasetInfo(
            "imagenet",
            channels=3,
            image_size=224,
            mean=_IMAGENET_MEAN,
            std=_IMAGENET_STD,
            num_classes=1000,
            train_size=1281167,
            source="ILSVRC-2012 from image-net.org, unpacked as --data-root DIR with "
            "DIR/train/<class>/*.JPEG and DIR/val/<class>/*.JPEG",
        ),
        DatasetInfo(
            "folder",
            channels=3,
            image_size=224,
            mean=_IMAGENET_MEAN,
            std=_IMAGENET_STD,
            num_classes=None,
            train_size=None,
            source="any directory of images: DIR/<class>/*.jpg (labelled), images anywhere "
            "under DIR (unlabelled), or DIR/train/ + DIR/val/",
        ),
    )
}


def dataset_info(name_or_path: str) -> DatasetInfo:
    """The facts of a named dataset; an existing directory gives the ``"folder"`` facts."""
    if name_or_path in DATASETS:
        return DATASETS[name_or_path]
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return DATASETS["folder"]
    if path.exists() or os.sep in name_or_path or "/" in name_or_path:
        what = "is not a directory" if path.exists() else "does not exist"
        raise FileNotFoundError(
            f"dataset {name_or_path!r}: {path} {what}; give a directory of images "
            f"({_layout_hint(path)}) or one of {', '.join(DATASETS)}"
        )
    close = difflib.get_close_matches(name_or_path, DATASETS, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ValueError(
        f"unknown dataset {name_or_path!r}; {hint}choose one of {', '.join(DATASETS)} "
        "or give a directory of images"
    )


def _default_root(name: str) -> Path:
    """Where a dataset is looked for and downloaded to when no root is given."""
    base = os.environ.get("BARLOW_DATA")
    return (Path(base).expanduser() if base else Path.home() / ".cache" / "barlow") / name


# ---------------------------------------------------------------------------------------------
# Downloads


@dataclass(frozen=True)
class RemoteFile:
    """A file barlow downloads, with the SHA-256 of its bytes."""

    url: str
    sha256: str

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


_FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"  # torchvision's

# SHA-256 of the upstream files, as published by Keras (``get_file(file_hash=…)``) and
# torchvision's prototype datasets (CIFAR) and in independent download scripts (Fashion-MNIST).
# STL-10 has no published SHA-256: torchvision's download_url fetches it and checks its MD5.
DOWNLOADS: dict[str, tuple[RemoteFile, ...]] = {
    "fashion-mnist": tuple(
        RemoteFile(_FASHION_MNIST_URL + name, sha256)
        for name, sha256 in (
            (
                "train-images-idx3-ubyte.gz",
                "08dc20ab1689590a0bcd66e874647b6ee8464e2d501b5a3f1f78831db19a3fdc",
            ),
            (
                "train-labels-idx1-ubyte.gz",
                "b0197879cbda89f3dc7b894f9fd52b858e68ea4182b6947c9d8c2b67e5f18dcc",
            ),
            (
                "t10k-images-idx3-ubyte.gz",
                "78dcbbfb5a27efaf1b6c1d616caca68560be8766c5bffcb2791df9273a534229",
            ),
            (
                "t10k-labels-idx1-ubyte.gz",
                "42bd18137a62d5998cdeae52bf3a0676ac6b706f5cf8439b47bb5b151ae3dccf",
            ),
        )
    ),
    "cifar10": (
        RemoteFile(
            "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
            "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce",
        ),
    ),
    "cifar100": (
        RemoteFile(
            "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
            "85cd44d02ba6437773c5bbd22e183051d648de2e7d6b014e1ef29b855ba677a7",
        ),
    ),
}


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def download_file(url: str, dest: str | Path, *, sha256: str) -> Path:
    """Download ``url`` to ``dest`` unless ``dest`` already holds the file; return ``dest``.

    The bytes stream into a temporary file beside ``dest`` while being hashed; only when their
    SHA-256 equals ``sha256`` is the file renamed to ``dest``. On a mismatch the temporary file is
    deleted and ValueError names the URL and both hashes, so a corrupt or tampered download is
    never used. An existing ``dest`` with another hash is an error too (it is not deleted).
    """
    dest = Path(dest)
    expected = sha256.lower()
    if dest.is_file():
        actual = file_sha256(dest)
        if actual != expected:
            raise ValueError(
                f"{dest} exists but its SHA-256 is {actual}, not the expected {expected}: the "
                "file is corrupt, truncated or not the published one; delete it and download again"
            )
        return dest

    def stream(file: IO[bytes]) -> None:
        digest = hashlib.sha256()
        request = urllib.request.Request(url, headers={"User-Agent": "barlow"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                while chunk := response.read(1 << 20):
                    digest.update(chunk)
                    file.write(chunk)
        except OSError as e:  # URLError, timeouts, connection resets
            raise ConnectionError(
                f"cannot download {url}: {e}; check the network, or fetch the file by hand "
                f"into {dest.parent} (SHA-256 {expected})"
            ) from e
        actual = digest.hexdigest()
        if actual != expected:  # raised inside the write: the temp file is deleted
            raise ValueError(
                f"download of {url} has SHA-256 {actual}, not the expected {expected}: corrupt "
                "or tampered with, so it was deleted; try again later or from another network"
            )

    atomic_write(dest, stream, suffix=".part")
    return dest


def extract_tar(archive: str | Path, directory: str | Path) -> None:
    """Unpack a tar archive into ``directory`` with the ``"data"`` filter (PEP 706).

    The filter refuses absolute paths, ``..`` components, links pointing outside ``directory``
    and device files; without it Python < 3.14 trusts every member. Raises ValueError naming the
    archive and the refused member.
    """
    if not hasattr(tarfile, "data_filter"):
        raise RuntimeError(
            "safe tar extraction needs Python >= 3.11.4 (tarfile's filter='data'); upgrade Python"
        )
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(directory, filter="data")
    except tarfile.FilterError as e:
        raise ValueError(
            f"refusing to unpack {archive}: {e}; a dataset archive never needs that, so the file "
            "is not the published one; delete it"
        ) from e
    except (tarfile.TarError, EOFError, zlib.error) as e:
        raise ValueError(f"{archive} is not a readable tar archive ({e}); delete it") from e


def _fetch(name: str, directory: Path) -> list[Path]:
    """Download (SHA-256 checked) the files of dataset ``name`` into ``directory``."""
    return [
        download_file(remote.url, directory / remote.filename, sha256=remote.sha256)
        for remote in DOWNLOADS[name]
    ]


def _fetch_archives(name: str, directory: Path) -> list[Path]:
    """The archives of a torchvision dataset, downloaded into ``directory`` and checked."""
    if name in DOWNLOADS:
        return _fetch(name, directory)
    # STL-10 has no published SHA-256: torchvision's download_url checks the MD5 it ships.
    dataset_cls: Any = getattr(tv_datasets, _TORCHVISION[name][0])
    tv_utils.download_url(dataset_cls.url, directory, dataset_cls.filename, dataset_cls.tgz_md5)
    return [directory / dataset_cls.filename]


# ---------------------------------------------------------------------------------------------
# In-memory datasets


class TensorImages(Dataset[tuple[Tensor, int]]):
    """Images held in memory: uint8 ``images`` (N, C, H, W) and int64 ``labels`` (N,), −1 when
    unlabelled."""

    def __init__(self, images: Tensor, labels: Tensor, classes: list[str]) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4 or labels.shape != images.shape[:1]:
            raise ValueError(
                f"expected uint8 images (N, C, H, W) and labels (N,), got {images.dtype} "
                f"{tuple(images.shape)} and {tuple(labels.shape)}"
            )
        self.images, self.labels, self.classes = images, labels.long(), classes

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.images[index], int(self.labels[index])

    @property
    def labelled(self) -> bool:
        return len(self) > 0 and bool((self.labels >= 0).all())


def _digits(split: Split) -> TensorImages:
    """scikit-learn's 8×8 digits, scaled to 0..255 and upsampled once to 16×16 (bilinear).

    Split 80/20, stratified, ``random_state=0``; "unlabeled" is the train split.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    # Pixel values are 0..16; scaling is linear, so scaling before interpolation and rounding
    # once gives the same uint8 as rounding twice, minus the double rounding error.
    pixels = torch.from_numpy(bunch.images).float().unsqueeze(1) * (255.0 / 16.0)
    upsampled = F.interpolate(pixels, size=(16, 16), mode="bilinear", align_corners=False)
    images = upsampled.round().clamp(0, 255).to(torch.uint8)
    labels = torch.from_numpy(bunch.target).long()
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=0.2, random_state=0, stratify=bunch.target
    )
    keep = torch.from_numpy(np.sort(test_idx if split == "test" else train_idx))
    return TensorImages(images[keep].contiguous(), labels[keep], [str(d) for d in range(10)])


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST: IDX files

# Debian's dataset-fashion-mnist package; a module constant so tests can point it elsewhere.
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

_IDX_DTYPES: dict[int, np.dtype[Any]] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (raw or gzip-compressed, detected from its bytes) into a numpy array.

    Layout: two zero bytes, a type code, the number of dimensions ``d``, ``d`` big-endian uint32
    sizes, then the values in C order. A bad header or a size mismatch raises ValueError naming
    the file.
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise ValueError(
                f"{path}: corrupt or truncated gzip data ({e}); delete it and fetch it again"
            ) from e
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] not in _IDX_DTYPES:
        raise ValueError(
            f"{path} is not an IDX file (magic bytes {raw[:4].hex() or 'missing'}); "
            "delete it and fetch it again"
        )
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header; delete it and fetch it again")
    shape = tuple(int(n) for n in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(
            f"{path}: IDX shape {shape} needs {expected} bytes but the file holds {len(raw)} "
            "(truncated or corrupt); delete it and fetch it again"
        )
    values = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return values.astype(dtype.newbyteorder("="))  # a native-order, writable copy


def _idx_file(directory: Path, stem: str) -> Path | None:
    """``stem`` in ``directory``, uncompressed preferred (faster to read), else ``stem.gz``."""
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _fashion_mnist_dirs(root: Path | None) -> list[Path]:
    """Directories searched, in order; each also in torchvision's ``FashionMNIST/raw`` layout.

    An explicit ``root`` is the only place searched: the default store and the system copy stand
    in only when no root is given, so a wrong ``--data-root`` is never silently replaced.
    """
    bases = [root] if root is not None else [_default_root("fashion-mnist"), DEBIAN_FASHION_MNIST]
    return [d for base in bases for d in (base, base / "FashionMNIST" / "raw")]


def _first_idx_pair(directories: list[Path], stems: tuple[str, str]) -> tuple[Path, Path] | None:
    """The images and labels files from the first directory that holds both."""
    for directory in directories:
        images_file, labels_file = (_idx_file(directory, stem) for stem in stems)
        if images_file is not None and labels_file is not None:
            return images_file, labels_file
    return None


def _fashion_mnist(split: Split, root: str | Path | None, download: bool) -> TensorImages:
    prefix = "t10k" if split == "test" else "train"
    stems = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
    explicit = Path(root).expanduser() if root is not None else None
    searched = _fashion_mnist_dirs(explicit)
    found = _first_idx_pair(searched, stems)
    if found is None and download:
        _fetch("fashion-mnist", explicit or _default_root("fashion-mnist"))  # .gz, read as is
        found = _first_idx_pair(searched, stems)
    if found is not None:
        return _fashion_mnist_arrays(*found)
    if explicit is not None:
        raise _missing_from_root(explicit, stems)
    places = "\n  ".join(str(d) for d in searched)
    raise FileNotFoundError(
        f"Fashion-MNIST {prefix} files ({stems[0]}[.gz], {stems[1]}[.gz]) not found; looked in:\n"
        f"  {places}\n"
        "Get them with one of: `apt-get install dataset-fashion-mnist`; "
        "`--data-root DIR` (a directory holding the four IDX files); "
        "`--set data.download=true` (downloads them, SHA-256 checked)"
    )


def _missing_from_root(root: Path, stems: tuple[str, str]) -> FileNotFoundError:
    """The error for an explicit root without the files: which are missing, and the ways out."""
    if not root.is_dir():
        what = f"{root} does not exist" if not root.exists() else f"{root} is not a directory"
    else:
        missing = [
            f"{stem}[.gz]"
            for stem in stems
            if all(_idx_file(d, stem) is None for d in _fashion_mnist_dirs(root))
        ]
        apart = f"{root} holds {stems[0]} and {stems[1]} in different folders"
        what = f"{root} lacks {', '.join(missing)}" if missing else apart
    return FileNotFoundError(
        f"Fashion-MNIST: --data-root (data.root) {what} (looked in it and in its "
        "FashionMNIST/raw/). Point data.root at the folder that holds the IDX files; or leave it "
        f"unset to use the system copy ({DEBIAN_FASHION_MNIST}, `apt-get install "
        "dataset-fashion-mnist`) or the default store; or add `--set data.download=true` to "
        "download them into it (SHA-256 checked)"
    )


def _fashion_mnist_arrays(images_file: Path, labels_file: Path) -> TensorImages:
    images, labels = read_idx(images_file), read_idx(labels_file)
    if images.ndim != 3 or images.dtype != np.uint8 or labels.ndim != 1:
        raise ValueError(
            f"{images_file} / {labels_file}: expected uint8 images (N, H, W) and labels (N,), "
            f"got {images.dtype} {images.shape} and {labels.shape}"
        )
    if len(images) != len(labels) or (len(labels) and not 0 <= labels.min() <= labels.max() < 10):
        raise ValueError(
            f"{images_file} holds {len(images)} images but {labels_file} holds {len(labels)} "
            "labels (or labels outside 0..9); fetch both files again"
        )
    classes = list(tv_datasets.FashionMNIST.classes)
    return TensorImages(torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels), classes)


# ---------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 / STL-10 through torchvision

# name → (torchvision class, the folder it keeps its files in under root)
_TORCHVISION = {
    "cifar10": ("CIFAR10", "cifar-10-batches-py"),
    "cifar100": ("CIFAR100", "cifar-100-python"),
    "stl10": ("STL10", "stl10_binary"),
}


def _torchvision_dataset(
    name: str, split: Split, root: str | Path | None, download: bool
) -> TensorImages:
    """CIFAR-10/100 or STL-10 as in-memory uint8 (N, 3, H, W); STL-10 "unlabeled" is
    train+unlabeled with label −1 on the unlabelled images."""
    directory = Path(root).expanduser() if root is not None else _default_root(name)
    class_name, folder = _TORCHVISION[name]
    dataset_cls: Any = getattr(tv_datasets, class_name)
    if name == "stl10":
        kwargs: dict[str, Any] = {"split": "train+unlabeled" if split == "unlabeled" else split}
    else:
        kwargs = {"train": split != "test"}
    try:
        try:
            dataset = dataset_cls(str(directory), download=False, **kwargs)
        except RuntimeError:
            if not download:
                raise
            for archive in _fetch_archives(name, directory):
                extract_tar(archive, directory)  # not torchvision's extract_archive: no filter
            dataset = dataset_cls(str(directory), download=False, **kwargs)
    except RuntimeError as e:  # torchvision's "Dataset not found or corrupted"
        raise FileNotFoundError(
            f"{name} not found or incomplete in {directory / folder}; download it to "
            f"{directory} with `--set data.download=true`, or point `--data-root DIR` at the "
            f"directory holding {folder}/"
        ) from e
    if name == "stl10":
        images = torch.from_numpy(dataset.data)  # already (N, 3, 96, 96), possibly a strided view
        labels = torch.from_numpy(np.asarray(dataset.labels))
    else:
        images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2)  # (N, 32, 32, 3) → NCHW
        labels = torch.as_tensor(dataset.targets)
    classes = list(getattr(dataset, "classes", []))
    return TensorImages(images.contiguous(), labels, classes)


# ---------------------------------------------------------------------------------------------
# Image folders


class CorruptImageError(ValueError):
    """An image file PIL cannot decode; the message names the file, ``path`` holds it."""

    def __init__(self, message: str, path: str | Path = "") -> None:
        super().__init__(message)
        self.path = str(path)

    def __reduce__(self) -> tuple[type[CorruptImageError], tuple[str, str]]:
        # keeps ``path`` through pickling (DataLoader workers send errors to the main process)
        return type(self), (str(self), self.path)


# The way out of every CorruptImageError, in its message.
_SKIP_CORRUPT = (
    "remove the file, or pass --skip-corrupt (config data.skip_corrupt=true) to skip unreadable "
    "images"
)

# PIL's own conversion of 16-bit greyscale to 8 bits clips at 255 instead of scaling.
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def _deep_grey(image: Image.Image, path: str | Path) -> np.ndarray:
    """(H, W) uint8 of a 16-bit ("I;16…"), 32-bit int ("I") or float ("F") greyscale image.

    16-bit values are divided by 256. "I" (how older Pillow opens 16-bit PNGs) is read as 16-bit
    when its values lie in 0..65535 and exceed 255; "F" when they lie in [0, 1], times 255,
    rounded. Anything else has no single 8-bit reading (8-bit values stored wide, raw counts,
    floats in other units) and raises CorruptImageError naming the file and mode; PIL's own
    conversion would flatten it to all 0 or all 255.
    """
    values = np.asarray(image)
    if image.mode in _SIXTEEN_BIT_MODES:
        return (values.astype(np.int64) >> 8).astype(np.uint8)
    lo, hi = values.min().item(), values.max().item()
    if image.mode == "I" and lo >= 0 and 255 < hi <= 65535:
        return (values >> 8).astype(np.uint8)
    if image.mode == "F" and lo >= 0 and hi <= 1:  # False for NaN too
        return np.rint(values * 255).astype(np.uint8)
    kind = "32-bit float" if image.mode == "F" else "32-bit integer"
    raise CorruptImageError(
        f"image {path} has PIL mode {image.mode} ({kind}) with values {lo}..{hi}, which have "
        "no single 8-bit reading (barlow reads mode F in [0, 1] and mode I in 256..65535 as "
        f"16-bit); convert it to an 8-bit PNG, or {_SKIP_CORRUPT}",
        path,
    )


def _pixels(image: Image.Image, channels: int, path: str | Path) -> np.ndarray:
    """(H, W, channels) uint8 from any PIL mode (L, LA, P, RGBA, CMYK, I;16, F, …): 1 channel is
    ITU-R 601 luma (PIL's "L"), 3 is RGB; alpha is dropped. Deep greyscale: :func:`_deep_grey`."""
    if image.mode in (*_SIXTEEN_BIT_MODES, "I", "F"):
        return np.repeat(_deep_grey(image, path)[:, :, None], channels, axis=2)
    if image.mode in ("P", "PA") and "transparency" in image.info:
        # PIL warns when a palette with transparency goes to RGB directly.
        image = image.convert("RGBA")
    rgb = image.convert("RGB")
    if channels == 1:
        return np.array(rgb.convert("L"))[:, :, None]
    return np.array(rgb)


def read_image(path: str | Path, *, channels: int = 3) -> Tensor:
    """Decode an image file to a uint8 tensor (channels, H, W): 3 for RGB, 1 for greyscale.

    Raises CorruptImageError naming the file when it cannot be decoded, is truncated, exceeds
    PIL's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``, kept at PIL's default), is
    not a regular file (a FIFO would block the open forever; it is never opened), or is deep
    greyscale without a single 8-bit reading (:func:`_deep_grey`).
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (greyscale) or 3 (RGB), got {channels!r}")
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise CorruptImageError(
                f"{path} is not a regular file (a FIFO, socket or device): opening it could "
                f"block forever, so it is not read; {_SKIP_CORRUPT}",
                path,
            )
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                pixels = _pixels(image, channels, path)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise CorruptImageError(
            f"image {path} is larger than PIL.Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS} "
            f"pixels allows ({e}); it may be a decompression bomb. Remove it, skip it with "
            "--skip-corrupt (config data.skip_corrupt=true), or if you trust it raise that limit "
            "to a number (never None)",
            path,
        ) from e
    except CorruptImageError:
        raise
    # Any failure while decoding this one file is about this file (PIL plugins raise OSError,
    # SyntaxError, ValueError, struct.error, …); name it so the user can remove it.
    except Exception as e:
        raise CorruptImageError(
            f"cannot decode image {path} (corrupt or truncated?): {type(e).__name__}: {e}; "
            + _SKIP_CORRUPT,
            path,
        ) from e
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


class ImageFiles(Dataset[tuple[Tensor, int]]):
    """Image files decoded with PIL on access; ``samples`` holds (path, label), −1 unlabelled."""

    def __init__(
        self, root: Path, samples: list[tuple[str, int]], classes: list[str], channels: int = 3
    ) -> None:
        self.root, self.samples, self.classes = root, samples, classes
        self.channels = channels  # every image is converted to this many (1 or 3)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        path, label = self.samples[index]
        return read_image(path, channels=self.channels), label

    @property
    def labelled(self) -> bool:
        return bool(self.classes) and bool(self.samples)


def _is_image(filename: str) -> bool:
    return has_file_allowed_extension(filename, IMG_EXTENSIONS)


@dataclass
class _Skipped:
    """What listing an image folder left out; :func:`image_folder` reports it in one line."""

    links: int = 0  # folders already listed under another name (symlink loops, aliases)
    special: int = 0  # image-named entries that are not regular files: FIFO, device, broken link
    unreadable: int = 0  # folders that could not be listed


def _first_visit(path: str, seen: set[tuple[int, int]]) -> bool:
    """Whether the real folder behind ``path`` is new to ``seen`` (and add it)."""
    try:
        info = os.stat(path)
    except OSError:
        return False
    key = (info.st_dev, info.st_ino)
    if key in seen:
        return False
    seen.add(key)
    return True


def _scan(
    directory: str, skip_hidden: bool, seen: set[tuple[int, int]], skipped: _Skipped
) -> tuple[list[str], list[str]]:
    """(subfolders not seen before, regular image files) of one folder, each sorted by name."""
    try:
        with os.scandir(directory) as scan:
            entries = sorted(scan, key=lambda e: e.name)
    except OSError:
        skipped.unreadable += 1
        return [], []
    # is_dir and is_file follow symlinks; is_file is True only for regular files.
    folders = [e for e in entries if e.is_dir() and not (skip_hidden and e.name.startswith("."))]
    # Real folders claim their identity before links to them, so images keep their real names.
    new = {
        e.path for e in sorted(folders, key=lambda e: e.is_symlink()) if _first_visit(e.path, seen)
    }
    skipped.links += len(folders) - len(new)
    named = [e for e in entries if not e.is_dir() and _is_image(e.name)]
    files = [e.path for e in named if e.is_file()]
    skipped.special += len(named) - len(files)
    return [e.path for e in folders if e.path in new], files


def _walk_images(
    top: str | Path, skipped: _Skipped, *, skip_hidden: bool = False
) -> Iterator[tuple[str, list[str]]]:
    """(folder, its regular image files) for each real folder under ``top``, once, depth first in
    name order (as ``os.walk`` with sorted names). Symlinks are followed, but a folder already
    reached (a loop, or a second link to it) is skipped and counted in ``skipped``."""
    seen: set[tuple[int, int]] = set()
    _first_visit(str(top), seen)
    stack = [str(top)]
    while stack:
        directory = stack.pop()
        subdirs, files = _scan(directory, skip_hidden, seen, skipped)
        yield directory, files
        stack += reversed(subdirs)


def _contains_image(directory: str) -> bool:
    return any(files for _, files in _walk_images(directory, _Skipped()))


def _class_folders(directory: Path, skipped: _Skipped | None = None) -> list[str]:
    """Sorted class subfolders (non-hidden, holding images), or [] when images sit at the top.

    A link to the folder itself or to a folder above it is a loop, not a class: it is skipped
    (and counted in ``skipped``)."""
    with os.scandir(directory) as scan:
        entries = list(scan)
    if any(e.is_file() and _is_image(e.name) for e in entries):
        return []
    here = os.path.realpath(directory)
    folders = [e for e in entries if e.is_dir() and not e.name.startswith(".")]
    classes = [e for e in folders if not _is_within(here, os.path.realpath(e.path))]
    if skipped is not None:
        skipped.links += len(folders) - len(classes)
    return sorted(e.name for e in classes if _contains_image(e.path))


def _is_within(path: str, folder: str) -> bool:
    return os.path.commonpath([path, folder]) == folder


def _class_images(
    directory: Path, class_to_idx: dict[str, int], skipped: _Skipped
) -> list[tuple[str, int]]:
    """(path, class index) of every image under each class folder, ordered as torchvision's
    ``make_dataset`` orders them (classes sorted, then folders by path, files by name)."""
    samples: list[tuple[str, int]] = []
    for name in sorted(class_to_idx):
        for _, files in sorted(_walk_images(os.path.join(directory, name), skipped)):
            samples += [(path, class_to_idx[name]) for path in files]
    return samples


def _all_images(directory: Path, skipped: _Skipped) -> list[str]:
    """Every image under ``directory``, recursively, in sorted order, hidden folders skipped."""
    return [p for _, files in _walk_images(directory, skipped, skip_hidden=True) for p in files]


def _report_skipped(directory: Path, found: int, skipped: _Skipped) -> None:
    if skipped == _Skipped():
        return
    warnings.warn(
        f"image folder {directory}: found {found} images; skipped {skipped.links} link(s) to "
        f"folders already listed (symlink loops or aliases), {skipped.special} image-named "
        f"entry(ies) that are not regular files (FIFO, socket, device, broken link) and "
        f"{skipped.unreadable} unreadable folder(s)",
        RuntimeWarning,
        stacklevel=3,
    )


def _layout_hint(directory: Path) -> str:
    return (
        f"expected {directory}/<class>/*.jpg (labelled, one folder per class) or image files "
        f"anywhere under {directory} (unlabelled); extensions: {', '.join(IMG_EXTENSIONS)}"
    )


def image_folder(directory: str | Path, *, classes: list[str] | None = None) -> ImageFiles:
    """The images of a folder: labelled by class subfolders (sorted, as torchvision's
    ImageFolder) when it has them, else every image found recursively with label −1.

    ``classes`` fixes the class order (a test split reuses its train split's, so a class missing
    from one split does not shift the labels of the others).
    """
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise FileNotFoundError(f"image folder {directory} is missing; {_layout_hint(directory)}")
    skipped = _Skipped()
    found = _class_folders(directory, skipped)
    if found:
        classes = classes or found
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise ValueError(
                f"{directory} has class folders {unknown} that its train split lacks; "
                "give both splits the same classes"
            )
        class_to_idx = {c: i for i, c in enumerate(classes)}
        samples = _class_images(directory, {c: class_to_idx[c] for c in found}, skipped)
        dataset = ImageFiles(directory, samples, list(classes))
    else:
        dataset = ImageFiles(directory, [(p, -1) for p in _all_images(directory, skipped)], [])
    _report_skipped(directory, len(dataset), skipped)
    if not dataset.samples:
        raise FileNotFoundError(f"no images found in {directory}; {_layout_hint(directory)}")
    return dataset


def _folder_split(base: Path, split: Split) -> ImageFiles:
    """``base/train`` and ``base/val`` (or ``base/test``) when ``base/train`` exists, else
    ``base`` itself as the only (train) split."""
    train_dir = base / "train"
    if not train_dir.is_dir():
        if split == "test":
            raise FileNotFoundError(
                f"{base} has no train/ and val/ (or test/) folders, so it has no test split; "
                f"lay it out as {base}/train/<class>/*.jpg and {base}/val/<class>/*.jpg"
            )
        return image_folder(base)
    if split != "test":
        return image_folder(train_dir)
    test_dir = next((base / d for d in ("val", "test") if (base / d).is_dir()), None)
    if test_dir is None:
        raise FileNotFoundError(
            f"{base} has train/ but no val/ or test/ folder; add {base}/val/<class>/*.jpg"
        )
    return image_folder(test_dir, classes=_class_folders(train_dir) or None)


def _imagenet(split: Split, root: str | Path | None) -> ImageFiles:
    base = Path(root).expanduser() if root is not None else _default_root("imagenet")
    if not (base / "train").is_dir():
        raise FileNotFoundError(
            f"ImageNet not found: {base}/train does not exist; barlow cannot download ImageNet. "
            f"Get ILSVRC-2012 from image-net.org and pass `--data-root DIR` with "
            "DIR/train/<class>/*.JPEG and DIR/val/<class>/*.JPEG"
        )
    dataset = _folder_split(base, split)
    if not dataset.labelled:
        raise ValueError(
            f"ImageNet images in {dataset.root} are not in class folders; sort them into "
            f"{dataset.root}/<wnid>/*.JPEG (the official validation images come flat)"
        )
    return dataset


# ---------------------------------------------------------------------------------------------
# Public entry points


def build_dataset(
    name_or_path: str,
    *,
    split: Split = "train",
    root: str | Path | None = None,
    download: bool = False,
) -> Dataset[tuple[Tensor, int]]:
    """The ``split`` of a named dataset or of a directory of images.

    ``split="unlabeled"`` means "the images for pretraining": STL-10's train+unlabeled (labels −1
    on the 100 000 unlabelled images), the train split elsewhere. ``root`` is the directory holding
    the dataset's files (default ``$BARLOW_DATA/<name>`` or ``~/.cache/barlow/<name>``, then the
    system's Fashion-MNIST); a given root that lacks them is an error, never replaced by another
    copy. It is ignored when ``name_or_path`` is itself a directory. ``download`` lets barlow or
    torchvision fetch Fashion-MNIST, CIFAR and STL-10.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    name = dataset_info(name_or_path).name
    if name == "digits":
        return _digits(split)
    if name == "fashion-mnist":
        return _fashion_mnist(split, root, download)
    if name in _TORCHVISION:
        return _torchvision_dataset(name, split, root, download)
    if name == "imagenet":
        return _imagenet(split, root)
    if name_or_path == "folder":
        if root is None:
            raise ValueError("dataset 'folder' needs its directory: pass `--data-root DIR`")
        return _folder_split(Path(root).expanduser(), split)
    return _folder_split(Path(name_or_path).expanduser(), split)


def subset_images(dataset: Dataset[Any], indices: Tensor) -> Dataset[Any]:
    """The images at ``indices``; in memory stays in memory, so the batched views still apply."""
    if isinstance(dataset, TensorImages):
        return TensorImages(dataset.images[indices], dataset.labels[indices], dataset.classes)
    return Subset(dataset, indices.tolist())


def sampled_images(dataset: Dataset[Any], count: int) -> Dataset[Any]:
    """``count`` images of ``dataset`` drawn uniformly without replacement (a permutation seeded
    with 0, the chosen indices kept in dataset order): ``data.train_subset``. Not the first
    ``count``: an image folder lists its classes one after the other."""
    total = len(dataset)  # type: ignore[arg-type]
    if count > total:
        raise ValueError(
            f"data.train_subset={count} exceeds the {total} training images; lower it or drop it"
        )
    chosen = torch.randperm(total, generator=torch.Generator().manual_seed(0))[:count]
    return subset_images(dataset, torch.sort(chosen).values)


HOLDOUT_SEED = 20260101  # apart from train_subset's draw (seed 0), which takes from what is left


def holdout_indices(total: int, count: int) -> tuple[Tensor, Tensor]:
    """(kept, held out) indices of ``total`` training images, ``count`` held out: a draw seeded
    with ``HOLDOUT_SEED``, each part in dataset order (``data.holdout``)."""
    if not 0 < count < total:
        raise ValueError(
            f"data.holdout={count} must be at least 1 and less than the {total} training "
            "images; lower it"
        )
    order = torch.randperm(total, generator=torch.Generator().manual_seed(HOLDOUT_SEED))
    return torch.sort(order[count:]).values, torch.sort(order[:count]).values


def without_holdout(dataset: Dataset[Any], name: str, count: int) -> Dataset[Any]:
    """The pretraining images less the ``count`` held out of the labelled train split; refused
    where the pretraining split is not the train split (STL-10's adds unlabelled images)."""
    train_size = dataset_info(name).train_size
    total = len(dataset)  # type: ignore[arg-type]
    if train_size is not None and train_size != total:
        raise ValueError(
            f"data.holdout needs a dataset pretrained on its labelled train split; {name!r} "
            f"pretrains on {total} images, its train split has {train_size}: set data.holdout=0"
        )
    kept, _ = holdout_indices(total, count)
    return subset_images(dataset, kept)


def labelled(dataset: Dataset[Any]) -> bool:
    """Whether every image of a dataset built here has a label (≥ 0)."""
    return bool(getattr(dataset, "labelled", False))


def in_memory_images(dataset: Dataset[Any]) -> tuple[Tensor, Tensor] | None:
    """(uint8 images (N, C, H, W), int64 labels (N,)) of an in-memory dataset, else None."""
    if isinstance(dataset, TensorImages):
        return dataset.images, dataset.labels
    return None
