"""Encoders: ``create_backbone(name)`` returns a module giving pooled (B, num_features) features."""

from __future__ import annotations

import difflib
import importlib.util
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models import resnet

_RESNETS = {"resnet18": resnet.resnet18, "resnet34": resnet.resnet34, "resnet50": resnet.resnet50}
BACKBONES = (*_RESNETS, "small_cnn")
TIMM_PREFIX = "timm:"


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
    """A 4-block conv net for 16–32 px images on a CPU (at width 32: ≈0.39 M parameters, 256
    features).

    Each block is Conv3×3-BN-ReLU with w, 2w, 4w, 8w channels; blocks 2, 3 and 4 halve the
    resolution (28 → 28, 14, 7, 4 px); global average pooling. At w = 32 about 12 M
    multiply-adds per 28-px image, most of them in blocks 2–4; parameters and multiply-adds grow
    as w².

    ``grid`` g > 1 average-pools the last map to g × g cells instead of one and concatenates
    them: num_features = 8w·g², the same parameters and compute. The features then keep where in
    the image a part was (collar above, hem below), which a centred-object dataset such as
    Fashion-MNIST rewards (bench/results/fast_recipe.md); g = 1 is translation-invariant.
    """

    def __init__(self, *, in_channels: int = 1, width: int = 32, grid: int = 1) -> None:
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
            nn.AdaptiveAvgPool2d(grid),
            nn.Flatten(),
        )
        self.num_features: int = 8 * w * grid * grid

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x)


def small_cnn_map_side(image_size: int) -> int:
    """The side of :class:`SmallCNN`'s last map: its three stride-2 3×3 convs (padding 1) give
    ⌈n/2⌉ each, so ⌈n/8⌉ (28 px → 4, 24 px → 3)."""
    return -(-image_size // 8)


def timm_model_name(backbone: str) -> str:
    """The timm model of ``backbone = "timm:NAME"``: NAME, checked against timm's registry.

    Raises ValueError naming ``pip install barlow[timm]`` when timm is missing, and the closest
    registered names when timm has no model NAME (architectures only: nothing is fetched from
    the Hugging Face Hub or a folder).
    """
    name = backbone.removeprefix(TIMM_PREFIX)
    if importlib.util.find_spec("timm") is None:
        raise ValueError(f"backbone {backbone!r} needs timm: pip install barlow[timm]")
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.5)
        hint = f"; closest: {', '.join(close)}" if close else ""
        remote = ":" in name or "/" in name
        source = " (give a registered architecture, not a Hub id or a path)" if remote else ""
        raise ValueError(
            f"timm has no model {name!r}{source}{hint}; "
            "timm.list_models('*pattern*') lists the names"
        )
    return name


def _size_error(name: str, image_size: int, reason: str) -> ValueError:
    return ValueError(
        f"timm model {name!r} cannot take {image_size}-px images ({reason}); "
        "choose another data.crop_size or another model"
    )


