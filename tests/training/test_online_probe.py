"""The online linear classifier: it learns, it leaves pretraining untouched, it resumes exactly,
and two ranks train the head one process trains on the same global batch."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from barlow import checkpoint, distributed
from barlow.config import load_config
from barlow.evaluate import Features
from barlow.training import CHECKPOINT_NAME, pretrain
from barlow.training.online_probe import OnlineLinearProbe
from comparisons import assert_identical, differing
from processes import join_as_rank, leave_process_group, save_rank_result, spawn_ranks
from runs import records, weights

TINY = [
    'method.projector="32-32"',
    "train.batch_size=64",
    "train.epochs=2",
    "optim.warmup_epochs=1",
    "eval.online_knn_every=1",
    "eval.final=false",
    'data.augment_on="device"',
]
STEPS_PER_EPOCH = 1437 // 64  # 22


def clusters(n: int, *, seed: int, dim: int = 16, classes: int = 4) -> tuple[torch.Tensor, ...]:
    """``n`` points of ``classes`` Gaussian clusters in ``dim`` dimensions, and their labels."""
    generator = torch.Generator().manual_seed(seed)
    centres = 3 * torch.randn(classes, dim, generator=torch.Generator().manual_seed(99))
    labels = torch.randint(classes, (n,), generator=generator)
    return centres[labels] + torch.randn(n, dim, generator=generator), labels


def feed(probe: OnlineLinearProbe, features: torch.Tensor, labels: torch.Tensor) -> None:
    """One step of the probe as the loop drives it: armed, a backbone call, an update."""
    probe.arm()
    probe.captured = features  # what the forward hook keeps
    probe.update(labels)


def test_the_probe_learns_separable_classes_and_measures_its_accuracy() -> None:
    probe = OnlineLinearProbe(16, 4, lr=0.1, device=torch.device("cpu"))
    for step in range(60):
        feed(probe, *clusters(64, seed=step))
    assert probe.train_accuracy() > 0.8
    assert probe.train_accuracy() == 0.0  # the counts start again after each reading
    test = Features(*clusters(1000, seed=1234))
    assert probe.test_accuracy(test) > 0.95
    untrained = OnlineLinearProbe(16, 4, lr=0.1, device=torch.device("cpu"))
    assert untrained.test_accuracy(test) < 0.5  # zero weights: every image gets class 0


def test_building_the_probe_draws_nothing_from_the_global_generator() -> None:
    """A resumed run builds the probe after restoring the random state: a draw would shift every
    later step that draws (dropout, noise), as test_resume_controls' RNG control found."""
    state = torch.get_rng_state()
    OnlineLinearProbe(256, 10, lr=0.1, device=torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), state)


def test_the_hook_keeps_the_first_backbone_call_after_arming_only() -> None:
    backbone = nn.Linear(3, 5)
    probe = OnlineLinearProbe(5, 2, lr=0.1, device=torch.device("cpu"))
    probe.attach(backbone)
    first, second = torch.randn(4, 3), torch.randn(4, 3)
    backbone(first)
    assert probe.captured is None  # not armed: a monitor's or an evaluation's call
    probe.arm()
    backbone(first)
    backbone(second)
    assert probe.captured is not None and not probe.captured.requires_grad
    torch.testing.assert_close(probe.captured, backbone(first).detach())
    probe.discard()
    assert probe.captured is None
    probe.detach()
    probe.arm()
    backbone(first)
    assert probe.captured is None
    with pytest.raises(RuntimeError, match="online_linear=false"):
        probe.update(torch.zeros(4, dtype=torch.long))


def _train_on_shards(rank: int, port: int, out_dir: str, gather: bool = True) -> None:
    join_as_rank(rank, 2, port)
    distributed.init_from_env("gloo")
    if not gather:  # the negative control: each rank trains on its own shard
        distributed.all_gather_no_grad = lambda x: x.detach()  # type: ignore[assignment]
    probe = OnlineLinearProbe(16, 4, lr=0.1, device=torch.device("cpu"))
    for step in range(5):
        features, labels = clusters(32, seed=step)
        feed(probe, features[16 * rank : 16 * (rank + 1)], labels[16 * rank : 16 * (rank + 1)])
    save_rank_result(out_dir, rank, {**probe.head.state_dict(), "acc": probe.train_accuracy()})
    leave_process_group()


