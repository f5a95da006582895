"""torch.hub entry points: barlow's pretrained encoders.

    model = torch.hub.load("<owner>/barlow", "resnet50", weights="export/resnet50.pth")
    model = torch.hub.load("/path/to/barlow", "resnet18", source="local", weights="checkpoint.pt")

``weights`` is None (a random initialisation) or a file: ``barlow export`` in the torchvision or
safetensors format, a run's ``backbone.safetensors``, or a ``checkpoint.pt`` written by
``barlow pretrain``. Each entry point returns the encoder, mapping (B, C, H, W) images to
(B, num_features) features: for a ResNet, torchvision's with ``fc = nn.Identity()`` and the stem
the weights were trained with (barlow's 3×3 stem without max-pool for images ≤ 64 px, or
1-channel input, are read from the shape of ``conv1.weight``).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

dependencies = ["torch", "torchvision"]


def resnet18(weights: str | Path | None = None) -> Any:
    """ResNet-18 encoder (512 features)."""
    return _resnet("resnet18", weights)


def resnet34(weights: str | Path | None = None) -> Any:
    """ResNet-34 encoder (512 features)."""
    return _resnet("resnet34", weights)


def resnet50(weights: str | Path | None = None) -> Any:
    """ResNet-50 encoder (2048 features)."""
    return _resnet("resnet50", weights)


def small_cnn(weights: str | Path | None = None) -> Any:
    """barlow's 4-block CNN for 16–32 px images (256 features at its default width 32); 1 channel,
    width 32 and global pooling unless the weights say otherwise (the pooled grid of
    ``model.feature_grid`` has no weights: it is read from the file's record)."""
    try:
        from barlow.backbones import SmallCNN
    except ImportError:  # a clone of the repository that is not installed
        sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))
        from barlow.backbones import SmallCNN
    if weights is None:
        return SmallCNN()
    state, model_record = _read(weights, "small_cnn")
    width, in_channels = state["features.0.weight"].shape[:2]
    grid = int(model_record.get("feature_grid") or 1)
    model = SmallCNN(in_channels=int(in_channels), width=int(width), grid=grid)
    _load(model, state, weights, "small_cnn")
    return model


def _resnet(arch: str, weights: str | Path | None) -> Any:
    import torchvision
    from torch import nn

    state = {} if weights is None else _read(weights, arch)[0]
    model = getattr(torchvision.models, arch)(weights=None)
    model.fc = nn.Identity()
    if weights is None:
        return model
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    if "conv1.weight" not in state:
        raise ValueError(f"{weights} holds no ResNet weights (no conv1.weight)")
    _, in_channels, kernel, _ = state["conv1.weight"].shape
    if kernel == 3:  # barlow's stem for small images
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    _load(model, state, weights, arch)
    return model


def _read(path: str | Path, arch: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The backbone's tensors in ``path``, without barlow's ``backbone.`` / ``net.`` prefixes, and
    the model settings the file records (a checkpoint's ``model`` config, a safetensors file's
    metadata; empty for a torchvision file); refuses a file whose recorded backbone is not
    ``arch``."""
    import torch

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no weights file {path}")
    record: dict[str, Any] = {}
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as file:
            metadata = file.metadata() or {}
            record = {key: _json(value) for key, value in metadata.items()}
            state = {key: file.get_tensor(key) for key in file.keys()}  # noqa: SIM118
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # a TorchScript or ONNX export, a damaged file, a pickle
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
            raise ValueError(
                f"{path} is not a state dict torch.load(weights_only=True) reads ({reason}); "
                "pass a torchvision or safetensors export, or a checkpoint.pt"
            ) from None
        if isinstance(state, dict) and "method" in state and "config" in state:  # checkpoint.pt
            record = state["config"].get("model", {})
            state = {
                key.removeprefix("backbone."): value
                for key, value in state["method"].items()
                if key.startswith("backbone.")
            }
    recorded = record.get("backbone")
    if recorded is not None and recorded != arch:
        raise ValueError(f"{path} holds {recorded} weights; load it with the {recorded!r} entry")
    if not isinstance(state, dict) or not state:
        raise ValueError(f"{path} holds no state dict of tensors")
    if all(key.startswith("net.") for key in state):  # barlow's ResNetTrunk
        state = {key.removeprefix("net."): value for key, value in state.items()}
    return state, record


def _json(text: str) -> Any:
    """A safetensors metadata value (str → str) as barlow wrote it: JSON where it is JSON."""
    import json

    try:
        return json.loads(text)
    except ValueError:
        return text


def _load(model: Any, state: dict[str, Any], path: str | Path, arch: str) -> None:
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        reason = " ".join(str(error).split())[:600]
        raise ValueError(f"{path} does not hold {arch} weights: {reason}") from None
