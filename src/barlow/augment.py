"""View distributions (``ViewSpec``), the shipped recipes, and their per-sample execution.

A recipe is a tuple of ViewSpecs, one per view. The paper's pair (Zbontar et al., 2021, App. C) is
asymmetric: Gaussian blur with p 1.0 / 0.1 and solarization with p 0.0 / 0.2. Variants are built
with ``dataclasses.replace`` so each distribution parameter has one home.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F
from torchvision.transforms import InterpolationMode, v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ViewSpec:
    """The distribution of one augmented view of a uint8 image.

    Order of operations (paper): random resized crop → horizontal flip → colour jitter (with
    probability ``jitter_p``) → grayscale → Gaussian blur → solarize → normalise.
    """

    crop_size: int = 224
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 1.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def __post_init__(self) -> None:
        for name in ("flip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"ViewSpec.{name} must be a probability in [0, 1], got {p}")
        for name in ("brightness", "contrast", "saturation"):
            if getattr(self, name) < 0:
                raise ValueError(f"ViewSpec.{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.hue <= 0.5:
            raise ValueError(f"ViewSpec.hue must be in [0, 0.5], got {self.hue}")
        lo, hi = self.crop_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(
                f"ViewSpec.crop_scale must satisfy 0 < min <= max <= 1, got {self.crop_scale}"
            )
        for name in ("crop_ratio", "blur_sigma"):
            lo, hi = getattr(self, name)
            if not 0.0 < lo <= hi:
                raise ValueError(
                    f"ViewSpec.{name} must satisfy 0 < min <= max, got {getattr(self, name)}"
                )
        if self.crop_size < 4:
            raise ValueError(f"ViewSpec.crop_size must be >= 4 px, got {self.crop_size}")
        if len(self.mean) != len(self.std):
            raise ValueError(f"ViewSpec mean {self.mean} and std {self.std} differ in length")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"ViewSpec.std must be > 0 per channel, got {self.std}")

    @property
    def blur_kernel(self) -> int:
        """Odd kernel side ≈ 10 % of the crop (23 px at 224, as in the paper)."""
        return max(3, int(0.1 * self.crop_size) // 2 * 2 + 1)


_PAPER_A = ViewSpec(blur_p=1.0, solarize_p=0.0)
_PAPER_B = dataclasses.replace(_PAPER_A, blur_p=0.1, solarize_p=0.2)
# 32-px colour images (CIFAR): blur at this size destroys the image, so it is dropped (as is
# common practice for CIFAR recipes); solarization keeps the paper's asymmetry.
_SMALL_A = dataclasses.replace(_PAPER_A, crop_size=32, blur_p=0.0)
_SMALL_B = dataclasses.replace(_PAPER_B, crop_size=32, blur_p=0.0)
# 28-px grayscale images (Fashion-MNIST, digits): no hue/saturation/grayscale on one channel, and
# a larger minimum crop since an 8 % crop of a 28-px garment is a few pixels.
_GRAY_A = dataclasses.replace(
    _SMALL_A, crop_size=28, crop_scale=(0.2, 1.0), saturation=0.0, hue=0.0, grayscale_p=0.0
)
_GRAY_B = dataclasses.replace(_GRAY_A, solarize_p=0.2)

RECIPES: dict[str, tuple[ViewSpec, ...]] = {
    "barlow": (_PAPER_A, _PAPER_B),
    "barlow-small": (_SMALL_A, _SMALL_B),
    "barlow-gray": (_GRAY_A, _GRAY_B),
}

# --- contrastive recipes ---
# SimCLR (Chen et al., 2020, App. A): crops of 8–100 %, colour distortion of strength 1, i.e.
# jitter (0.8, 0.8, 0.8, 0.2) with p 0.8 and grayscale p 0.2, blur with p 0.5; both views alike.
# CIFAR (App. B.9): strength 0.5 and no blur. Grayscale: the barlow-gray adjustments.
_SIMCLR = dataclasses.replace(
    _PAPER_A, brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2, blur_p=0.5
)
_SIMCLR_SMALL = dataclasses.replace(
    _SIMCLR, crop_size=32, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, blur_p=0.0
)
_SIMCLR_GRAY = dataclasses.replace(
    _SIMCLR_SMALL, crop_size=28, crop_scale=(0.2, 1.0), saturation=0.0, hue=0.0, grayscale_p=0.0
)
# MoCo v2 (Chen et al., 2020, "Improved baselines", §2): crops of 20–100 %, jitter
# (0.4, 0.4, 0.4, 0.1) with p 0.8, grayscale p 0.2, blur with p 0.5; both views alike.
_MOCO = dataclasses.replace(_PAPER_A, crop_scale=(0.2, 1.0), saturation=0.4, blur_p=0.5)
_MOCO_SMALL = dataclasses.replace(_MOCO, crop_size=32, blur_p=0.0)
_MOCO_GRAY = dataclasses.replace(
    _MOCO_SMALL, crop_size=28, saturation=0.0, hue=0.0, grayscale_p=0.0
)
# CMC's L / ab split (Tian et al., 2019; released code for ResNets on ImageNet): one crop of
# 8–100 % and a flip, no colour changes (they would move information between L and ab); the
# method makes the 2 views.
_CMC_LAB = dataclasses.replace(_PAPER_A, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)
for _variant, _simclr, _moco in (
    ("", _SIMCLR, _MOCO),
    ("-small", _SIMCLR_SMALL, _MOCO_SMALL),
    ("-gray", _SIMCLR_GRAY, _MOCO_GRAY),
):
    RECIPES[f"simclr{_variant}"] = (_simclr, _simclr)
    RECIPES[f"moco{_variant}"] = (_moco, _moco)
    # CMC with same-kind views: K SimCLR views through one encoder ("cmc3…" for K = 3).
    RECIPES[f"cmc{_variant}"] = (_simclr, _simclr)
    RECIPES[f"cmc3{_variant}"] = (_simclr, _simclr, _simclr)
RECIPES["cmc-lab"] = (_CMC_LAB,)


def recipe_for(family: str, *, channels: int, image_size: int) -> str:
    """Pick the recipe variant of a family (e.g. ``"barlow"``) that suits the images."""
    if channels == 1 and f"{family}-gray" in RECIPES:
        return f"{family}-gray"
    if image_size <= 64 and f"{family}-small" in RECIPES:
        return f"{family}-small"
    return family


# What ``data.view_changes`` may set: the operations' parameters, not the image geometry and
# normalisation that the dataset decides.
CHANGEABLE = tuple(
    f.name for f in dataclasses.fields(ViewSpec) if f.name not in ("crop_size", "mean", "std")
)


def check_view_changes(changes: Any) -> dict[str, Any]:
    """``data.view_changes`` checked (a table of known settings with values a ViewSpec accepts)
    and with lists made tuples; each refusal names the key and what is valid."""
    if not isinstance(changes, Mapping):
        raise ValueError(
            f"data.view_changes must be a table such as {{solarize_p = 0.0}}, got {changes!r}"
        )
    unknown = sorted(set(changes) - set(CHANGEABLE))
    if unknown:
        raise ValueError(
            f"data.view_changes: unknown view setting(s) {', '.join(unknown)}; choose from "
            f"{', '.join(CHANGEABLE)}"
        )
    pairs = {f.name for f in dataclasses.fields(ViewSpec) if isinstance(f.default, tuple)}
    for key in sorted(pairs & set(changes)):
        value = changes[key]
        if not (isinstance(value, list | tuple) and len(value) == 2):
            raise ValueError(f"data.view_changes: {key} must be a pair [min, max], got {value!r}")
    checked: dict[str, Any] = {
        k: tuple(v) if isinstance(v, list) else v for k, v in changes.items()
    }
    try:
        dataclasses.replace(ViewSpec(), **checked)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"data.view_changes: {exc}") from exc
    return checked


def build_specs(
    recipe: str,
    *,
    crop_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    changes: Mapping[str, Any] | None = None,
) -> tuple[ViewSpec, ...]:
    """The recipe's ViewSpecs with the dataset's crop size and normalisation filled in, and
    ``changes`` (``data.view_changes``, e.g. ``{solarize_p = 0.0}``) applied to every view: one
    operation switched off or tuned without writing a new recipe."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown view recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    changed = check_view_changes(changes or {})
    return tuple(
        dataclasses.replace(s, crop_size=crop_size, mean=tuple(mean), std=tuple(std), **changed)
        for s in RECIPES[recipe]
    )