def _train_on_own_shards(rank: int, port: int, out_dir: str) -> None:
    _train_on_shards(rank, port, out_dir, gather=False)


def test_two_ranks_train_the_head_one_process_trains_on_the_global_batch(tmp_path: Path) -> None:
    single = OnlineLinearProbe(16, 4, lr=0.1, device=torch.device("cpu"))
    for step in range(5):
        feed(single, *clusters(32, seed=step))
    expected = {**single.head.state_dict(), "acc": single.train_accuracy()}
    ranks = spawn_ranks(_train_on_shards, 2, tmp_path)
    for result in ranks:
        assert result["acc"] == expected["acc"]
        for key, value in expected.items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(result[key], value, rtol=1e-6, atol=1e-7)
    # Negative control: without the gather the ranks' heads drift apart from the global one.
    (tmp_path / "control").mkdir()
    drifting = spawn_ranks(_train_on_own_shards, 2, tmp_path / "control")
    assert not torch.allclose(drifting[0]["1.weight"], expected["1.weight"], rtol=1e-3)


@pytest.fixture(scope="module")
def with_probe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("with-probe")
    pretrain(load_config("digits", TINY), run, progress=False)
    return run


def test_pretraining_records_the_online_linear_accuracy_each_epoch(with_probe: Path) -> None:
    epochs = records(with_probe, "epoch")
    assert [r["epoch"] for r in epochs] == [1, 2]
    for record in epochs:
        assert 0.2 < record["online_linear_train_top1"] <= 1  # 10 classes: chance is 0.1
        assert 0.2 < record["online_linear_top1"] <= 1
        assert "knn_top1" in record
    saved = checkpoint.load_checkpoint(with_probe / CHECKPOINT_NAME)["online_probe"]
    assert saved["head"]["1.weight"].shape == (10, 256)  # small_cnn: 256 features
    assert saved["correct"] == saved["seen"] == 0  # read and reset at the epoch's end


def test_the_probe_leaves_pretraining_bit_identical(with_probe: Path, tmp_path: Path) -> None:
    pretrain(load_config("digits", [*TINY, "eval.online_linear=false"]), tmp_path, progress=False)
    assert_identical(weights(tmp_path), weights(with_probe))
    epochs = records(tmp_path, "epoch")
    assert not any(k.startswith("online_linear") for r in epochs for k in r)
    assert [r["loss"] for r in epochs] == [r["loss"] for r in records(with_probe, "epoch")]
    assert "online_probe" not in checkpoint.load_checkpoint(tmp_path / CHECKPOINT_NAME)


def test_a_mid_epoch_resume_continues_the_probe_exactly(
    with_probe: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    split = tmp_path / "split"
    stop = STEPS_PER_EPOCH + 7  # inside epoch 2
    pretrain(load_config("digits", [*TINY, f"train.max_steps={stop}"]), split, progress=False)
    shutil.copytree(split, tmp_path / "control")
    pretrain(load_config("digits", TINY), split, resume=True, progress=False)

    def probe_of(run: Path) -> dict[str, torch.Tensor]:
        return dict(checkpoint.load_checkpoint(run / CHECKPOINT_NAME)["online_probe"]["head"])

    assert_identical(probe_of(split), probe_of(with_probe))
    last = records(split, "epoch")[-1]
    expected = records(with_probe, "epoch")[-1]
    for key in ("online_linear_train_top1", "online_linear_top1"):
        assert last[key] == expected[key]
    # Negative control: a resume that forgets the probe's state is caught by the comparison.
    monkeypatch.setattr(OnlineLinearProbe, "load_state_dict", lambda self, saved: None)
    pretrain(load_config("digits", TINY), tmp_path / "control", resume=True, progress=False)
    assert differing(probe_of(tmp_path / "control"), probe_of(with_probe))
