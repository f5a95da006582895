"""``<run>/insight/``: the probe batch's cross-correlation, spectra and RankMe (barlow.insight).

The maths against plain torch; the files of real runs (epochs, shapes, metadata, TensorBoard);
a run with insight on trains bit-identically to one with it off, and a resumed run writes the
same files as an uninterrupted one.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from torch import Tensor

from barlow import checkpoint
from barlow.backbones import create_backbone
from barlow.config import Config, load_config
from barlow.encoder import build_method
from barlow.health import embedding_health
from barlow.insight import (
    IMAGE_TAG,
    ProbeBatch,
    correlation_summary,
    covariance_eigenvalues,
    cross_correlation,
    insight_path,
    probe_embeddings,
    rankme,
    singular_values,
    sorted_header,
)
from barlow.methods import METHODS, method_class
from barlow.methods.cmc import CMC
from barlow.rundir import RunDir
from barlow.training import CHECKPOINT_NAME, pretrain
from barlow.training.setup import pretraining_data
from comparisons import assert_identical, rel_err
from runs import records, weights

STEPS_PER_EPOCH = 1437 // 128  # 11
RUN = [
    'method.projector="64-64"',
    "train.batch_size=128",
    "train.epochs=3",
    "optim.warmup_epochs=1",
    "eval.online_knn_every=2",
    "eval.final=false",
    'data.augment_on="device"',
]
TENSORS = {
    "cross_correlation_block": (64, 64),
    "cross_correlation_pooled": (64, 64),
    "diagonal": (64,),
    "off_diagonal_histogram": (100,),
    "histogram_edges": (101,),
    "embedding_eigenvalues": (64,),
    "representation_eigenvalues": (256,),  # small_cnn's 256 features, N = 512 probe images
}


def tiny(*extra: str) -> Config:
    return load_config("digits", [*RUN, *extra])


def read(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())  # noqa: SIM118


def assert_same_file(a: Path, b: Path) -> None:
    """The same tensors, bit for bit, the same metadata, and the same bytes (the header sorted:
    safetensors writes metadata from a hash map, in an order that differs between processes)."""
    (tensors_a, meta_a), (tensors_b, meta_b) = read(a), read(b)
    assert meta_a == meta_b
    assert_identical(tensors_a, tensors_b)
    assert a.read_bytes() == b.read_bytes()


def image_steps(run: Path) -> list[int]:
    """The steps of the ``insight/cross_correlation`` images in the run's TensorBoard files."""
    steps = []
    for events in sorted((run / "tensorboard").glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(events)).Load():
            steps += [event.step for v in event.summary.value if v.tag == IMAGE_TAG]
    return steps


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three epochs with insight on and off (kNN and insight at epochs 2 and 3)."""
    root = tmp_path_factory.mktemp("insight")
    pretrain(tiny(), root / "on", progress=False)
    pretrain(tiny("eval.insight=false"), root / "off", progress=False)
    return {"on": root / "on", "off": root / "off"}


# --- the maths -------------------------------------------------------------------------------


def test_rankme_of_known_spectra() -> None:
    assert rankme(torch.ones(32)) == pytest.approx(32, rel=1e-4)  # identity: full rank
    assert rankme(torch.tensor([5.0, 0, 0, 0])) == pytest.approx(1, rel=1e-5)  # rank 1
    assert rankme(torch.tensor([3.0, 3.0, 0.0])) == pytest.approx(2, rel=1e-5)
    assert rankme(torch.zeros(4)) == 0.0
    assert rankme(torch.ones(8) * 1e3) == pytest.approx(rankme(torch.ones(8)))  # scale-free
    z = torch.randn(200, 16, generator=torch.Generator().manual_seed(0))
    # health's effective rank is the same quantity, with a tolerance where RankMe has its ε
    assert rankme(singular_values(z)) == pytest.approx(
        embedding_health(z)["effective_rank"], rel=1e-4
    )


@pytest.mark.parametrize("shape", [(50, 8), (8, 50)])
def test_spectra_equal_plain_torch(shape: tuple[int, int]) -> None:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1)).double() * 3 + 1
    k = min(shape)
    covariance = torch.cov(x.T, correction=0)
    expected = torch.linalg.eigvalsh(covariance).flip(0)[:k]
    assert rel_err(covariance_eigenvalues(x), expected.clamp_min(0)) < 1e-10
    assert rel_err(singular_values(x), torch.linalg.svdvals(x)) < 1e-10


@pytest.mark.parametrize("d", [10, 64, 300, 512])
def test_correlation_summary_shapes_and_counts(d: int) -> None:
    gen = torch.Generator().manual_seed(d)
    z1 = torch.randn(40, d, generator=gen)
    z2 = z1 + 0.5 * torch.randn(40, d, generator=gen)
    c = cross_correlation(z1, z2)
    out = correlation_summary(c)
    k, p = min(64, d), min(256, d)
    assert out["cross_correlation_block"].shape == (k, k)
    assert out["cross_correlation_pooled"].shape == (p, p)
    assert all(t.dtype == torch.float32 for t in out.values())
    assert torch.equal(out["diagonal"], c.diagonal())
    assert float(out["off_diagonal_histogram"].sum()) == d * d - d
    edges = torch.linspace(-1, 1, 101, dtype=torch.float64).float()  # -1 + k/50, rounded once
    assert torch.equal(out["histogram_edges"], edges)
    if d == 512:  # 2×2 blocks of C itself (signed)
        assert torch.allclose(out["cross_correlation_pooled"], c.view(256, 2, 256, 2).mean((1, 3)))
    if d <= 256:
        assert torch.allclose(out["cross_correlation_pooled"], c)
    assert float(out["cross_correlation_pooled"].min()) < 0  # not |C|


def test_sorted_header_makes_the_bytes_a_function_of_the_content(tmp_path: Path) -> None:
    from safetensors.torch import load, save

    tensors = {"b": torch.arange(3.0), "a": torch.ones(2, 2)}
    metadata = {f"key{i}": str(i) for i in range(8)}
    files = {sorted_header(save(tensors, metadata=metadata)) for _ in range(20)}
    assert len(files) == 1
    (payload,) = files
    assert_identical(load(payload), tensors)
    path = tmp_path / "f.safetensors"
    path.write_bytes(payload)
    assert read(path)[1] == metadata


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_projects_features_to_its_embedding(name: str) -> None:
    method = build_method(
        load_config("digits", [f'method.name="{name}"', 'method.projector="32-16"'])
    )
    assert type(method) is method_class(name)
    h = method.embed(torch.randn(6, 1, 8, 8))
    assert method.project(h).shape == (6, method.embedding_dim())


def test_cmc_lab_projects_each_encoders_half() -> None:
    method = CMC(create_backbone("small_cnn", in_channels=3), projector="16", split="lab")
    x = torch.rand(4, 3, 16, 16)
    method.eval()
    h = method.embed(x)
    lightness, _ = method.backbone.split(x)  # type: ignore[operator]
    expected_l = method.projectors[0](method.backbone.l_encoder(lightness))  # type: ignore[union-attr, operator]
    assert method.project(h).shape == (4, 32)
    assert torch.allclose(method.project(h)[:, :16], expected_l)


# --- the files of a run ----------------------------------------------------------------------


def test_files_for_epoch_0_each_knn_epoch_and_the_last(runs: dict[str, Path]) -> None:
    folder = runs["on"] / "insight"
    assert sorted(p.name for p in folder.iterdir()) == [
        f"epoch-{e:04d}.safetensors" for e in (0, 2, 3)
    ]
    epochs = {r["epoch"]: r for r in records(runs["on"], "epoch")}
    for epoch in (0, 2, 3):
        tensors, meta = read(insight_path(runs["on"], epoch))
        assert {k: tuple(v.shape) for k, v in tensors.items()} == TENSORS
        assert all(v.dtype == torch.float32 for v in tensors.values())
        assert (meta["epoch"], meta["probe_images"], meta["method"]) == (
            str(epoch),
            "512",
            "barlow_twins",
        )
        eigenvalues = tensors["embedding_eigenvalues"]
        assert torch.equal(eigenvalues, eigenvalues.sort(descending=True).values)
        assert float(tensors["off_diagonal_histogram"].sum()) == 64 * 63
        if epoch:
            assert epochs[epoch]["rankme_embedding"] == float(meta["rankme_embedding"])
            assert 1 <= epochs[epoch]["rankme_representation"] <= 256
    assert "rankme_embedding" not in epochs[1]
    assert image_steps(runs["on"]) == [0, 2 * STEPS_PER_EPOCH, 3 * STEPS_PER_EPOCH]
    assert folder in RunDir(runs["on"]).run_entries()  # --overwrite swaps it with the rest


def test_the_diagonal_is_the_cross_correlation_of_the_probe_embeddings(
    runs: dict[str, Path],
) -> None:
    """The last file against C in plain float64 torch from the final weights' probe z."""
    cfg = tiny()
    method = build_method(cfg)
    method.load_state_dict(weights(runs["on"]))
    source = pretraining_data(cfg, torch.device("cpu"))
    probe = ProbeBatch(source.dataset, source.specs, torch.device("cpu"))
    _, z1, z2 = probe_embeddings(method, probe)
    z1, z2 = z1.double(), z2.double()
    a = (z1 - z1.mean(0)) / (z1.var(0, correction=0) + 1e-5).sqrt()
    b = (z2 - z2.mean(0)) / (z2.var(0, correction=0) + 1e-5).sqrt()
    reference = a.T @ b / len(z1)
    tensors, _ = read(insight_path(runs["on"], 3))
    assert rel_err(tensors["diagonal"], reference.diagonal()) < 1e-5
    assert rel_err(tensors["cross_correlation_block"], reference) < 1e-5


