"""Embeddings of every image of a dataset, and each image's nearest neighbours among them.

``barlow embed CKPT --out emb.npy`` runs the checkpoint's backbone over the images exactly as the
kNN evaluation does (``assessment.EvalData.batches`` and ``EvalPreprocess``: resize and centre
crop to the run's crop size, normalise with the encoder's dataset's mean and std; ``evaluate.
extract_features``: eval mode, no gradients, float32) and writes, for N images and D features:

* ``emb.npy``: float32 (N, D), the backbone features ``h`` (not ℓ2-normalised), row i for image i;
  ``np.load("emb.npy", mmap_mode="r")`` reads it without loading it.
* ``emb.csv``: one row per image, in the same order, with the columns ``split`` (``train`` /
  ``test``), ``index`` (the image's position in that split, so ``data.build_dataset(name,
  split=split)[index]`` is the image), ``label`` (−1 when unlabelled), ``class`` (the label's class
  name, empty when unlabelled) and ``path`` (the absolute file path for image folders, empty for
  in-memory datasets).
* with ``--neighbours K``: ``emb.neighbours.npy`` int64 (N, K), the rows of ``emb.npy`` most
  cosine-similar to each row (itself excluded), most similar first, equal similarities in
  ascending row order; ``emb.neighbour_sims.npy`` float32 (N, K), their similarities
  ``ĥ_i · ĥ_j`` with ``ĥ = h / ‖h‖``. Neighbours are searched among all N rows (with
  ``--split all``, a test image's neighbours may be train or test images).

``--split all`` (the default) writes the train split, then the test split; a folder without
``train/`` has a single split, named ``train``. The dataset defaults to the run's own; another
one is seen as the encoder saw its own, as by ``barlow knn``: its channels (photos converted to
grey for a Fashion-MNIST encoder) and its normalisation.

Memory stays bounded: images stream through in batches (of ``eval.batch_size`` by default), each
written into a memory-mapped ``.npy``; neighbours are computed for ``block_rows`` query rows at a
time against the memory-mapped matrix, read in blocks, so besides what the dataset itself holds
in memory (an in-memory dataset such as Fashion-MNIST is a uint8 tensor; an image folder, its
list of paths), memory is one batch, the N labels, and the (block_rows × N) similarities
(``SIMILARITY_BUDGET_BYTES``, 128 MiB). Pages of the output files count as resident while the
system keeps them cached; it can drop them at any time.

Every file is written under a hidden temporary name in the output's directory and renamed when
complete, ``emb.npy`` last (after removing a previous ``emb.npy`` when overwriting): where
``emb.npy`` exists, its sidecars belong to it. A killed run leaves at most ``.emb.npy.*.tmp``
files behind.
"""

from __future__ import annotations

import csv
import io
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from barlow import data, evaluate
from barlow.assessment import EvalData, encoder_preprocess, load_pretrained
from barlow.augment import EvalPreprocess
from barlow.config import Config, apply_overrides, from_dict
from barlow.encoder import crop_size
from barlow.evaluate import PLAIN_PROGRESS_EVERY_S, top_k_lowest_index_on_ties
from barlow.logbook import Progress
from barlow.rundir import atomic_write
from barlow.training.setup import resolve_device

SPLIT_CHOICES = ("train", "test", "all")
SIMILARITY_BUDGET_BYTES = 128 * 2**20  # the (block_rows × N) similarities of one query block


@dataclass(frozen=True)
class EmbeddingFiles:
    """The files of one ``barlow embed`` output, named after ``embeddings`` (``emb.npy``)."""

    embeddings: Path
    table: Path
    neighbours: Path
    neighbour_sims: Path

    @classmethod
    def of(cls, out: str | Path) -> EmbeddingFiles:
        out = Path(out)
        if out.suffix != ".npy":
            raise ValueError(
                f"--out {out}: give a .npy file name, e.g. {out.with_suffix('.npy').name}; "
                "the features go there (np.load reads it) and the image table beside it (.csv)"
            )
        stem = out.with_suffix("")
        return cls(
            out,
            stem.with_suffix(".csv"),
            Path(f"{stem}.neighbours.npy"),
            Path(f"{stem}.neighbour_sims.npy"),
        )

    def all(self) -> tuple[Path, ...]:
        return (self.embeddings, self.table, self.neighbours, self.neighbour_sims)


@dataclass
class EmbedResult:
    """What ``embed`` wrote: N images of D features, and the neighbours' label agreement per
    query split (and ``"all"``) when every image is labelled."""

    files: EmbeddingFiles
    count: int
    dim: int
    seconds: float
    neighbours: int = 0
    agreement: dict[str, float] = field(default_factory=dict)