@dataclass(frozen=True)
class CropRamp:
    """Progressive resolution (``data.start_crop_size``): epoch e (0-based) draws its views at

        s_e = round(start + (full − start) · min(1, e / epochs))

    pixels a side, so an early epoch costs about (s_e / full)² of a full one while the last
    epochs, and every evaluation, see the full side. s_e depends on the epoch alone: a resumed
    run draws the views it would have drawn.
    """

    start: int
    full: int
    epochs: int

    def __post_init__(self) -> None:
        if not 4 <= self.start < self.full:
            raise ValueError(
                f"data.start_crop_size={self.start} must be at least 4 px and below the full "
                f"crop side {self.full} (data.crop_size, else the image size)"
            )
        if self.epochs < 1:
            raise ValueError(f"the crop ramp needs at least 1 epoch, got {self.epochs}")

    def size(self, epoch: int) -> int:
        """The crop side of ``epoch``."""
        return round(self.start + (self.full - self.start) * min(1.0, epoch / self.epochs))

    def specs(self, specs: Sequence[ViewSpec], epoch: int) -> tuple[ViewSpec, ...]:
        """``specs`` at the crop side of ``epoch``."""
        size = self.size(epoch)
        return tuple(dataclasses.replace(s, crop_size=size) for s in specs)


