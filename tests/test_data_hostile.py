"""Image folders that fight back: symlink loops, FIFOs and devices named like images.

Each listing that could hang or grow without bound runs in a forked child killed after
:data:`HANG`, so a regression fails the test instead of stalling the suite.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from barlow import data

HANG = 60.0  # seconds: a guard against hangs, far above the fraction of a second a listing takes


def in_child(fn: Callable[[], Any]) -> Any:
    """``fn()`` in a forked process; fails the test when it has not returned within HANG s."""
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)

    def target() -> None:
        try:
            send.send(("ok", fn()))
        except BaseException as e:
            send.send(("error", e))

    child = context.Process(target=target, daemon=True)
    child.start()
    if not receive.poll(HANG):
        child.kill()
        child.join()
        pytest.fail(f"still running after {HANG:.0f} s (hung, or listing without end)")
    kind, value = receive.recv()
    child.join()
    if kind == "error":
        raise value
    return value


def listing(directory: Path) -> tuple[list[tuple[str, int]], list[str]]:
    """The samples of ``image_folder(directory)`` relative to it, and the warnings it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = data.image_folder(directory)
    samples = [(os.path.relpath(p, directory), label) for p, label in dataset.samples]
    return samples, [str(w.message) for w in caught]


def save_png(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((4, 5, 3), 7, np.uint8)).save(path)
    return path


# ---------------------------------------------------------------------------------------------
# symlink loops


def test_one_symlink_loop_lists_each_image_once(tmp_path: Path) -> None:
    for name in ("a.png", "b.png", "sub/c.png"):
        save_png(tmp_path / name)
    (tmp_path / "sub" / "up").symlink_to("..")  # a subfolder linking to its parent
    samples, notes = in_child(lambda: listing(tmp_path))
    assert samples == [("a.png", -1), ("b.png", -1), ("sub/c.png", -1)]
    assert len(notes) == 1 and re.search(r"found 3 images; skipped 1 link", notes[0]), notes


def test_two_symlink_loops_list_each_image_once(tmp_path: Path) -> None:
    for name in ("a.png", "sub/b.png", "sub/deeper/c.png"):
        save_png(tmp_path / name)
    (tmp_path / "sub" / "up").symlink_to("..")
    (tmp_path / "sub" / "deeper" / "top").symlink_to("../..")
    samples, notes = in_child(lambda: listing(tmp_path))
    assert samples == [("a.png", -1), ("sub/b.png", -1), ("sub/deeper/c.png", -1)]
    assert len(notes) == 1 and re.search(r"found 3 images; skipped 2 link", notes[0]), notes


def test_symlink_loops_inside_class_folders(tmp_path: Path) -> None:
    for name in ("cat/a.png", "cat/deep/b.png", "dog/c.png"):
        save_png(tmp_path / name)
    (tmp_path / "cat" / "deep" / "up").symlink_to("..")
    (tmp_path / "cat" / "deep" / "again").symlink_to("..")
    (tmp_path / "dog" / "self").symlink_to(".")
    samples, notes = in_child(lambda: listing(tmp_path))
    assert samples == [("cat/a.png", 0), ("cat/deep/b.png", 0), ("dog/c.png", 1)]
    assert len(notes) == 1 and re.search(r"found 3 images; skipped 3 link", notes[0]), notes


def test_a_class_folder_linking_to_the_folder_or_above_is_no_class(tmp_path: Path) -> None:
    save_png(tmp_path / "imgs" / "cat" / "a.png")
    save_png(tmp_path / "imgs" / "dog" / "b.png")
    (tmp_path / "imgs" / "loop").symlink_to(".")
    (tmp_path / "imgs" / "up").symlink_to("..")
    samples, notes = in_child(lambda: listing(tmp_path / "imgs"))
    assert samples == [("cat/a.png", 0), ("dog/b.png", 1)]
    assert len(notes) == 1 and re.search(r"found 2 images; skipped 2 link", notes[0]), notes


def test_a_folder_behind_two_names_is_listed_once_under_its_real_name(tmp_path: Path) -> None:
    save_png(tmp_path / "top.png")  # an image at the top: unlabelled, searched recursively
    save_png(tmp_path / "real" / "x.png")
    (tmp_path / "alias").symlink_to("real")  # sorts first, yet the real folder names the images
    samples, notes = listing(tmp_path)
    assert samples == [("top.png", -1), ("real/x.png", -1)] and "skipped 1 link" in notes[0]


def test_a_plain_folder_lists_silently(tmp_path: Path) -> None:
    save_png(tmp_path / "top.png")
    save_png(tmp_path / "a" / "x.png")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x.png").symlink_to(tmp_path / "a" / "x.png")  # a file link is an image
    samples, notes = listing(tmp_path)
    assert samples == [("top.png", -1), ("a/x.png", -1), ("b/x.png", -1)] and notes == []


def test_class_folders_keep_torchvisions_order(tmp_path: Path) -> None:
    """Without links the samples and their order are make_dataset's, so runs stay comparable."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

    for name in ("b/x.png", "b/b c/y.png", "b/b/z.jpg", "b/b-c/w.png", "b/.h/v.png", "a/A.PNG"):
        save_png(tmp_path / name)
    expected = make_dataset(str(tmp_path), {"a": 0, "b": 1}, extensions=IMG_EXTENSIONS)
    assert data.image_folder(tmp_path).samples == expected


# ---------------------------------------------------------------------------------------------
# FIFOs, devices and broken links named like images


def make_special(path: Path, kind: str) -> Path:
    if kind == "fifo":
        os.mkfifo(path)  # opening it for reading blocks until a writer comes: forever
    elif kind == "device":
        path.symlink_to("/dev/zero")  # endless bytes
    else:
        path.symlink_to(path.parent / "missing.png")
    return path


@pytest.mark.parametrize("kind", ["fifo", "device", "broken link"])
def test_non_regular_files_are_skipped_when_listing(tmp_path: Path, kind: str) -> None:
    save_png(tmp_path / "a.png")
    save_png(tmp_path / "sub" / "b.png")
    make_special(tmp_path / "x.png", kind)
    make_special(tmp_path / "sub" / "y.jpg", kind)
    samples, notes = in_child(lambda: listing(tmp_path))
    assert samples == [("a.png", -1), ("sub/b.png", -1)]
    assert len(notes) == 1 and re.search(
        r"found 2 images; skipped 0 link.*, 2 image-named", notes[0]
    ), notes


def test_a_fifo_in_a_class_folder_is_skipped(tmp_path: Path) -> None:
    save_png(tmp_path / "cat" / "a.png")
    save_png(tmp_path / "dog" / "b.png")
    make_special(tmp_path / "cat" / "x.png", "fifo")
    samples, _ = in_child(lambda: listing(tmp_path))
    assert samples == [("cat/a.png", 0), ("dog/b.png", 1)]


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_read_image_refuses_a_non_regular_file_without_opening_it(
    tmp_path: Path, kind: str
) -> None:
    path = make_special(tmp_path / "x.png", kind)
    with pytest.raises(data.CorruptImageError, match="not a regular file") as caught:
        in_child(lambda: data.read_image(path))
    assert str(path) in str(caught.value) and caught.value.path == str(path)
    assert "--skip-corrupt" in str(caught.value)
