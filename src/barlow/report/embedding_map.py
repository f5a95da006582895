"""The report's view of the representations: a 2-D map of the test split coloured by class and
a grid of nearest training images of a few test images, computed at report time from the run's
weights (``backbone.safetensors``, else ``checkpoint.pt``).

Features are extracted exactly as by the kNN evaluation (``assessment.EvalData``: the run's
dataset and crop size, ``evaluate.extract_features``). The map is UMAP where umap-learn is
installed (``pip install barlow[report]``), else t-SNE from scikit-learn, of at most
``max_points`` test images after a PCA to 50 dimensions; neighbours are by cosine similarity
among at most ``max_bank`` training images. Every subsample is drawn with a fixed seed.
"""

from __future__ import annotations

import importlib.util
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from barlow import evaluate
from barlow.assessment import EvalData, load_pretrained
from barlow.config import Config
from barlow.logbook import console
from barlow.report.tiles import cell_size, tile_grid, to_hwc_uint8
from barlow.rundir import BACKBONE_NAME, CHECKPOINT_NAME

PCA_DIMS = 50  # t-SNE and UMAP work on the leading principal components (as sklearn advises)
SAME_CLASS, OTHER_CLASS = "#1a9850", "#d73027"  # neighbour frames: label agrees / differs


@dataclass
class EmbeddingMap:
    """A 2-D map of test representations and a nearest-neighbour grid."""

    points: np.ndarray  # (N, 2)
    labels: np.ndarray  # (N,)
    classes: list[str]
    method: str  # "UMAP", "t-SNE" or "PCA" (too few points for the others)
    neighbours: Image.Image
    weights: str  # the file the encoder came from
    test_images: int
    bank_images: int
    seconds: float


def load_backbone(run: Path, cfg: Config) -> tuple[nn.Module, str]:
    """The run's pretrained backbone: ``backbone.safetensors`` (written when training ends),
    else the latest ``checkpoint.pt`` (a run in progress)."""
    from barlow.checkpoint import load_backbone_weights, load_exported_backbone
    from barlow.encoder import build_method

    if (run / BACKBONE_NAME).is_file():
        backbone = build_method(cfg).backbone
        load_backbone_weights(backbone, load_exported_backbone(run / BACKBONE_NAME))
        return backbone, BACKBONE_NAME
    if (run / CHECKPOINT_NAME).is_file():
        method, _, _ = load_pretrained(run / CHECKPOINT_NAME)
        return method.backbone, CHECKPOINT_NAME
    raise FileNotFoundError(
        f"{run} has neither {BACKBONE_NAME} nor {CHECKPOINT_NAME}; the map needs the run's weights"
    )


def _subsample(count: int, limit: int, seed: int) -> Tensor | None:
    """Sorted indices of ``limit`` of ``count`` items drawn with ``seed`` (None: all)."""
    if count <= limit:
        return None
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(count, generator=generator)[:limit].sort().values


def embedding_map(
    run: Path,
    cfg: Config,
    *,
    max_points: int = 3000,
    max_bank: int = 20000,
    queries: int = 6,
    k: int = 8,
    seed: int = 0,
    progress: bool = True,
) -> EmbeddingMap:
    """Extract features of (subsamples of) the test and train splits, map the test ones to 2-D
    and find the nearest training images of ``queries`` test images."""
    start = time.perf_counter()
    eval_data = EvalData.from_config(cfg)
    backbone, weights = load_backbone(run, cfg)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backbone = backbone.to(device)
    test_index = _subsample(len(eval_data.test), max_points, seed)  # type: ignore[arg-type]
    bank_index = _subsample(len(eval_data.train), max_bank, seed + 1)  # type: ignore[arg-type]

    def features(split: str, index: Tensor | None) -> evaluate.Features:
        return eval_data.features(
            backbone,
            split,
            device=device,
            batch_size=cfg.eval.batch_size,
            progress=progress,
            indices=index,
        )

    if progress:
        console(f"report: features of {cfg.data.dataset} ({weights}, {device.type})")
    test, bank = features("test", test_index), features("train", bank_index)
    points, method = project_2d(test.features.numpy(), seed=seed, progress=progress)
    grid = neighbour_grid(eval_data, test, bank, test_index, bank_index, queries, k, seed)
    classes = list(getattr(eval_data.test, "classes", None) or [])
    if len(classes) < int(test.labels.max()) + 1:
        classes = [str(c) for c in range(int(test.labels.max()) + 1)]
    return EmbeddingMap(
        points,
        test.labels.numpy(),
        classes,
        method,
        grid,
        weights,
        len(test),
        len(bank),
        time.perf_counter() - start,
    )


