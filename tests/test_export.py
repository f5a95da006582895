"""`barlow export`: each format loads where it claims to and computes the backbone's features; the
hub entry points; the model card; refusals with one clear sentence."""

from __future__ import annotations

import functools
import json
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from barlow import checkpoint, export
from barlow.cli import main
from barlow.config import from_dict
from barlow.encoder import build_method
from barlow.evaluate import write_metrics
from runs import sets

REPO = Path(__file__).resolve().parents[1]
# torch.jit is deprecated upstream; the torchscript format is still exported on request
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")

# resnet18 on 32-px RGB crops with torchvision's stem (the 3×3 small-image stem is the default
# below 64 px), so its weights fit torchvision.models.resnet18; one step of 16 images
RESNET_RUN = sets(
    'model.backbone="resnet18"',
    "model.small_images=false",
    "data.crop_size=32",
    'method.projector="16-16"',
    "train.batch_size=16",
    "train.epochs=1",
    "train.max_steps=1",
    "train.keep_last=0",
    "optim.warmup_epochs=1",
    "eval.online_knn_every=0",
    "eval.final=false",
)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A `barlow pretrain` run of resnet18 on a folder of 32 RGB images, with the metrics.json
    `barlow knn` / the final evaluation would leave."""
    base = tmp_path_factory.mktemp("export")
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (base / "images" / label).mkdir(parents=True)
        for i in range(16):
            pixels = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(base / "images" / label / f"{i}.png")
    argv = ["barlow", "pretrain", "--data", str(base / "images"), "--out", str(base / "run")]
    argv += ["--quiet", *RESNET_RUN]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", argv)  # what config.json records as the command line
        assert main(argv[1:]) == 0
    write_metrics(
        base / "run" / "metrics.json",
        {"evaluation": {"pretrained": {"knn_top1": 0.5, "linear_top1": 0.625}}},
    )
    return base / "run"


@pytest.fixture(scope="module")
def exported(run: Path) -> dict[str, Any]:
    """Every format of the run's checkpoint in one folder, and what the command printed."""
    out = run.parent / "exported"
    printed = {}
    for fmt in export.FORMATS:
        printed[fmt] = export.export_checkpoint(run / "checkpoint.pt", fmt, out).check
    return {"out": out, "checks": printed}


def features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out: torch.Tensor = model.eval()(x)
    return out


@functools.cache
def reference(path: Path) -> tuple[export.Encoder, torch.Tensor, torch.Tensor]:
    """The encoder of a checkpoint, an input batch of 5 and barlow's features of it (once per
    file: loading a checkpoint takes a while on a small CPU)."""
    encoder = export.load_encoder(path)
    x = encoder.example(5, seed=7)
    return encoder, x, features(encoder.backbone, x)


def fake_checkpoint(path: Path, **model: Any) -> Path:
    """A checkpoint as `barlow pretrain` writes it (the entries an export reads) for a digits
    model built without training; weights perturbed so no layer is the identity."""
    cfg = from_dict({"model": model, "method": {"projector": "16-16"}, "train": {"epochs": 3}})
    method = build_method(cfg)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, tensor in method.state_dict().items():
            noise = torch.rand(tensor.shape, generator=generator)
            if name.endswith("running_var"):
                tensor.mul_(1 + noise)
            elif tensor.is_floating_point():
                tensor.add_(0.1 * (noise - 0.5))
    state = {"config": cfg.to_dict(), "epoch": 3, "global_step": 33, "method": method.state_dict()}
    checkpoint.save_checkpoint(state, path)
    return path


def run_snippets(card: str, folder: Path, checkpoint_path: Path) -> int:
    """Run each Python block of a model card in ``folder``: three lines that load a file and give
    the checkpoint's features (``model``) or features of the right width (``h``)."""
    blocks = re.findall(r"```python\n(.*?)```", card, flags=re.DOTALL)
    _, x, h = reference(checkpoint_path)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        for block in blocks:
            assert block.count("\n") == 3, block
            namespace: dict[str, Any] = {}
            exec(block, namespace)
            if "model" in namespace:
                assert torch.allclose(features(namespace["model"], x), h, rtol=0, atol=1e-5)
            else:
                assert tuple(namespace["h"].shape) == (1, h.shape[1]), block
    return len(blocks)


