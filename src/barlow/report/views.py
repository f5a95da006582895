"""The training views of a recipe as a grid: each row an original image and the views the run
draws of it (``barlow views``, and the report's "views" section).

The views come from the training code itself: ``training.setup.pretraining_data`` picks the
recipe and the dataset exactly as ``barlow pretrain`` does, and the views are drawn by the path
the run uses (``data.augment_on``): ``augment.MultiView`` per sample, or
``batched_views.BatchedMultiView`` for a whole batch on the device.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from barlow.augment import MultiView, ViewSpec
from barlow.batched_views import BatchedMultiView
from barlow.config import Config
from barlow.report.tiles import cell_size, png_bytes, tile_grid, to_hwc_uint8
from barlow.rundir import atomic_write


@dataclass(frozen=True)
class ViewsGrid:
    """The grid and what it shows."""

    image: Image.Image
    recipe: str
    dataset: str
    rows: int
    views: int


def views_grid(cfg: Config, *, images: int = 8, seed: int = 0) -> ViewsGrid:
    """``images`` training images (chosen with ``seed``) and one view per spec of each."""
    from barlow.training.setup import pretraining_data

    if images < 1:
        raise ValueError(f"--images must be >= 1, got {images}")
    source = pretraining_data(cfg, torch.device("cpu"))
    dataset = source.dataset
    count = len(dataset)
    if count == 0:
        raise ValueError(f"dataset {cfg.data.dataset!r} has no images")
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(count, generator=generator)[: min(images, count)].tolist()
    originals = [dataset[i][0] for i in chosen]
    views = draw_views(originals, source.specs, seed=seed, batched=cfg.data.augment_on == "device")
    rows = [
        [to_hwc_uint8(original.numpy())] + [to_hwc_uint8(v[i]) for v in views]
        for i, original in enumerate(originals)
    ]
    titles = ["original"] + [f"view {k + 1}" for k in range(len(views))]
    grid = tile_grid(rows, titles, cell_size(source.specs[0].crop_size))
    return ViewsGrid(grid, source.recipe, cfg.data.dataset, len(rows), len(views))


def draw_views(
    originals: Sequence[Tensor], specs: Sequence[ViewSpec], *, seed: int, batched: bool
) -> list[np.ndarray]:
    """Per spec, the views of ``originals`` (uint8 (C, H, W) each) as uint8 (N, C, s, s)."""
    if batched:
        generator = torch.Generator().manual_seed(seed)
        drawn = BatchedMultiView(specs)(torch.stack(list(originals)), generator)
    else:
        # torchvision's transforms draw from the global generator: seed it, then put it back
        saved = torch.default_generator.get_state()
        torch.default_generator.manual_seed(seed)
        try:
            multi = MultiView(specs)
            per_image = [multi(image) for image in originals]
        finally:
            torch.default_generator.set_state(saved)
        drawn = tuple(torch.stack([views[k] for views in per_image]) for k in range(len(specs)))
    return [_pixels(view, spec) for view, spec in zip(drawn, specs, strict=True)]


def _pixels(view: Tensor, spec: ViewSpec) -> np.ndarray:
    """A normalised float view batch back to uint8 pixels."""
    mean = torch.tensor(spec.mean).view(1, -1, 1, 1)
    std = torch.tensor(spec.std).view(1, -1, 1, 1)
    x = (view.float().cpu() * std + mean).clamp(0.0, 1.0)
    return (x * 255.0).round().to(torch.uint8).numpy()


def check_output_file(out: str | Path, *, suffix: str) -> Path:
    """``--out`` as a file that can be written: not a directory, in an existing writable folder.
    Checked before any slow work."""
    path = Path(out)
    if path.is_dir():
        raise ValueError(f"--out {out} is a directory; give a file name ending in {suffix}")
    folder = path.parent
    if not folder.is_dir():
        raise FileNotFoundError(
            f"--out {out}: folder {folder} does not exist; create it (mkdir -p {folder}) or "
            "write elsewhere"
        )
    try:  # a real write: access() passes root on read-only folders it may not write in
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise ValueError(
            f"--out {out}: folder {folder} is not writable ({error.strerror}); write elsewhere"
        ) from None
    if path.suffix.lower() != suffix:
        raise ValueError(f"--out {out} should end in {suffix}")
    return path


def write_views(
    recipe: str,
    out: str | Path,
    *,
    images: int = 8,
    seed: int = 0,
    overrides: Sequence[str] = (),
) -> ViewsGrid:
    """``barlow views``: the grid of ``recipe`` (a shipped name or a TOML path, with ``--set``
    ``overrides``) as a PNG at ``out``, written atomically."""
    from barlow.config import load_config

    path = check_output_file(out, suffix=".png")
    grid = views_grid(load_config(recipe, overrides), images=images, seed=seed)
    data = png_bytes(grid.image)
    atomic_write(path, lambda file: file.write(data))
    return grid
