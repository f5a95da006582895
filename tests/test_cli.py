"""The `barlow` command line: subcommands, errors with exit codes, and a 2-process torchrun run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from barlow.cli import main
from processes import pretrain_on_two_processes
from runs import sets

TINY = sets(
    'method.projector="64-64"',
    "train.batch_size=64",
    "eval.probe_epochs=5",
    "eval.knn_k=20",
    "eval.online_knn_every=0",
    "eval.baselines=false",
    "eval.protocol_epochs=1",
)


def test_methods_lists_barlow_twins_with_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "barlow_twins" in out and "lambd=0.0051" in out and "'8192-8192-8192'" in out


def test_recipes_lists_the_shipped_recipes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    for name in ("digits", "fashion-mnist", "cifar10-resnet18", "imagenet-resnet50"):
        assert name in out


def test_unknown_key_exits_2_naming_the_closest_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["pretrain", "--out", str(tmp_path), "--set", "optim.lrr=0.1"]) == 2
    err = capsys.readouterr().err
    assert "optim.lrr" in err and "did you mean 'lr'" in err
    assert not (tmp_path / "checkpoint.pt").exists()


def test_missing_recipe_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pretrain", "no-such-recipe"]) == 2
    assert "digits" in capsys.readouterr().err  # lists what exists


def test_pretrain_then_knn_and_linear(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    assert main(["pretrain", "--out", str(out), "--epochs", "1", "--quiet", *TINY]) == 0
    ckpt = out / "checkpoint.pt"
    assert main(["knn", str(ckpt), "--set", "eval.knn_k=20"]) == 0
    assert main(["linear", str(ckpt), "--set", "eval.probe_epochs=5"]) == 0
    assert (
        main(["linear", str(ckpt), "--protocol", "paper", "--set", "eval.protocol_epochs=1"]) == 0
    )
    printed = capsys.readouterr().out
    assert (
        "kNN top-1" in printed and "linear probe top-1" in printed and "paper protocol" in printed
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"knn", "linear_probe", "linear_paper", "evaluation"} <= metrics.keys()
    # `knn` scores the checkpoint's encoder: exactly what the run's final evaluation scored.
    # (A bound like top-1 > 0.1 passes any encoder: a random init scores 95 % on digits, and
    # one epoch of pretraining does not beat that here; test_learning.py shows learning on
    # Fashion-MNIST.)
    pretrained = metrics["evaluation"]["pretrained"]["knn_top1"]
    assert metrics["knn"]["knn_top1"] == pretrained

    # Negative case: a `knn` that scores a fresh encoder instead of the checkpoint's is caught.
    from barlow import assessment
    from barlow.encoder import build_method

    load = assessment.load_pretrained

    def ignoring_the_weights(path: str | Path) -> tuple[object, object, object]:
        _, cfg, state = load(path)
        torch.manual_seed(cfg.train.seed)
        return build_method(cfg), cfg, state

    monkeypatch.setattr(assessment, "load_pretrained", ignoring_the_weights)
    assert main(["knn", str(ckpt), "--set", "eval.knn_k=20"]) == 0
    broken = json.loads((out / "metrics.json").read_text())["knn"]["knn_top1"]
    assert 0.1 < broken <= 1.0  # the old check passed it
    assert broken != pretrained


def test_python_dash_m_is_the_same_command() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "barlow", "--version"], capture_output=True, text=True, check=True
    )
    assert done.stdout.startswith("barlow ")


def test_torchrun_two_processes(tmp_path: Path) -> None:
    """`torchrun --nproc_per_node 2 -m barlow pretrain` trains with DDP over gloo on CPU."""
    args = ["--epochs", "1", *TINY, *sets("train.max_steps=4", "eval.final=false")]
    done = pretrain_on_two_processes(tmp_path, args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 process(es)" in done.stderr
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["global_step"] == 4


def test_fault_flags_set_their_config_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--skip-corrupt sets data.skip_corrupt; --resume-weights-only implies --resume."""
    import barlow.training

    seen: dict[str, object] = {}

    def record(cfg, out, *, resume, **kwargs):  # type: ignore[no-untyped-def]
        seen.update(cfg=cfg, resume=resume)
        return {}

    monkeypatch.setattr(barlow.training, "pretrain", record)
    assert main(["pretrain", "--out", str(tmp_path)]) == 0
    cfg = seen["cfg"]
    assert not cfg.data.skip_corrupt and not cfg.train.resume_weights_only  # type: ignore[attr-defined]
    assert seen["resume"] is False
    assert (
        main(["pretrain", "--out", str(tmp_path), "--skip-corrupt", "--resume-weights-only"]) == 0
    )
    cfg = seen["cfg"]
    assert cfg.data.skip_corrupt and cfg.train.resume_weights_only  # type: ignore[attr-defined]
    assert seen["resume"] is True