@pytest.fixture(scope="module")
def small_stem(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """resnet18 on 1-channel 16-px digits: the 3×3 stem without max-pool."""
    path = tmp_path_factory.mktemp("small") / "checkpoint.pt"
    return fake_checkpoint(path, backbone="resnet18")


def test_torchvision_format_loads_into_torchvision_resnet18(
    run: Path, exported: dict[str, Any]
) -> None:
    weights = torch.load(exported["out"] / "resnet18.pth", weights_only=True)
    model = torchvision.models.resnet18()
    result = model.load_state_dict(weights, strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"]
    assert result.unexpected_keys == []
    assert not any(key.startswith("net.") for key in weights)
    model.fc = nn.Identity()
    _, x, h = reference(run / "checkpoint.pt")
    assert torch.equal(features(model, x), h)


def test_safetensors_holds_torchvision_keys_and_metadata(
    run: Path, exported: dict[str, Any]
) -> None:
    path = exported["out"] / "resnet18.safetensors"
    model = torchvision.models.resnet18()
    model.fc = nn.Identity()
    model.load_state_dict(load_file(path))  # strict: the same keys as torchvision's
    with safe_open(str(path), framework="pt") as file:
        metadata = file.metadata()
    assert metadata["backbone"] == "resnet18" and metadata["keys"] == "torchvision"
    assert metadata["in_channels"] == "3" and metadata["image_size"] == "32"
    assert json.loads(metadata["mean"]) == [0.485, 0.456, 0.406]
    _, x, h = reference(run / "checkpoint.pt")
    assert torch.equal(features(model, x), h)


def test_onnx_matches_pytorch_under_onnxruntime(run: Path, exported: dict[str, Any]) -> None:
    import onnxruntime

    session = onnxruntime.InferenceSession(
        str(exported["out"] / "resnet18.onnx"), providers=["CPUExecutionProvider"]
    )
    assert session.get_inputs()[0].shape == ["batch", 3, 32, 32]
    _, x, h = reference(run / "checkpoint.pt")  # batch 5: the exporter traced batch 2
    (h_onnx,) = session.run(None, {"images": x.numpy()})
    assert float((torch.from_numpy(h_onnx) - h).abs().max()) <= 1e-4
    assert "onnxruntime matches PyTorch" in exported["checks"]["onnx"]


def test_torchscript_reloads_with_the_same_features(run: Path, exported: dict[str, Any]) -> None:
    model = torch.jit.load(str(exported["out"] / "resnet18.torchscript.pt"))
    _, x, h = reference(run / "checkpoint.pt")
    assert torch.allclose(features(model, x), h, rtol=0, atol=1e-6)


@pytest.mark.parametrize("weights", ["resnet18.pth", "resnet18.safetensors", "checkpoint.pt"])
def test_hub_load_returns_the_encoder(run: Path, exported: dict[str, Any], weights: str) -> None:
    path = run / weights if weights == "checkpoint.pt" else exported["out"] / weights
    model = torch.hub.load(str(REPO), "resnet18", source="local", weights=str(path))
    _, x, h = reference(run / "checkpoint.pt")
    assert isinstance(model, torchvision.models.ResNet) and isinstance(model.fc, nn.Identity)
    assert torch.allclose(features(model, x), h, rtol=0, atol=1e-5)


def test_hub_rebuilds_the_small_image_stem_and_small_cnn(small_stem: Path, tmp_path: Path) -> None:
    model = torch.hub.load(str(REPO), "resnet18", source="local", weights=str(small_stem))
    _, x, h = reference(small_stem)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.in_channels == 1
    assert torch.allclose(features(model, x), h, rtol=0, atol=1e-5)

    cnn = fake_checkpoint(tmp_path / "checkpoint.pt", backbone="small_cnn")
    model = torch.hub.load(str(REPO), "small_cnn", source="local", weights=str(cnn))
    _, x, h = reference(cnn)
    assert torch.allclose(features(model, x), h, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="holds small_cnn weights; load it with the 'small_cnn'"):
        torch.hub.load(str(REPO), "resnet50", source="local", weights=str(cnn))


def test_model_card_says_what_the_encoder_is_and_how_to_load_it(
    run: Path, exported: dict[str, Any]
) -> None:
    card = (exported["out"] / "MODEL.md").read_text()
    for fact in (
        "torchvision resnet18 without its classifier",
        "(B, 3, 32, 32) float32 RGB images",
        "mean [0.485, 0.456, 0.406]",
        "(B, 512) float32 features",
        "barlow_twins (projector='16-16')",
        str(run.parent / "images"),  # the dataset
        "lars, lr 0.4 per 256 images",
        "0 of 1 (global step 1), stopped by train.max_steps=1",
        "kNN top-1 50.0 % (k 20, final); linear probe top-1 62.5 % (final)",
        f"pretraining: `barlow pretrain --data {run.parent / 'images'}",
        f"export: `barlow export {run / 'checkpoint.pt'} --format onnx --out",
        'torch.load("resnet18.pth", weights_only=True)',
        'onnxruntime.InferenceSession("resnet18.onnx")',
    ):
        assert fact in card, fact
    for suffix in (".pth", ".safetensors", ".onnx", ".torchscript.pt"):
        assert f"### `resnet18{suffix}`" in card  # every format of the same weights in the folder
    assert run_snippets(card, exported["out"], run / "checkpoint.pt") == 4


def test_cli_exports_and_refuses_to_replace_a_file(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    args = ["export", str(run / "checkpoint.pt"), "--format", "torchvision", "--out", str(out)]
    assert main(args) == 0
    assert "into torchvision.models.resnet18() with only fc missing" in capsys.readouterr().out
    before = (out / "resnet18.pth").stat().st_mtime_ns
    assert main(args) == 2
    assert "resnet18.pth exists; pass --overwrite" in capsys.readouterr().err
    assert (out / "resnet18.pth").stat().st_mtime_ns == before
    assert main([*args, "--overwrite"]) == 0


def test_a_card_of_other_weights_is_not_replaced(run: Path, small_stem: Path) -> None:
    out = small_stem.parent / "mixed"
    export.export_checkpoint(small_stem, "safetensors", out)
    card = (out / "MODEL.md").read_text()
    assert "small_images=True).net" in card and run_snippets(card, out, small_stem) == 1
    with pytest.raises(FileExistsError, match=r"MODEL\.md describes other weights"):
        export.export_checkpoint(run / "checkpoint.pt", "safetensors", out)
    assert (out / "MODEL.md").read_text() == card
    assert not (out / "resnet18.pth").exists()


@pytest.mark.parametrize(
    ("model", "reason"),
    [
        ({"backbone": "resnet18"}, "has the 3×3 stem without max-pool"),
        ({"backbone": "resnet18", "small_images": False}, "takes 1-channel images"),
        ({"backbone": "small_cnn"}, "small_cnn encoder, not a torchvision model"),
    ],
)
def test_torchvision_format_refuses_weights_of_other_shapes(
    tmp_path: Path, model: dict[str, Any], reason: str
) -> None:
    path = fake_checkpoint(tmp_path / "checkpoint.pt", **model)
    with pytest.raises(ValueError, match=reason) as refused:
        export.export_checkpoint(path, "torchvision", tmp_path / "out")
    assert "export --format safetensors, onnx or torchscript instead" in str(refused.value)
    assert not (tmp_path / "out").exists()


def test_small_cnn_exports_to_the_other_formats(tmp_path: Path) -> None:
    path = fake_checkpoint(tmp_path / "checkpoint.pt", backbone="small_cnn")
    for fmt in ("safetensors", "onnx", "torchscript"):
        export.export_checkpoint(path, fmt, tmp_path / "out")
    _, x, h = reference(path)
    model = torch.jit.load(str(tmp_path / "out" / "small_cnn.torchscript.pt"))
    assert torch.allclose(features(model, x), h, rtol=0, atol=1e-6)
    card = (tmp_path / "out" / "MODEL.md").read_text()
    assert 'create_backbone("small_cnn", in_channels=1)' in card
    assert "(B, 1, 16, 16) float32 1-channel images" in card
    assert "pretraining: `not recorded" in card and "accuracy | not measured" in card
    assert run_snippets(card, tmp_path / "out", path) == 3


def test_a_wider_small_cnn_loads_from_its_card_and_the_hub(tmp_path: Path) -> None:
    path = fake_checkpoint(tmp_path / "checkpoint.pt", backbone="small_cnn", width=8)
    export.export_checkpoint(path, "safetensors", tmp_path / "out")
    card = (tmp_path / "out" / "MODEL.md").read_text()
    assert 'create_backbone("small_cnn", in_channels=1, width=8)' in card
    assert run_snippets(card, tmp_path / "out", path) == 1
    with safe_open(str(tmp_path / "out" / "small_cnn.safetensors"), framework="pt") as file:
        assert json.loads(file.metadata()["width"]) == 8
    model = torch.hub.load(str(REPO), "small_cnn", source="local", weights=str(path))
    _, x, h = reference(path)
    assert h.shape[1] == 64 and torch.allclose(features(model, x), h, rtol=0, atol=1e-5)


def test_a_gridded_small_cnn_loads_from_its_card_and_the_hub(tmp_path: Path) -> None:
    path = fake_checkpoint(
        tmp_path / "checkpoint.pt", backbone="small_cnn", width=8, feature_grid=2
    )
    export.export_checkpoint(path, "safetensors", tmp_path / "out")
    card = (tmp_path / "out" / "MODEL.md").read_text()
    assert 'create_backbone("small_cnn", in_channels=1, width=8, grid=2)' in card
    assert run_snippets(card, tmp_path / "out", path) == 1
    exported = tmp_path / "out" / "small_cnn.safetensors"
    with safe_open(str(exported), framework="pt") as file:
        assert json.loads(file.metadata()["feature_grid"]) == 2
    _, x, h = reference(path)
    assert h.shape[1] == 64 * 4
    for weights in (path, exported):  # the grid has no weights: each file's record gives it
        model = torch.hub.load(str(REPO), "small_cnn", source="local", weights=str(weights))
        assert torch.allclose(features(model, x), h, rtol=0, atol=1e-5)


def test_a_gridded_runs_backbone_file_records_its_grid_for_the_hub(tmp_path: Path) -> None:
    """The run's own backbone.safetensors: without the recorded grid the hub would build global
    pooling, load the same weights without complaint and give other features."""
    from barlow.assessment import load_pretrained
    from barlow.rundir import RunDir
    from barlow.training.pretrain import export_and_evaluate

    path = fake_checkpoint(
        tmp_path / "checkpoint.pt", backbone="small_cnn", width=8, feature_grid=2
    )
    method, cfg, _ = load_pretrained(path)
    run_dir = RunDir(tmp_path / "run")
    cpu = torch.device("cpu")
    export_and_evaluate(
        method, cfg, run_dir, {}, device=cpu, progress=False, only=[run_dir.backbone]
    )
    with safe_open(str(run_dir.backbone), framework="pt") as file:
        assert file.metadata()["feature_grid"] == "2"
    model = torch.hub.load(str(REPO), "small_cnn", source="local", weights=str(run_dir.backbone))
    _, x, h = reference(path)
    assert h.shape[1] == 256 and torch.allclose(features(model, x), h, rtol=0, atol=1e-5)


def test_a_wrong_export_is_not_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = fake_checkpoint(tmp_path / "checkpoint.pt", backbone="small_cnn")
    monkeypatch.setattr(export, "TOLERANCE", -1.0)  # no export can pass
    assert main(["export", str(path), "--format", "torchscript", "--out", str(tmp_path)]) == 1
    assert "differs from PyTorch by up to" in capsys.readouterr().err
    assert not (tmp_path / "small_cnn.torchscript.pt").exists()
    assert not (tmp_path / "MODEL.md").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["MISSING", "--format", "torchvision"], "no such checkpoint"),
        (["CKPT", "--format", "onx"], "unknown export format 'onx'; did you mean 'onnx'?"),
        (["CKPT", "--format", "onnx"], "needs onnxruntime, not installed here: pip install"),
    ],
)
def test_cli_errors_are_one_sentence_and_exit_2(
    small_stem: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    message: str,
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime: ImportError
    paths = {"CKPT": str(small_stem), "MISSING": str(tmp_path / "checkpoint.pt")}
    args = [paths.get(arg, arg) for arg in args]
    assert main(["export", *args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("barlow export: error: ") and message in err
    assert err.count("\n") == 1
    assert not (tmp_path / "out").exists()