def test_recording_does_not_change_training(runs: dict[str, Path]) -> None:
    assert_identical(weights(runs["on"]), weights(runs["off"]))

    def losses(run: Path) -> list[float]:
        return [r["loss"] for r in records(run)]

    assert losses(runs["on"]) == losses(runs["off"])
    assert not (runs["off"] / "insight").exists() and image_steps(runs["off"]) == []
    assert all("rankme_embedding" not in r for r in records(runs["off"]))


def test_a_resumed_run_writes_the_same_files(runs: dict[str, Path], tmp_path: Path) -> None:
    """Stopped inside epoch 3, then resumed: the same three files, and epoch 0 recorded once."""
    pretrain(tiny(f"train.max_steps={2 * STEPS_PER_EPOCH + 4}"), tmp_path, progress=False)
    assert checkpoint.load_checkpoint(tmp_path / CHECKPOINT_NAME)["step_in_epoch"] == 4
    pretrain(tiny(), tmp_path, resume=True, progress=False)
    for epoch in (0, 2, 3):
        assert_same_file(insight_path(tmp_path, epoch), insight_path(runs["on"], epoch))
    assert image_steps(tmp_path) == image_steps(runs["on"])


def test_a_rerun_of_an_epoch_rewrites_its_file_identically(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    """A run killed after recording epoch 3 but before its checkpoint redoes epoch 3."""
    shutil.copytree(runs["on"], tmp_path / "run")
    run = tmp_path / "run"
    saved = checkpoint.load_checkpoint(run / f"checkpoint-step{2 * STEPS_PER_EPOCH:08d}.pt")
    checkpoint.save_checkpoint(saved, run / CHECKPOINT_NAME)  # back to the end of epoch 2
    pretrain(tiny(), run, resume=True, progress=False)
    for epoch in (0, 2, 3):
        assert_same_file(insight_path(run, epoch), insight_path(runs["on"], epoch))
    assert records(run, "epoch")[-1]["epoch"] == 3
