"""`barlow embed`: the kNN evaluation's features of every image, in files numpy reads, and each
image's nearest neighbours; streamed in chunks, written atomically, refusing bad input."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from barlow import embed, evaluate
from barlow.assessment import EvalData, load_pretrained
from barlow.cli import main
from barlow.config import load_config
from barlow.embed import EmbeddingFiles, nearest_neighbours
from barlow.training import CHECKPOINT_NAME, pretrain
from runs import FAST

K = 5


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two steps of pretraining on digits: weights off their initialisation, in seconds."""
    run = tmp_path_factory.mktemp("run")
    pretrain(load_config("digits", [*FAST, "train.max_steps=2"]), run, progress=False)
    return run / CHECKPOINT_NAME


@pytest.fixture(scope="module")
def digits(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> EmbeddingFiles:
    """Both splits of digits with K neighbours, through the command line."""
    out = tmp_path_factory.mktemp("embed") / "emb.npy"
    args = ["embed", str(checkpoint), "--out", str(out), "--neighbours", str(K), "--quiet"]
    assert main(args) == 0
    return EmbeddingFiles.of(out)


def table(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as file:
        return list(csv.DictReader(file))


def test_rows_are_the_knn_features_in_dataset_order(
    checkpoint: Path, digits: EmbeddingFiles
) -> None:
    matrix = np.load(digits.embeddings)
    assert matrix.dtype == np.float32 and matrix.shape == (1437 + 360, 256)

    method, cfg, _ = load_pretrained(checkpoint)
    eval_data = EvalData.from_config(cfg)  # what `barlow knn` extracts
    train, test = eval_data.feature_pair(
        method.backbone, device=torch.device("cpu"), batch_size=100, progress=False
    )
    expected = torch.cat([train.features, test.features]).numpy()
    np.testing.assert_allclose(matrix, expected, atol=1e-5, rtol=0)

    rows = table(digits.table)
    assert list(rows[0]) == ["split", "index", "label", "class", "path"]
    assert [r["split"] for r in rows] == ["train"] * 1437 + ["test"] * 360
    assert [int(r["index"]) for r in rows] == [*range(1437), *range(360)]
    labels = [int(r["label"]) for r in rows]
    assert labels == torch.cat([train.labels, test.labels]).tolist()
    assert all(r["class"] == str(label) for r, label in zip(rows, labels, strict=True))
    assert all(r["path"] == "" for r in rows)  # in-memory images have no file


def test_neighbours_are_the_most_similar_other_rows(digits: EmbeddingFiles) -> None:
    matrix = torch.from_numpy(np.load(digits.embeddings))
    index, sims = np.load(digits.neighbours), np.load(digits.neighbour_sims)
    assert index.dtype == np.int64 and sims.dtype == np.float32
    assert index.shape == sims.shape == (len(matrix), K)

    unit = F.normalize(matrix, dim=1)
    brute = unit @ unit.T
    brute.fill_diagonal_(-torch.inf)
    top, top_index = brute.topk(K + 1, dim=1)
    np.testing.assert_allclose(sims, top[:, :K].numpy(), atol=1e-6)
    # each similarity is the one of the pair it names, and no row is its own neighbour
    rows = torch.arange(len(matrix))[:, None]
    np.testing.assert_allclose(sims, brute[rows, torch.from_numpy(index)].numpy(), atol=1e-6)
    assert not (index == np.arange(len(matrix))[:, None]).any()
    # the same rows as brute force wherever the ranking is not a (near-)tie
    gaps = (top[:, :-1] - top[:, 1:]).min(dim=1).values
    clear = (gaps > 1e-5).numpy()
    assert clear.mean() > 0.9
    np.testing.assert_array_equal(index[clear], top_index[:, :K].numpy()[clear])


def test_agreement_is_the_fraction_of_neighbours_sharing_the_label(
    digits: EmbeddingFiles, capsys: pytest.CaptureFixture[str]
) -> None:
    labels = np.array([int(r["label"]) for r in table(digits.table)])
    index = np.load(digits.neighbours)
    expected = (labels[index] == labels[:, None]).mean(axis=1)
    np.testing.assert_allclose(embed.neighbour_agreement(index, labels, rows=100), expected)


def test_chunks_smaller_than_the_data_give_the_same_files(
    checkpoint: Path, digits: EmbeddingFiles, tmp_path: Path
) -> None:
    """The bounded-memory path (50-image batches, 11-row neighbour blocks) writes what one chunk
    of everything writes."""
    small, whole = tmp_path / "small.npy", tmp_path / "whole.npy"
    common: dict[str, Any] = {"split": "test", "neighbours": K, "progress": False}
    embed.embed(checkpoint, small, batch_size=50, block_rows=11, **common)
    embed.embed(checkpoint, whole, batch_size=360, block_rows=360, **common)
    a, b = EmbeddingFiles.of(small), EmbeddingFiles.of(whole)
    np.testing.assert_allclose(np.load(a.embeddings), np.load(b.embeddings), atol=1e-6, rtol=0)
    np.testing.assert_array_equal(np.load(a.neighbours), np.load(b.neighbours))
    np.testing.assert_allclose(np.load(a.neighbour_sims), np.load(b.neighbour_sims), atol=1e-6)
    assert a.table.read_bytes() == b.table.read_bytes()
    # and the test split's rows are the last 360 of the whole dataset's
    np.testing.assert_allclose(
        np.load(a.embeddings), np.load(digits.embeddings)[1437:], atol=1e-6, rtol=0
    )


def test_neighbours_in_blocks_equal_one_block_with_ties() -> None:
    """Duplicated rows tie exactly: every block size orders them by row, lowest first."""
    rows = torch.randn(6, 4).repeat(5, 1).numpy()  # 30 rows, each 5 times
    one = nearest_neighbours(rows, 7, block_rows=30)
    for block in (1, 4, 13):
        index, sims = nearest_neighbours(rows, 7, block_rows=block)
        np.testing.assert_array_equal(index, one[0])
        # a matrix product's rounding depends on its shape: similarities agree to float32 ulps
        np.testing.assert_allclose(sims, one[1], atol=1e-6, rtol=0)
    # row 0's four copies (rows 6, 12, 18, 24) come first, in ascending order
    assert one[0][0, :4].tolist() == [6, 12, 18, 24]


def write_pngs(directory: Path, count: int, seed: int = 0) -> list[Path]:
    generator = np.random.default_rng(seed)
    directory.mkdir(parents=True)
    paths = []
    for i in range(count):
        pixels = generator.integers(0, 256, size=(20, 24, 3), dtype=np.uint8)
        paths.append(directory / f"{i:02d}.png")
        Image.fromarray(pixels).save(paths[-1])
    return paths


def test_an_image_folder_gives_absolute_paths_and_the_knn_features(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RGB photos (train/ and val/ with class folders) for the greyscale digits encoder: the
    rows are what `barlow knn --data` extracts from them (seen in grey, as digits)."""
    train = write_pngs(tmp_path / "pets/train/cat", 3) + write_pngs(tmp_path / "pets/train/dog", 4)
    test = write_pngs(tmp_path / "pets/val/cat", 2, seed=1) + write_pngs(
        tmp_path / "pets/val/dog", 2
    )
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "pets.npy"
    result = embed.embed(checkpoint, out, dataset="pets", neighbours=2, progress=False)
    assert result.count == 11 and set(result.agreement) == {"train", "test", "all"}
    rows = table(EmbeddingFiles.of(out).table)
    assert [r["path"] for r in rows] == [str(p) for p in train + test]  # absolute, in order
    assert [(r["split"], r["index"], r["class"]) for r in rows[2:5]] == [
        ("train", "2", "cat"),
        ("train", "3", "dog"),
        ("train", "4", "dog"),
    ]
    assert [r["label"] for r in rows[7:]] == ["0", "0", "1", "1"]

    method, cfg, _ = load_pretrained(checkpoint)
    eval_data = EvalData.from_config(cfg, dataset=str(tmp_path / "pets"))
    features = eval_data.feature_pair(
        method.backbone, device=torch.device("cpu"), batch_size=4, progress=False
    )
    expected = torch.cat([f.features for f in features]).numpy()
    np.testing.assert_allclose(np.load(out), expected, atol=1e-5, rtol=0)


def test_an_unlabelled_folder_has_label_minus_one_and_no_agreement(
    checkpoint: Path, tmp_path: Path
) -> None:
    write_pngs(tmp_path / "photos", 3)  # images without class folders
    out = tmp_path / "photos.npy"
    result = embed.embed(
        checkpoint, out, dataset=str(tmp_path / "photos"), neighbours=1, progress=False
    )
    rows = table(EmbeddingFiles.of(out).table)
    assert [(r["split"], r["label"], r["class"]) for r in rows] == [("train", "-1", "")] * 3
    assert result.agreement == {}


# ---------------------------------------------------------------------------------------------
# Refusals and failures


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--out", "{tmp}/e.npy", "--checkpoint-missing"], "does not exist"),
        (["--out", "{tmp}/e.npy", "--data", "{tmp}/no-such-folder"], "does not exist"),
        (["--out", "{tmp}/no-such-dir/e.npy"], "mkdir -p"),
        (["--out", "{tmp}/e.npz"], "give a .npy file name"),
        (["--out", "{tmp}/e.npy", "--split", "test", "--neighbours", "360"], "K <= 359"),
        (["--out", "{tmp}/e.npy", "--neighbours", "-1"], ">= 0"),
        (["--out", "{tmp}/e.npy", "--device", "tpu"], "use auto, cpu"),
        (["--out", "{tmp}/e.npy", "--data", "cifar10", "--data-root", "{tmp}"], "cifar"),
    ],
)
def test_bad_input_exits_2_naming_the_problem_and_writes_nothing(
    checkpoint: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    message: str,
) -> None:
    ckpt = str(checkpoint)
    if "--checkpoint-missing" in args:
        args, ckpt = [a for a in args if a != "--checkpoint-missing"], str(tmp_path / "none.pt")
    args = [a.format(tmp=tmp_path) for a in args]
    assert main(["embed", ckpt, *args, "--quiet"]) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_an_existing_output_is_replaced_only_with_overwrite(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "e.npy"
    args = ["embed", str(checkpoint), "--out", str(out), "--split", "test", "--quiet"]
    assert main([*args, "--neighbours", "3"]) == 0
    printed = capsys.readouterr().out
    assert "360 embeddings of 256 features" in printed and "(test):" in printed
    files = EmbeddingFiles.of(out)
    assert all(p.exists() for p in files.all())

    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    # replaced without neighbours: the old neighbour files go, they belong to no embedding now
    assert main([*args, "--overwrite"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.csv", "e.npy"]


def test_a_failed_run_leaves_the_previous_files_and_no_temporary_ones(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "e.npy"
    embed.embed(checkpoint, out, split="test", progress=False)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    calls = 0
    extract = evaluate.extract_features

    def fail_on_third(*args: Any, **kwargs: Any) -> evaluate.Features:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise KeyboardInterrupt  # as Ctrl-C mid-stream
        return extract(*args, **kwargs)

    monkeypatch.setattr(evaluate, "extract_features", fail_on_third)
    with pytest.raises(KeyboardInterrupt):
        embed.embed(checkpoint, out, split="test", overwrite=True, batch_size=50, progress=False)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_non_finite_features_are_refused(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    extract = evaluate.extract_features

    def poisoned(*args: Any, **kwargs: Any) -> evaluate.Features:
        features = extract(*args, **kwargs)
        features.features[0, 0] = torch.nan
        return features

    monkeypatch.setattr(evaluate, "extract_features", poisoned)
    with pytest.raises(ValueError, match=r"NaN or Inf for images 0\.\.99"):
        embed.embed(checkpoint, tmp_path / "e.npy", split="test", batch_size=100, progress=False)
    assert list(tmp_path.iterdir()) == []