def embed(
    checkpoint: str | Path,
    out: str | Path,
    *,
    dataset: str | None = None,
    root: str | None = None,
    split: str = "all",
    batch_size: int | None = None,
    device: str = "auto",
    neighbours: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    block_rows: int | None = None,
    overrides: Sequence[str] = (),
) -> EmbedResult:
    """`barlow embed`: the backbone features of every image of ``split`` into ``out`` (``.npy``)
    with the image table beside it, and each image's ``neighbours`` nearest (0: none).

    ``dataset`` defaults to the run's own (at its ``data.root``); ``batch_size`` to the run's
    ``eval.batch_size``; ``block_rows`` (query rows per neighbour block) to what fits
    ``SIMILARITY_BUDGET_BYTES``; ``overrides`` (``--set``) change the checkpoint's config as for
    ``barlow knn`` (e.g. ``data.download=true``, ``data.num_workers=4``). The layout is in the
    module docstring.
    """
    files = _check_output(out, overwrite)
    _check_arguments(checkpoint, split, neighbours, batch_size)
    auto = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # as `barlow knn`
    torch_device = resolve_device(device, auto, setting="--device")
    method, cfg, _ = load_pretrained(checkpoint)
    if overrides:
        cfg = from_dict(apply_overrides(cfg.to_dict(), overrides))
    name = dataset or cfg.data.dataset
    datasets = _datasets(name, root if dataset else (root or cfg.data.root), split, cfg)
    count = sum(_size(d) for d in datasets.values())
    if neighbours >= count:
        raise ValueError(
            f"--neighbours {neighbours} needs more than {neighbours} images, but {name} "
            f"({split}) has {count}; choose K <= {count - 1}"
        )
    preprocess = encoder_preprocess(cfg.data.dataset, crop_size(cfg))
    backbone = method.backbone.to(torch_device)
    dim = int(backbone.num_features)  # type: ignore[arg-type]
    batch_size = batch_size or cfg.eval.batch_size
    start = time.perf_counter()
    result = EmbedResult(files, count, dim, 0.0, neighbours)

    def write_all(file: IO[bytes]) -> None:
        # The temporary emb.npy, renamed by atomic_write after everything else is in place.
        matrix = np.lib.format.open_memmap(
            file.name, mode="w+", dtype=np.float32, shape=(count, dim)
        )
        labels = np.empty(count, dtype=np.int64)
        _embed_into(
            matrix,
            labels,
            backbone,
            # EvalData.build refuses unlabelled data, which embeddings take: each split goes in
            # one of its own, for the kNN evaluation's loading (EvalData.batches)
            [
                EvalData(d, d, preprocess, preprocess.crop_size, 0, cfg.data.num_workers)
                for d in datasets.values()
            ],
            device=torch_device,
            batch_size=batch_size,
            progress=Progress(enabled=progress),
        )
        matrix.flush()
        for path in files.all():  # after this, no emb.npy until the new set is complete
            path.unlink(missing_ok=True)
        if neighbours:
            result.agreement = _write_neighbours(
                matrix, labels, datasets, files, neighbours, torch_device, block_rows, progress
            )
        atomic_write(files.table, lambda f: _write_table(f, datasets, labels))

    atomic_write(files.embeddings, write_all)
    result.seconds = time.perf_counter() - start
    return result


