"""Contrastive Multiview Coding (Tian, Krishnan & Isola, ECCV 2020, arXiv:1906.05849)."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from barlow.heads import mlp
from barlow.losses import multiview_info_nce_loss
from barlow.methods.base import Method, StepOutput

# sRGB (linear) → CIE XYZ under the D65 white point (IEC 61966-2-1), and that white point.
_RGB_TO_XYZ = (
    (0.4124564, 0.3575761, 0.1804375),
    (0.2126729, 0.7151522, 0.0721750),
    (0.0193339, 0.1191920, 0.9503041),
)
_D65_WHITE = (0.95047, 1.0, 1.08883)
# L* lies in [0, 100]; over the sRGB cube a* lies in about [−86, 98] and b* in [−108, 95].
_L_CENTRE, _L_HALF_RANGE, _AB_SCALE = 50.0, 50.0, 110.0


def rgb_to_lab(rgb: Tensor) -> Tensor:
    """sRGB images in [0, 1], (B, 3, H, W), to CIE L*a*b* (D65), at least float32: L in [0, 100].

    Linearise each channel, c ≤ 0.04045 ? c / 12.92 : ((c + 0.055) / 1.055)^2.4; XYZ = M·rgb with
    the sRGB matrix M; divide by the white point (Xn, Yn, Zn); with f(t) = t^(1/3) for t > δ³ and
    t / (3δ²) + 4/29 otherwise (δ = 6/29):

        L = 116·f(Y/Yn) − 16,   a = 500·(f(X/Xn) − f(Y/Yn)),   b = 200·(f(Y/Yn) − f(Z/Zn)).

    Written out because torch and torchvision have no Lab conversion. Values outside [0, 1] are
    clamped. Elementwise only, so autocast leaves it in float32.
    """
    if rgb.ndim != 4 or rgb.shape[1] != 3:
        raise ValueError(f"rgb_to_lab needs (B, 3, H, W) RGB images, got shape {tuple(rgb.shape)}")
    c = rgb.to(torch.promote_types(rgb.dtype, torch.float32)).clamp(0.0, 1.0)
    linear = torch.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055).pow(2.4))
    matrix = c.new_tensor(_RGB_TO_XYZ).view(1, 3, 3, 1, 1)
    white = c.new_tensor(_D65_WHITE).view(1, 3, 1, 1)
    xyz = (matrix * linear.unsqueeze(1)).sum(dim=2) / white
    delta = 6.0 / 29.0
    cube_root = xyz.clamp_min(delta**3).pow(1.0 / 3.0)  # clamped: no pow of tiny values
    f = torch.where(xyz > delta**3, cube_root, xyz / (3 * delta**2) + 4.0 / 29.0)
    fx, fy, fz = f.unbind(dim=1)
    return torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], dim=1)


class LabEncoders(nn.Module):
    """CMC's two encoders for colour images: one for the L channel, one for the ab channels.

    forward(x) = cat(f_L(L), f_ab(ab)), shape (B, 2·num_features): the representation the paper
    evaluates. x is a normalised RGB batch; ``mean``/``std`` undo that normalisation before the
    Lab conversion, then L ↦ L/50 − 1 and ab ↦ ab/110 bring the channels to about [−1, 1].
    f_L is the given backbone and f_ab a deep copy of it; in both the first Conv2d is replaced by
    a freshly initialised one (PyTorch's default init) taking 1 and 2 channels.
    """

    def __init__(self, backbone: nn.Module, *, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"the Lab split needs RGB mean/std, got mean {mean} and std {std}")
        ab_encoder = copy.deepcopy(backbone)
        self.l_encoder = _with_in_channels(backbone, 1)
        self.ab_encoder = _with_in_channels(ab_encoder, 2)
        features: int = backbone.num_features  # type: ignore[assignment]
        self.num_features = 2 * features
        # Not persistent: they come from the method's rgb_stats argument, not from training.
        self.mean: Tensor
        self.std: Tensor
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Normalised RGB (B, 3, H, W) → scaled L (B, 1, H, W) and ab (B, 2, H, W).

        At least float32 (float64 stays float64), also under autocast: the conversion is
        elementwise, and the encoders' first convolutions then run in autocast's precision.
        """
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(
                f"CMC's Lab split needs RGB images (B, 3, H, W), got shape {tuple(x.shape)}; "
                "use split='none' for grayscale data"
            )
        with torch.no_grad():
            lab = rgb_to_lab(x * self.std + self.mean)
            lightness = (lab[:, :1] - _L_CENTRE) / _L_HALF_RANGE
            return lightness, lab[:, 1:] / _AB_SCALE

    def forward(self, x: Tensor) -> Tensor:
        lightness, ab = self.split(x)
        return torch.cat([self.l_encoder(lightness), self.ab_encoder(ab)], dim=1)


class CMC(Method):
    """Contrastive multiview coding: InfoNCE between every pair of V views ("full graph").

    z^v = g_v(f_v(x^v)); with û = u/‖u‖ and N images in the global batch,

        L = Σ_{i<j} [ mean_n −log( exp(ẑ^i_nᵀẑ^j_n / τ) / Σ_m exp(ẑ^i_nᵀẑ^j_m / τ) ) + (i ↔ j) ].

    ``split="none"``: the V = ``num_views`` augmented views share the backbone and the projector
    (grayscale or same-kind views). ``split="lab"``: each of the ``num_views`` augmented RGB
    views is converted to Lab and gives two views, L through the given backbone and ab through a
    second encoder (:class:`LabEncoders`, each with its own projector), so V = 2·num_views;
    ``num_views=1`` with the "cmc-lab" views is the paper's ImageNet setting. ``rgb_stats`` names
    the dataset (``barlow.data.DATASETS``) whose mean/std normalised the views, to undo it before
    the conversion. ``embed`` then returns cat(f_L(L), f_ab(ab)), as the paper evaluates.

    Negatives are the other images of the global batch (gathered with gradient across ranks),
    not the paper's memory bank of 16384 features: the in-batch form needs no extra state, is
    exact under DDP, and the follow-up work (SimCLR, MoCo) made batch/queue negatives standard.
    Paper defaults: τ 0.07, a linear 128-d head. ``num_views`` is set per instance: it overrides
    the base class's class-level number of views.
    """

    views = "cmc"

    def __init__(
        self,
        backbone: nn.Module,
        *,
        projector: str = "128",
        temperature: float = 0.07,
        num_views: int = 2,
        split: Literal["none", "lab"] = "none",
        rgb_stats: str = "imagenet",
    ) -> None:
        if split not in ("none", "lab"):
            raise ValueError(f"split must be 'none' or 'lab', got {split!r}")
        if not 0 < temperature < float("inf"):
            raise ValueError(f"temperature must be > 0 (paper: 0.07), got {temperature}")
        least = 1 if split == "lab" else 2
        if num_views < least:
            raise ValueError(
                f"num_views must be >= {least} with split={split!r}, got {num_views}; CMC "
                "contrasts at least 2 views (split='lab' makes 2, L and ab, of each image)"
            )
        num_features: int = backbone.num_features  # type: ignore[assignment]
        if split == "lab":
            backbone = LabEncoders(backbone, **_rgb_stats(rgb_stats))
        super().__init__(backbone)
        self.num_views = num_views  # per instance: K is a hyper-parameter
        self.split: Literal["none", "lab"] = split
        self.temperature = temperature
        heads = 2 if split == "lab" else 1
        self.projectors = nn.ModuleList(mlp(num_features, projector) for _ in range(heads))

    def largest_loss_matrix(self, global_batch: int, world: int) -> tuple[str, tuple[int, int]]:
        """N_local anchors scored against the N samples of the global batch."""
        return "N_local×N logits", (global_batch // world, global_batch)

    def project(self, h: Tensor) -> Tensor:
        """z of the features :meth:`embed` gives: g(h), or with ``split="lab"``
        cat(g_L(h_L), g_ab(h_ab)) of the two encoders' halves of h, shape (B, 2·D)."""
        if len(self.projectors) == 1:
            z: Tensor = self.projectors[0](h)
            return z
        h_l, h_ab = h.chunk(2, dim=1)
        return torch.cat([self.projectors[0](h_l), self.projectors[1](h_ab)], dim=1)

    def forward(self, views: Sequence[Tensor]) -> StepOutput:
        self._check_views(views)
        x = torch.cat(list(views))  # one pass per encoder for all views
        if isinstance(self.backbone, LabEncoders):
            lightness, ab = self.backbone.split(x)
            z_l = self.projectors[0](self.backbone.l_encoder(lightness)).chunk(self.num_views)
            z_ab = self.projectors[1](self.backbone.ab_encoder(ab)).chunk(self.num_views)
            zs = [z for pair in zip(z_l, z_ab, strict=True) for z in pair]
        else:
            zs = list(self.projectors[0](self.backbone(x)).chunk(self.num_views))
        out = multiview_info_nce_loss(zs, self.temperature)
        logs = {"positive_similarity": out.positive_similarity, "accuracy": out.accuracy}
        return StepOutput(loss=out.loss, logs=logs)


def _rgb_stats(name: str) -> dict[str, tuple[float, ...]]:
    from barlow.data import DATASETS  # late import: datasets are not needed to build a method

    info = DATASETS.get(name)
    if info is None or info.channels != 3:
        rgb = [n for n, i in DATASETS.items() if i.channels == 3]
        raise ValueError(
            f"rgb_stats={name!r} is not an RGB dataset; name the dataset whose mean/std "
            f"normalised the views: one of {', '.join(rgb)}"
        )
    return {"mean": info.mean, "std": info.std}


def _with_in_channels(encoder: nn.Module, in_channels: int) -> nn.Module:
    """``encoder`` with its first Conv2d replaced by a freshly initialised one of in_channels."""
    for name, module in encoder.named_modules():
        if isinstance(module, nn.Conv2d):
            if module.groups != 1:
                break
            conv = nn.Conv2d(
                in_channels,
                module.out_channels,
                module.kernel_size,  # type: ignore[arg-type]
                stride=module.stride,  # type: ignore[arg-type]
                padding=module.padding,  # type: ignore[arg-type]
                dilation=module.dilation,  # type: ignore[arg-type]
                bias=module.bias is not None,
                padding_mode=module.padding_mode,
            ).to(module.weight.device, module.weight.dtype)
            parent, _, child = name.rpartition(".")
            setattr(encoder.get_submodule(parent) if parent else encoder, child, conv)
            return encoder
    raise ValueError(
        f"{type(encoder).__name__} has no ordinary first Conv2d to take the L / ab channels; "
        "use a convolutional backbone (resnet18/34/50, small_cnn) with split='lab'"
    )
