"""Encoders: ``create_backbone(name)`` returns a module giving pooled (B, num_features) features."""

from __future__ import annotations

import importlib.util

from torch import Tensor, nn
from torchvision.models import resnet

_RESNETS = {"resnet18": resnet.resnet18, "resnet34": resnet.resnet34, "resnet50": resnet.resnet50}
BACKBONES = (*_RESNETS, "small_cnn")


class ResNetTrunk(nn.Module):
    """A torchvision ResNet without its classifier; ``small_images`` swaps the ImageNet stem
    (7×7 stride-2 conv + max-pool) for a 3×3 stride-1 conv, as for 32-px CIFAR images."""

    def __init__(self, name: str, *, in_channels: int = 3, small_images: bool = False) -> None:
        super().__init__()
        net = _RESNETS[name](weights=None, zero_init_residual=True)
        if small_images:
            net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
            net.maxpool = nn.Identity()
        elif in_channels != 3:
            net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.num_features: int = net.fc.in_features
        net.fc = nn.Identity()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class SmallCNN(nn.Module):
    """A 4-block conv net for 16–32 px images on a CPU (≈0.39 M parameters, 256 features).

    Each block is Conv3×3-BN-ReLU; blocks 2, 3 and 4 halve the resolution (28 → 28, 14, 7, 4 px);
    global average pooling. About 12 M multiply-adds per 28-px image, most of them in blocks 2–4.
    """

    def __init__(self, *, in_channels: int = 1, width: int = 32) -> None:
        super().__init__()
        w = width

        def block(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
            conv = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
            return [conv, nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *block(in_channels, w, 1),
            *block(w, 2 * w, 2),
            *block(2 * w, 4 * w, 2),
            *block(4 * w, 8 * w, 2),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.num_features: int = 8 * w

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x)


def create_backbone(name: str, *, in_channels: int = 3, small_images: bool = False) -> nn.Module:
    """Build an encoder by name: ``resnet18|34|50``, ``small_cnn`` or ``timm:<model>``.

    The returned module maps (B, C, H, W) images to (B, num_features) features and exposes
    ``.num_features``.
    """
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1 (1 grayscale, 3 RGB), got {in_channels}")
    if name in _RESNETS:
        return ResNetTrunk(name, in_channels=in_channels, small_images=small_images)
    if name == "small_cnn":
        return SmallCNN(in_channels=in_channels)
    if name.startswith("timm:"):
        if importlib.util.find_spec("timm") is None:
            raise ValueError(f"backbone {name!r} needs timm: pip install timm")
        import timm

        if not timm.is_model(name[5:]):
            raise ValueError(
                f"timm has no model {name[5:]!r}; list names with timm.list_models('*pattern*')"
            )
        model: nn.Module = timm.create_model(name[5:], num_classes=0, in_chans=in_channels)
        return model
    raise ValueError(
        f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)} or timm:<name>"
    )


def count_parameters(module: nn.Module) -> int:
    """Number of parameters (trainable or not) of ``module``."""
    return sum(p.numel() for p in module.parameters())


__all__ = ["BACKBONES", "ResNetTrunk", "SmallCNN", "count_parameters", "create_backbone"]