class TimmTrunk(nn.Module):
    """A timm model without its classifier (``num_classes=0``), randomly initialised.

    Weights are never downloaded: ``pretrained=False`` always, and there is no option for timm's
    pretrained weights (a tag such as ``resnet50.a1_in1k`` picks only the architecture's config).
    Models with a fixed input size (ViTs) are built for ``image_size`` (timm's ``img_size``).
    ``num_features`` is the width of the pooled output, measured by one forward pass of a blank
    image at ``image_size`` in eval mode (so it is ``head_hidden_size`` where timm's head has a
    pre-logits layer, e.g. MobileNetV3); a model that cannot take that size fails here. The
    timm model sits under ``.net``: strip ``net.`` from an exported state dict to load it into
    ``timm.create_model(NAME, num_classes=0, in_chans=C)`` (and ``img_size`` if fixed-size).
    """

    def __init__(self, name: str, *, in_channels: int = 3, image_size: int | None = None) -> None:
        super().__init__()
        import timm
        from timm.models import get_pretrained_cfg

        try:
            config = get_pretrained_cfg(name)
        except RuntimeError as exc:  # an architecture with an unknown pretrained tag
            raise ValueError(f"timm model {name!r}: {exc}") from exc
        kwargs: dict[str, Any] = {}
        if image_size is not None and config is not None and config.fixed_input_size:
            kwargs["img_size"] = image_size
        if image_size is None:
            image_size = config.input_size[-1] if config is not None else 224
        try:
            self.net: nn.Module = timm.create_model(
                name, pretrained=False, num_classes=0, in_chans=in_channels, **kwargs
            )
        except TypeError as exc:  # a fixed-size model whose constructor takes no img_size
            if "img_size" not in str(exc):
                raise
            reason = "a fixed input size and no img_size argument"
            raise _size_error(name, image_size, reason) from exc
        except Exception as exc:  # timm's size checks raise many kinds (assert, modulo by zero)
            if not kwargs:
                raise
            raise _size_error(name, image_size, f"{type(exc).__name__}: {exc}") from exc
        self.num_features: int = self._probe_width(name, in_channels, image_size)

    def _probe_width(self, name: str, in_channels: int, image_size: int) -> int:
        """The width of the features of one blank image: also the check that the size fits."""
        first = next(self.net.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
        blank = torch.zeros(1, in_channels, image_size, image_size, device=device)
        training = self.net.training
        try:
            # eval: BatchNorm statistics stay untouched and no random numbers are drawn
            with torch.no_grad():
                h = self.net.eval()(blank)
        except Exception as exc:  # as above: a kernel larger than the map, windows that do not tile
            raise _size_error(name, image_size, f"{type(exc).__name__}: {exc}") from exc
        finally:
            self.net.train(training)
        if h.dim() != 2:
            raise ValueError(f"timm model {name!r} gives {tuple(h.shape)} features, not (B, D)")
        return int(h.shape[1])

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.net(x)
        return out


def create_backbone(
    name: str,
    *,
    in_channels: int = 3,
    small_images: bool = False,
    image_size: int | None = None,
    width: int | None = None,
    grid: int | None = None,
) -> nn.Module:
    """Build an encoder by name: ``resnet18|34|50``, ``small_cnn`` or ``timm:<model>``.

    The returned module maps (B, C, H, W) images to (B, num_features) features and exposes
    ``.num_features``. ``small_images`` is for the torchvision ResNets; ``image_size`` (the crop
    side) for timm models, which keep their own stem (see :class:`TimmTrunk`); ``width`` and
    ``grid`` for ``small_cnn`` only (its first block's channels, None: 32; its pooled cells per
    side, None: 1, global average pooling).
    """
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1 (1 grayscale, 3 RGB), got {in_channels}")
    if width is not None and (name != "small_cnn" or width < 1):
        raise ValueError(f"width={width}: only small_cnn takes a width (>= 1), not {name!r}")
    if grid is not None and (name != "small_cnn" or grid < 1):
        raise ValueError(f"grid={grid}: only small_cnn takes a grid (>= 1), not {name!r}")
    cells = small_cnn_map_side(image_size) if image_size is not None else None
    if grid is not None and cells is not None and grid > cells:
        raise ValueError(
            f"grid={grid}: small_cnn's last map at {image_size} px has only {cells} × {cells} "
            f"cells; choose a grid of at most {cells} (a larger one repeats cells)"
        )
    if name in _RESNETS:
        return ResNetTrunk(name, in_channels=in_channels, small_images=small_images)
    if name == "small_cnn":
        given = {"width": width, "grid": grid}
        sized = {k: v for k, v in given.items() if v is not None}  # None: SmallCNN's defaults
        return SmallCNN(in_channels=in_channels, **sized)
    if name.startswith(TIMM_PREFIX):
        model = timm_model_name(name)
        return TimmTrunk(model, in_channels=in_channels, image_size=image_size)
    raise ValueError(
        f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)} or timm:<name>"
    )


def count_parameters(module: nn.Module) -> int:
    """Number of parameters (trainable or not) of ``module``."""
    return sum(p.numel() for p in module.parameters())


__all__ = [
    "BACKBONES",
    "ResNetTrunk",
    "SmallCNN",
    "TimmTrunk",
    "count_parameters",
    "create_backbone",
    "timm_model_name",
]