def _check_arguments(
    checkpoint: str | Path, split: str, neighbours: int, batch_size: int | None
) -> None:
    if split not in SPLIT_CHOICES:
        raise ValueError(f"split must be one of {', '.join(SPLIT_CHOICES)}, got {split!r}")
    if neighbours < 0:
        raise ValueError(f"--neighbours must be >= 0 (0: none), got {neighbours}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    if not Path(checkpoint).is_file():
        raise FileNotFoundError(
            f"checkpoint {checkpoint} does not exist; give the checkpoint.pt of a "
            "`barlow pretrain` run directory"
        )


def _datasets(
    name: str, root: str | None, split: str, cfg: Config
) -> dict[str, Dataset[tuple[Tensor, int]]]:
    """The dataset of each split to embed, in order (``all``: train, then test)."""
    return {
        s: data.build_dataset(
            name, split=cast(data.Split, s), root=root, download=cfg.data.download
        )
        for s in _splits(name, root, split)
    }


def _check_output(out: str | Path, overwrite: bool) -> EmbeddingFiles:
    files = EmbeddingFiles.of(out)
    directory = files.embeddings.parent
    if not directory.is_dir():
        raise FileNotFoundError(
            f"--out {out}: directory {directory} does not exist; create it (mkdir -p "
            f"{directory}) or write elsewhere"
        )
    if files.embeddings.is_dir():
        raise ValueError(f"--out {out} is a directory; give a file name ending in .npy")
    existing = [str(p) for p in files.all() if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{', '.join(existing)} already exist; pass --overwrite to replace them, or choose "
            "another --out"
        )
    return files


def _size(dataset: Dataset[tuple[Tensor, int]]) -> int:
    return len(dataset)  # type: ignore[arg-type]


def _splits(name: str, root: str | None, split: str) -> tuple[str, ...]:
    if split != "all":
        return (split,)
    if data.dataset_info(name).name == "folder":
        base = Path(root if name == "folder" and root else name).expanduser()
        if not (base / "train").is_dir():  # images without train/ and val/: one split
            return ("train",)
    return ("train", "test")


# ---------------------------------------------------------------------------------------------
# Features


def _embed_into(
    matrix: np.ndarray,
    labels: np.ndarray,
    backbone: nn.Module,
    sources: list[EvalData],
    *,
    device: torch.device,
    batch_size: int,
    progress: Progress,
) -> None:
    """Fill ``matrix`` (N, D) and ``labels`` (N,) batch by batch, splits in order."""
    count, dim = matrix.shape
    batches = sum(math.ceil(_size(s.train) / batch_size) for s in sources)

    def stream() -> Iterator[tuple[Tensor, Tensor, EvalPreprocess]]:
        for source in sources:
            for images, y in source.batches("train", batch_size):
                yield images, y, source.preprocess

    row, start, last = 0, time.perf_counter(), -math.inf
    for step, (images, y, preprocess) in enumerate(
        progress.wrap(stream(), total=batches, description="embedding"), start=1
    ):
        # The kNN evaluation's own extraction, one batch at a time (it keeps what it returns).
        h = evaluate.extract_features(
            backbone, [(images, y)], device=device, preprocess=preprocess
        ).features
        if h.shape[1] != dim or not torch.isfinite(h).all():
            problem = f"{h.shape[1]} features, not {dim}" if h.shape[1] != dim else "NaN or Inf"
            raise ValueError(
                f"the encoder gave {problem} for images {row}..{row + len(h) - 1}; "
                "check the checkpoint (a diverged run) and the dataset"
            )
        matrix[row : row + len(h)] = h.numpy()
        labels[row : row + len(h)] = y.numpy()
        row += len(h)
        now = time.perf_counter()
        if progress.interactive or now - last >= PLAIN_PROGRESS_EVERY_S or step == batches:
            last = now
            rate = row / max(now - start, 1e-9)
            fields = {"images/s": rate, "eta": f"{(count - row) / rate:.0f}s"}
            progress.update(step, batches, "embedding", fields)
    if row != count:
        raise ValueError(f"the dataset yielded {row} images, expected {count}")


def _write_table(
    file: IO[bytes], datasets: dict[str, Dataset[tuple[Tensor, int]]], labels: np.ndarray
) -> None:
    text = io.TextIOWrapper(file, encoding="utf-8", newline="")
    writer = csv.writer(text)
    writer.writerow(["split", "index", "label", "class", "path"])
    row = 0
    for split, dataset in datasets.items():
        samples = getattr(dataset, "samples", None)
        classes = list(getattr(dataset, "classes", None) or [])
        for index in range(_size(dataset)):
            label = int(labels[row])
            name = classes[label] if 0 <= label < len(classes) else ""
            path = os.path.abspath(samples[index][0]) if samples is not None else ""
            writer.writerow([split, index, label, name, path])
            row += 1
    text.flush()
    text.detach()  # atomic_write closes the file itself


# ---------------------------------------------------------------------------------------------
# Neighbours


def nearest_neighbours(
    embeddings: np.ndarray,
    k: int,
    *,
    index_out: np.ndarray | None = None,
    similarity_out: np.ndarray | None = None,
    device: torch.device | str = "cpu",
    block_rows: int | None = None,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Each row's ``k`` most cosine-similar other rows of ``embeddings`` (N, D).

    ``s_ij = ĥ_i · ĥ_j`` with ``ĥ = h / max(‖h‖, 1e-12)``, as the kNN evaluation. Returns the
    indices (N, k) int64 and similarities (N, k) float32, most similar first; the row itself is
    never its own neighbour; equal similarities go in ascending row order, and at the k-th place
    the lower row wins. ``embeddings`` may be a memory map: it is read in blocks, and ``block_rows``
    query rows at a time are compared with all N, so memory is (block_rows × N) similarities plus
    one block of rows. ``index_out`` / ``similarity_out`` (e.g. memory maps) receive the result.
    """
    count, dim = embeddings.shape
    if not 1 <= k < count:
        raise ValueError(f"k must be in 1..{count - 1} (N - 1, the row itself excluded), got {k}")
    device = torch.device(device)
    block_rows = block_rows or max(1, SIMILARITY_BUDGET_BYTES // (4 * count))
    if block_rows < 1:
        raise ValueError(f"block_rows must be >= 1, got {block_rows}")
    key_rows = max(1, SIMILARITY_BUDGET_BYTES // (4 * max(dim, 1)))
    if index_out is None:
        index_out = np.empty((count, k), dtype=np.int64)
    if similarity_out is None:
        similarity_out = np.empty((count, k), dtype=np.float32)
    starts = range(0, count, block_rows)
    bar = Progress(enabled=progress)
    began, last = time.perf_counter(), -math.inf
    for step, start in enumerate(
        bar.wrap(starts, total=len(starts), description="neighbours"), start=1
    ):
        stop = min(start + block_rows, count)
        queries = _unit_rows(embeddings, start, stop, device)
        similarity = torch.empty(stop - start, count, device=device)
        for key_start in range(0, count, key_rows):
            key_stop = min(key_start + key_rows, count)
            keys = _unit_rows(embeddings, key_start, key_stop, device)
            torch.mm(queries, keys.T, out=similarity[:, key_start:key_stop])
        rows = torch.arange(stop - start, device=device)
        similarity[rows, rows + start] = -math.inf
        values, index = top_k_lowest_index_on_ties(similarity, k)
        # A deterministic order among equal similarities: ascending row (stable sorts).
        order = index.sort(dim=1, stable=True).indices
        index, values = index.gather(1, order), values.gather(1, order)
        order = values.sort(dim=1, descending=True, stable=True).indices
        index_out[start:stop] = index.gather(1, order).cpu().numpy()
        similarity_out[start:stop] = values.gather(1, order).cpu().numpy()
        now = time.perf_counter()
        plain_due = now - last >= PLAIN_PROGRESS_EVERY_S or stop == count
        if progress and (bar.interactive or plain_due):
            last = now
            rate = stop / max(now - began, 1e-9)
            eta = f"{(count - stop) / rate:.0f}s"
            bar.update(step, len(starts), "neighbours", {"images/s": rate, "eta": eta})
    return index_out, similarity_out


def _unit_rows(matrix: np.ndarray, start: int, stop: int, device: torch.device) -> Tensor:
    rows = torch.from_numpy(np.array(matrix[start:stop], dtype=np.float32))  # a writable copy
    return F.normalize(rows.to(device), dim=1)


def neighbour_agreement(index: np.ndarray, labels: np.ndarray, rows: int = 65536) -> np.ndarray:
    """Per query row, the fraction of its neighbours (``index`` (N, K)) that share its label."""
    agreement = np.empty(len(index), dtype=np.float64)
    for start in range(0, len(index), rows):
        block = np.asarray(index[start : start + rows])
        same = labels[block] == labels[start : start + rows, None]
        agreement[start : start + rows] = same.mean(axis=1)
    return agreement


def _write_neighbours(
    matrix: np.ndarray,
    labels: np.ndarray,
    datasets: dict[str, Dataset[tuple[Tensor, int]]],
    files: EmbeddingFiles,
    k: int,
    device: torch.device,
    block_rows: int | None,
    progress: bool,
) -> dict[str, float]:
    """Write the neighbour files (each renamed when both are complete); the label agreement per
    query split, and over all rows, when every image is labelled."""
    count = len(matrix)
    agreement: dict[str, float] = {}

    def write_both(index_file: IO[bytes], sims_file: IO[bytes]) -> None:
        index = np.lib.format.open_memmap(
            index_file.name, mode="w+", dtype=np.int64, shape=(count, k)
        )
        sims = np.lib.format.open_memmap(
            sims_file.name, mode="w+", dtype=np.float32, shape=(count, k)
        )
        nearest_neighbours(
            matrix,
            k,
            index_out=index,
            similarity_out=sims,
            device=device,
            block_rows=block_rows,
            progress=progress,
        )
        index.flush()
        sims.flush()
        if (labels >= 0).all():
            per_row = neighbour_agreement(index, labels)
            row = 0
            for split, dataset in datasets.items():
                n = _size(dataset)
                agreement[split] = float(per_row[row : row + n].mean())
                row += n
            agreement["all"] = float(per_row.mean())

    atomic_write(
        files.neighbours,
        lambda index_file: atomic_write(
            files.neighbour_sims, lambda sims_file: write_both(index_file, sims_file)
        ),
    )
    return agreement