def project_2d(features: np.ndarray, *, seed: int, progress: bool) -> tuple[np.ndarray, str]:
    """(N, D) features → (N, 2) points, and the name of the method used."""
    from sklearn.decomposition import PCA

    n = len(features)
    x = features.astype(np.float64)
    x = x - x.mean(axis=0)
    if n < 10:  # t-SNE's perplexity needs more points than this
        return _pad_2d(PCA(n_components=min(2, n, x.shape[1])).fit_transform(x)), "PCA"
    if x.shape[1] > PCA_DIMS:
        x = PCA(n_components=min(PCA_DIMS, n), random_state=seed).fit_transform(x)
    start = time.perf_counter()
    if importlib.util.find_spec("umap") is not None:
        import umap

        method = "UMAP"
        if progress:
            console(f"report: UMAP of {n} test representations")
        points = umap.UMAP(n_components=2, random_state=seed).fit_transform(x)
    else:
        from sklearn.manifold import TSNE

        method = "t-SNE"
        if progress:
            console(f"report: t-SNE of {n} test representations (umap-learn is not installed)")
        perplexity = min(30.0, (n - 1) / 3)
        points = TSNE(
            n_components=2, init="pca", perplexity=perplexity, random_state=seed
        ).fit_transform(x)
    if progress:
        console(f"report: {method} done in {time.perf_counter() - start:.1f} s")
    return np.asarray(points, dtype=np.float32), method


def _pad_2d(points: np.ndarray) -> np.ndarray:
    out = np.zeros((len(points), 2), dtype=np.float32)
    out[:, : points.shape[1]] = points
    return out


def neighbour_grid(
    eval_data: EvalData,
    test: evaluate.Features,
    bank: evaluate.Features,
    test_index: Tensor | None,
    bank_index: Tensor | None,
    queries: int,
    k: int,
    seed: int,
) -> Image.Image:
    """Rows of a test image and its ``k`` most cosine-similar training images, framed green
    where the label agrees and red where it differs."""
    k = min(k, len(bank))
    generator = torch.Generator().manual_seed(seed + 2)
    rows_at = torch.randperm(len(test), generator=generator)[: min(queries, len(test))]
    similarity = F.normalize(test.features[rows_at], dim=1) @ F.normalize(bank.features, dim=1).T
    nearest = similarity.topk(k, dim=1).indices
    rows, borders = [], []
    for query, found in zip(rows_at.tolist(), nearest.tolist(), strict=True):
        label = int(test.labels[query])
        images = [_image(eval_data.test, query, test_index)]
        images += [_image(eval_data.train, j, bank_index) for j in found]
        rows.append(images)
        agree = [SAME_CLASS if int(bank.labels[j]) == label else OTHER_CLASS for j in found]
        borders.append([None, *agree])
    titles = ["query"] + [str(i + 1) for i in range(k)]
    return tile_grid(rows, titles, cell_size(eval_data.crop_size), borders)


def _image(dataset: object, row: int, index: Tensor | None) -> np.ndarray:
    position = int(index[row]) if index is not None else row
    image, _ = dataset[position]  # type: ignore[index]
    return to_hwc_uint8(torch.as_tensor(image).numpy())