def per_sample_transform(spec: ViewSpec) -> v2.Compose:
    """torchvision.transforms.v2 pipeline drawing one view of a uint8 (C, H, W) image."""
    ops: list[Callable[..., object]] = [
        v2.RandomResizedCrop(
            spec.crop_size,
            scale=spec.crop_scale,
            ratio=spec.crop_ratio,
            interpolation=InterpolationMode.BICUBIC,
            antialias=True,
        ),
        v2.RandomHorizontalFlip(spec.flip_p),
    ]
    if spec.jitter_p > 0:
        jitter = v2.ColorJitter(spec.brightness, spec.contrast, spec.saturation, spec.hue)
        ops.append(v2.RandomApply([jitter], p=spec.jitter_p))
    if spec.grayscale_p > 0:
        ops.append(v2.RandomGrayscale(spec.grayscale_p))
    if spec.blur_p > 0:
        blur = v2.GaussianBlur(spec.blur_kernel, sigma=spec.blur_sigma)
        ops.append(v2.RandomApply([blur], p=spec.blur_p))
    if spec.solarize_p > 0:
        ops.append(v2.RandomSolarize(threshold=128, p=spec.solarize_p))  # uint8 threshold, as PIL's
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(spec.mean, spec.std)]
    return v2.Compose(ops)


class MultiView:
    """Draw one view per spec from the same image: ``image → (view_1, …, view_k)``."""

    def __init__(self, specs: Sequence[ViewSpec]) -> None:
        if not specs:
            raise ValueError("MultiView needs at least one ViewSpec")
        self.specs = tuple(specs)
        self.transforms = [per_sample_transform(s) for s in self.specs]

    def __call__(self, image: Tensor) -> tuple[Tensor, ...]:
        return tuple(t(image) for t in self.transforms)


def normalize_batch(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 or [0, 1] float (B, C, H, W) → normalised float32, on the images' device."""
    if images.ndim != 4 or images.shape[1] != len(mean) or len(mean) != len(std):
        raise ValueError(
            f"normalize_batch needs (B, C, H, W) images with C = len(mean) = len(std); got shape "
            f"{tuple(images.shape)}, mean {tuple(mean)}, std {tuple(std)}"
        )
    x = images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - m) / s


def match_channels(images: Tensor, channels: int) -> Tensor:
    """(B, C, H, W) images with ``channels`` channels: greyscale to RGB repeats the channel, RGB
    to greyscale is ITU-R 601 luma (PIL's "L"), in the images' dtype (uint8 rounded)."""
    have = images.shape[1]
    if have == channels:
        return images
    if (have, channels) == (1, 3):
        return images.expand(-1, 3, -1, -1)
    if (have, channels) == (3, 1):
        luma = torch.tensor([0.299, 0.587, 0.114], device=images.device).view(1, 3, 1, 1)
        grey = (images.float() * luma).sum(1, keepdim=True)
        return grey.round().to(images.dtype) if images.dtype == torch.uint8 else grey
    raise ValueError(
        f"images with {have} channels cannot be given to an encoder of {channels}; barlow "
        "converts between 1 (greyscale) and 3 (RGB) only"
    )


class EvalPreprocess:
    """Deterministic batched preprocessing for evaluation: channels matched to the encoder's,
    resized to the crop size, normalised.

    Images of a fixed size (in-memory datasets) are resized as a batch; image folders are resized
    and centre-cropped per sample in the loader (``eval_sample_transform``) before this runs. An
    encoder evaluated on another dataset than its own (transfer) gets its own dataset's channels
    and normalisation, as a torchvision model pretrained on ImageNet gets ImageNet's.
    """

    def __init__(
        self,
        crop_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        channels: int | None = None,
    ) -> None:
        self.crop_size, self.mean, self.std = crop_size, tuple(mean), tuple(std)
        self.channels = channels or len(self.mean)

    def __call__(self, images: Tensor) -> Tensor:
        x = normalize_batch(match_channels(images, self.channels), self.mean, self.std)
        if x.shape[-1] != self.crop_size or x.shape[-2] != self.crop_size:
            x = F.interpolate(
                x, size=(self.crop_size, self.crop_size), mode="bilinear", antialias=True
            )
        return x


def eval_sample_transform(crop_size: int) -> v2.Compose:
    """Per-sample resize (shorter side to crop·256/224) and centre crop, uint8 kept."""
    return v2.Compose(
        [v2.Resize(round(crop_size * 256 / 224), antialias=True), v2.CenterCrop(crop_size)]
    )


class LinearEvalAugment:
    """The linear-evaluation protocol's training augmentation (random resized crop + flip),
    applied per sample over a uint8 batch, then normalised."""

    def __init__(self, crop_size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        spec = ViewSpec(crop_size=crop_size, mean=tuple(mean), std=tuple(std))
        self.channels = len(spec.mean)
        # Bilinear, as the released evaluation code (torchvision's default); pretraining is bicubic.
        self.crop = v2.Compose(
            [
                v2.RandomResizedCrop(
                    crop_size, scale=spec.crop_scale, interpolation=InterpolationMode.BILINEAR
                ),
                v2.RandomHorizontalFlip(),
            ]
        )
        self.mean, self.std = spec.mean, spec.std

    def __call__(self, images: Tensor) -> Tensor:
        cropped = torch.stack([self.crop(img) for img in match_channels(images, self.channels)])
        return normalize_batch(cropped, self.mean, self.std)
