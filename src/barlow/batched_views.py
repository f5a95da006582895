"""Batched views on the training device: the distributions of ``augment.per_sample_transform``,
drawn for a whole uint8 batch at once.

``BatchedMultiView(specs)(images)`` maps a (B, C, H, W) uint8 batch, on any device, to one
normalised float32 (B, C, s, s) view per spec. Every sample draws its own parameters, vectorised on
the images' device (from ``generator`` when given), from the distributions torchvision's v2
transforms use, and every operation reproduces the torchvision kernel on uint8 images, including
its rounding to integers after each step: pixels are float32 on the 0…255 scale, rounded where
the uint8 path rounds. Given the same parameters both paths give the same pixels but for
rounding (see "Differences left" and ``tests/test_batched_views.py``):

1. Random resized crop: area fraction a ~ U(scale), log-aspect ~ U(log ratio),
   w = round(√(a·H·W·r)), h = round(√(a·H·W/r)); ten candidates per sample, the first with
   0 < w ≤ W and 0 < h ≤ H wins, else torchvision's centre-crop fallback; top ~ U{0…H−h},
   left ~ U{0…W−w}. Crop + resize + horizontal flip are one separable linear map per sample,
   ``view = R_y · image · R_xᵀ`` (two batched matrix products), where R holds the weights of
   torch's antialiased bicubic resize (Keys cubic with a = −0.5, support widened by the scale
   when shrinking, so antialiased as the per-sample path, weights renormalised at the crop
   border): the interpolation of ``v2.RandomResizedCrop(bicubic, antialias=True)``. Flipping
   reverses R_x's rows. As torch's CPU uint8 resize, the horizontal pass comes first and each
   pass is clamped to [0, 255] and rounded.
2. Colour jitter with probability ``jitter_p``: brightness b, contrast c, saturation s
   ~ U(max(0, 1 − strength), 1 + strength), hue shift ~ U(−hue, hue), applied in a uniformly
   random order per sample, each as on uint8: x·b; x·c + (1 − c)·mean(⌊gray(x)⌋);
   x·s + (1 − s)·⌊gray(x)⌋; hue rotation through HSV; each clamped to [0, 255] and truncated.
3. Grayscale with probability ``grayscale_p``: ⌊0.2989 R + 0.587 G + 0.114 B⌋ on all channels.
4. Gaussian blur with probability ``blur_p``: σ ~ U(blur_sigma), kernel side ``spec.blur_kernel``,
   weights ∝ exp(−t²/2σ²), reflect padding, separable, rounded.
5. Solarize with probability ``solarize_p``: x ↦ 255 − x where x ≥ 128.
6. Normalise: (x/255 − mean) / std.

One-channel images skip saturation, hue and grayscale (identities there, as in torchvision).

Differences left: torch's CPU uint8 resize (the per-sample path's) uses fixed-point weights, this
path float32 ones, so under 1 % of crop pixels are one grey level off and about 1 in 10⁵ two
(the vertical pass can widen a one-level difference of the horizontal one); a jitter step can
carry such a difference on. The blur is separable here, a 2-D kernel there: float rounding only.
On CUDA the per-sample path itself would resize in float32 without rounding between passes.
Selecting the samples an operation applies to reads their count back from the device: up to
18 synchronisations per view on CUDA.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

from barlow.augment import ViewSpec

# Colour-jitter operations, in the numbering of v2.ColorJitter's random order.
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3
_CROP_ATTEMPTS = 10  # torchvision's rejection sampling tries ten candidates before its fallback
_LUMA = (0.2989, 0.587, 0.114)  # ITU-R 601-2, as torchvision's rgb_to_grayscale


@dataclass(frozen=True)
class ViewParams:
    """The random parameters of one view for every sample of a batch, each of length B.

    ``order[i]`` is sample i's permutation of (BRIGHTNESS, CONTRAST, SATURATION, HUE); jitter
    factors, ``order`` and ``sigma`` are drawn for every sample and used where the matching
    boolean is true.
    """

    top: Tensor  # int64 crop box, in source pixels
    left: Tensor
    height: Tensor
    width: Tensor
    flip: Tensor  # bool
    jitter: Tensor  # bool
    order: Tensor  # (B, 4) int64
    brightness: Tensor  # float32 factors
    contrast: Tensor
    saturation: Tensor
    hue: Tensor
    grayscale: Tensor  # bool
    blur: Tensor  # bool
    sigma: Tensor  # float32
    solarize: Tensor  # bool

    def to(self, device: torch.device | str) -> ViewParams:
        """The same parameters on another device."""
        moved = {f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)}
        return ViewParams(**moved)


def _check_images(images: Tensor, channels: int, who: str) -> None:
    if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.ndim != 4:
        got = f"{images.dtype} of shape {tuple(images.shape)}" if isinstance(images, Tensor) else ""
        raise ValueError(
            f"{who} needs a uint8 (B, C, H, W) batch, got {got or type(images).__name__}; "
            "pass the raw uint8 images (normalisation happens inside)"
        )
    b, c, h, w = images.shape
    if c != channels:
        raise ValueError(
            f"{who}: images have {c} channels but the spec's mean/std have {channels}; "
            "build the specs with the dataset's mean/std (augment.build_specs)"
        )
    if b < 1 or h < 1 or w < 1:
        raise ValueError(f"{who} needs a non-empty batch, got shape {tuple(images.shape)}")


def _check_generator(generator: torch.Generator | None, device: torch.device) -> None:
    if generator is not None and generator.device.type != device.type:
        raise ValueError(
            f"the generator is on {generator.device} but the images are on {device}; "
            f"create it with torch.Generator(device={str(device)!r})"
        )


def _uniform(
    shape: tuple[int, ...],
    low: float,
    high: float,
    device: torch.device,
    generator: torch.Generator | None,
) -> Tensor:
    return torch.rand(shape, device=device, generator=generator).mul_(high - low).add_(low)


def _jitter_range(strength: float) -> tuple[float, float]:
    """torchvision's factor range for a brightness/contrast/saturation strength."""
    return max(0.0, 1.0 - strength), 1.0 + strength


def _cubic(t: Tensor) -> Tensor:
    """Keys' cubic convolution kernel with a = −0.5 (torch's antialiased bicubic, as PIL)."""
    a = -0.5
    t = t.abs()
    near = ((a + 2) * t - (a + 3)) * t * t + 1
    far = ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
    return torch.where(t < 1, near, torch.where(t < 2, far, torch.zeros_like(t)))


def _resize_matrix(
    start: Tensor, length: Tensor, size_in: int, size_out: int, flip: Tensor | None = None
) -> Tensor:
    """(B, size_out, size_in) weights resizing source pixels [start, start + length) to size_out.

    Output pixel i is centred at c_i = (i + ½)·k in crop coordinates, k = length / size_out; it
    weighs source pixel j by cubic((j + ½ − c_i) / max(k, 1)), inside the crop only, normalised
    to sum to one: the antialiased resize of ``F.interpolate(mode="bicubic", antialias=True)``.
    Only the 2·support + 2 taps around each centre are evaluated, then scattered into the dense
    matrix. ``flip`` (B,) bool reverses the output order of those samples.
    """
    device = start.device
    scale = length.to(torch.float32) / size_out  # (B,)
    stretch = scale.clamp(min=1.0)[:, None, None]
    out = torch.arange(size_out, device=device)
    if flip is not None:
        out = torch.where(flip[:, None], size_out - 1 - out, out)
    centre = scale[:, None] * (out + 0.5)  # (B, size_out)
    # the support 2·max(k, 1) is largest for a crop of the whole source
    taps = math.ceil(4.0 * max(size_in / size_out, 1.0)) + 2
    first = (centre - 2.0 * stretch[:, :, 0] + 0.5).floor_().clamp_(min=0.0)
    j = first[:, :, None] + torch.arange(taps, device=device, dtype=torch.float32)
    weights = _cubic((j + 0.5 - centre[:, :, None]) / stretch)
    weights = weights * (j < length[:, None, None])
    weights = weights / weights.sum(dim=-1, keepdim=True)
    column = (j.long() + start[:, None, None]).clamp_(max=size_in - 1)  # zero weights past the end
    dense = torch.zeros(start.shape[0], size_out, size_in, device=device)
    return dense.scatter_add_(2, column, weights)


def _gray(x: Tensor) -> Tensor:
    """⌊0.2989 R + 0.587 G + 0.114 B⌋ of (n, 3, H, W) integer-valued pixels, as (n, 1, H, W)."""
    r, g, b = x.unbind(dim=1)
    return r.mul(_LUMA[0]).add_(g, alpha=_LUMA[1]).add_(b, alpha=_LUMA[2]).floor_().unsqueeze(1)


def _blend(x: Tensor, other: Tensor, factor: Tensor) -> Tensor:
    """⌊clamp(f·x + (1 − f)·other, 0, 255)⌋ per sample: torchvision's uint8 ``_blend``."""
    f = factor.view(-1, 1, 1, 1)
    return x.mul(f).add_(other * (1.0 - f)).clamp_(0.0, 255.0).floor_()


def _adjust_brightness(x: Tensor, factor: Tensor) -> Tensor:
    """⌊clamp(b·x, 0, 255)⌋."""
    return x.mul(factor.view(-1, 1, 1, 1)).clamp_(0.0, 255.0).floor_()


def _adjust_contrast(x: Tensor, factor: Tensor) -> Tensor:
    """Blend with the image's mean grey level (of ⌊gray⌋ for RGB, of the pixels for one channel)."""
    gray = _gray(x) if x.shape[1] == 3 else x
    return _blend(x, gray.mean(dim=(1, 2, 3), keepdim=True), factor)


def _adjust_saturation(x: Tensor, factor: Tensor) -> Tensor:
    """Blend (n, 3, H, W) with its own ⌊gray⌋."""
    return _blend(x, _gray(x), factor)


def _adjust_hue(x: Tensor, shift: Tensor) -> Tensor:
    """Rotate the hue of (n, 3, H, W) integer-valued pixels by ``shift`` turns (HSV round trip).

    With M = max(R, G, B), m = min, Δ = M − m, the hue in sixths of a turn is
    6h = (G − B)/Δ if M = R, (B − R)/Δ + 2 if M = G, (R − G)/Δ + 4 otherwise (torchvision's
    precedence). Shifted by 6·shift, it maps back to channel_n = M − Δ·clamp(min(k, 4 − k), 0, 1)
    with k = (n + 6h) mod 6 and n = 5, 3, 1 for R, G, B: torchvision's HSV sector table
    (v = M, v·s = Δ) in closed form. Ends with its float → uint8 conversion ⌊255.999·x/255⌋.
    Masks come from clamped differences of integers, not comparisons: ``where`` and ``remainder``
    are several times slower than arithmetic on CPU.
    """
    r, g, b = x.unbind(dim=1)
    maxc = torch.maximum(torch.maximum(r, g), b)
    spread = maxc - torch.minimum(torch.minimum(r, g), b)
    not_red = (maxc - r).clamp_(max=1.0)  # 0 where M = R, else 1 (integer values)
    not_green = (maxc - g).clamp_(max=1.0)
    green = not_red * (1.0 - not_green)
    blue = not_red * not_green
    hue6 = (g - b).mul_(1.0 - not_red).add_((b - r).mul_(green)).add_((r - g).mul_(blue))
    # grey pixels (Δ = 0) get some hue and come back unchanged: Δ multiplies every change
    hue6 = hue6.div_(spread.clamp(min=1.0)).add_(green.mul_(2.0)).add_(blue.mul_(4.0))
    hue6 = hue6.add_(6.0 * shift.view(-1, 1, 1))
    sector_offsets = torch.tensor([5.0, 3.0, 1.0], device=x.device).view(1, 3, 1, 1)
    k = hue6.unsqueeze(1) + sector_offsets  # (n, 3, H, W): R, G, B at once
    k = k.sub_((k * (1.0 / 6.0)).floor_().mul_(6.0))  # k mod 6
    ramp = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    rgb = ramp.mul_(spread.unsqueeze(1).neg()).add_(maxc.unsqueeze(1))  # M − Δ·ramp
    return rgb.mul_(255.999 / 255.0).floor_()


def _gaussian_blur(x: Tensor, sigma: Tensor, kernel: int) -> Tensor:
    """Blur (n, C, H, W) with a per-sample Gaussian of std ``sigma`` (n,), reflect padding.

    Separable: one grouped 1-D convolution per axis, every (sample, channel) its own group.
    """
    n, c, h, w = x.shape
    radius = kernel // 2
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=torch.float32)
    weights = torch.softmax(-(offsets[None, :] ** 2) / (2.0 * sigma[:, None] ** 2), dim=1)
    weights = weights.repeat_interleave(c, dim=0)  # (n·C, kernel)
    y = F.pad(x.reshape(1, n * c, h, w), (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, weights.view(n * c, 1, kernel, 1), groups=n * c)
    y = F.conv2d(y, weights.view(n * c, 1, 1, kernel), groups=n * c)
    return y.view(n, c, h, w).round_()


def _apply_to(x: Tensor, select: Tensor, fn: Callable[..., Tensor], *args: Tensor) -> None:
    """x[select] = fn(x[select], *args[select]) in place, skipping an empty selection.

    Working on the selected samples only costs a read-back of their count (``nonzero``: a
    synchronisation on CUDA) but no work on the others.
    """
    index = select.nonzero().squeeze(1)
    if index.numel() == 0:
        return
    chosen = (a.index_select(0, index) for a in args)
    x.index_copy_(0, index, fn(x.index_select(0, index), *chosen))


class BatchedView:
    """One view of a ``ViewSpec``, drawn for a whole uint8 batch on its device.

    ``view(images, generator=None)``: (B, C, H, W) uint8 → (B, C, s, s) float32, normalised.
    ``sample`` and ``apply`` split the two halves (parameters, then pixels) for inspection.
    """

    def __init__(self, spec: ViewSpec) -> None:
        if not isinstance(spec, ViewSpec):
            raise ValueError(f"BatchedView needs a ViewSpec, got {type(spec).__name__}")
        if len(spec.mean) not in (1, 3) and (spec.jitter_p > 0 or spec.grayscale_p > 0):
            raise ValueError(
                f"colour jitter and grayscale need 1 or 3 channels, the spec has {len(spec.mean)}; "
                "set jitter_p and grayscale_p to 0 for other images"
            )
        self.spec = spec

    def __call__(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        _check_images(images, len(self.spec.mean), "BatchedView")
        _check_generator(generator, images.device)
        b, _, h, w = images.shape
        params = self.sample(b, h, w, device=images.device, generator=generator)
        return self._apply(images.to(torch.float32), params)

    def sample(
        self,
        batch: int,
        height: int,
        width: int,
        *,
        device: torch.device | str = "cpu",
        generator: torch.Generator | None = None,
    ) -> ViewParams:
        """Draw every sample's parameters for a batch of ``batch`` images of height × width."""
        spec, device = self.spec, torch.device(device)
        _check_generator(generator, device)
        if batch < 1 or height < 1 or width < 1:
            raise ValueError(f"sample needs batch, height, width >= 1, got {batch, height, width}")
        top, left, crop_h, crop_w = self._sample_crops(batch, height, width, device, generator)

        def coin(p: float) -> Tensor:
            return torch.rand(batch, device=device, generator=generator) < p

        flip, jitter = coin(spec.flip_p), coin(spec.jitter_p)
        order = torch.rand((batch, 4), device=device, generator=generator).argsort(dim=1)
        factors = [
            _uniform((batch,), *_jitter_range(strength), device, generator)
            for strength in (spec.brightness, spec.contrast, spec.saturation)
        ]
        hue = _uniform((batch,), -spec.hue, spec.hue, device, generator)
        grayscale, blur = coin(spec.grayscale_p), coin(spec.blur_p)
        sigma = _uniform((batch,), *spec.blur_sigma, device, generator)
        return ViewParams(
            top=top,
            left=left,
            height=crop_h,
            width=crop_w,
            flip=flip,
            jitter=jitter,
            order=order,
            brightness=factors[0],
            contrast=factors[1],
            saturation=factors[2],
            hue=hue,
            grayscale=grayscale,
            blur=blur,
            sigma=sigma,
            solarize=coin(spec.solarize_p),
        )

    def _sample_crops(
        self,
        batch: int,
        height: int,
        width: int,
        device: torch.device,
        generator: torch.Generator | None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """v2.RandomResizedCrop's box distribution, ten candidates per sample at once."""
        spec = self.spec
        # float64 for the box sides, as torchvision computes them in Python floats
        real = torch.float32 if device.type == "mps" else torch.float64
        shape = (batch, _CROP_ATTEMPTS)
        area = _uniform(shape, *spec.crop_scale, device, generator).to(real) * (height * width)
        log_lo, log_hi = (math.log(r) for r in spec.crop_ratio)
        ratio = _uniform(shape, log_lo, log_hi, device, generator).exp_().to(real)
        w = (area * ratio).sqrt_().round_().long()
        h = (area / ratio).sqrt_().round_().long()
        valid = (w > 0) & (w <= width) & (h > 0) & (h <= height)
        first = valid.to(torch.uint8).argmax(dim=1, keepdim=True)  # first valid candidate
        found = valid.any(dim=1)
        fallback_h, fallback_w = self._fallback(height, width)
        h = torch.where(found, h.gather(1, first).squeeze(1), fallback_h)
        w = torch.where(found, w.gather(1, first).squeeze(1), fallback_w)
        u = torch.rand((2, batch), device=device, generator=generator)
        # top ~ U{0, …, H − h}; centred for the fallback, as torchvision
        top = torch.where(found, (u[0] * (height - h + 1)).long(), (height - h) // 2)
        left = torch.where(found, (u[1] * (width - w + 1)).long(), (width - w) // 2)
        return top.clamp_(max=height - h), left.clamp_(max=width - w), h, w

    def _fallback(self, height: int, width: int) -> tuple[int, int]:
        """torchvision's central crop after ten rejected candidates: the ratio clamped."""
        lo, hi = self.spec.crop_ratio
        if width / height < lo:
            return round(width / lo), width
        if width / height > hi:
            return height, round(height * hi)
        return height, width

    def apply(self, images: Tensor, params: ViewParams) -> Tensor:
        """The view of uint8 (B, C, H, W) ``images`` under given ``params``."""
        _check_images(images, len(self.spec.mean), "BatchedView.apply")
        if params.top.shape != (images.shape[0],):
            raise ValueError(
                f"params are for {params.top.shape[0]} samples, images hold {images.shape[0]}; "
                "sample them with the batch's size"
            )
        if params.top.device != images.device:
            raise ValueError(
                f"params are on {params.top.device}, images on {images.device}; "
                "move them with params.to(images.device)"
            )
        return self._apply(images.to(torch.float32), params)

    def _apply(self, x: Tensor, params: ViewParams) -> Tensor:
        """x: float32 (B, C, H, W) integer-valued pixels in [0, 255]."""
        spec = self.spec
        b, c, h, w = x.shape
        size = spec.crop_size
        if h == w:  # both matrices in one go: half the (small) operations
            both = _resize_matrix(
                torch.cat([params.top, params.left]),
                torch.cat([params.height, params.width]),
                h,
                size,
                torch.cat([torch.zeros_like(params.flip), params.flip]),
            )
            rows, cols = both[:b], both[b:]
        else:
            rows = _resize_matrix(params.top, params.height, h, size)  # (B, s, H)
            cols = _resize_matrix(params.left, params.width, w, size, params.flip)  # (B, s, W)
        # horizontal pass, then vertical, each rounded to uint8 values as torch's CPU uint8 resize
        y = torch.bmm(x.reshape(b, c * h, w), cols.transpose(1, 2)).view(b, c, h, size)
        y = torch.matmul(rows[:, None], y.clamp_(0.0, 255.0).round_())
        y = y.clamp_(0.0, 255.0).round_()  # (B, C, s, s)

        if spec.jitter_p > 0:
            self._jitter(y, params)
        if spec.grayscale_p > 0 and c == 3:
            _apply_to(y, params.grayscale, lambda z: _gray(z).expand(-1, 3, -1, -1))
        if spec.blur_p > 0:
            kernel = spec.blur_kernel
            _apply_to(y, params.blur, lambda z, s: _gaussian_blur(z, s, kernel), params.sigma)
        if spec.solarize_p > 0:  # x ↦ 255 − x where x ≥ 128, as arithmetic on integer values
            bright = (y - 127.0).clamp_(0.0, 1.0).mul_(params.solarize.view(-1, 1, 1, 1))
            y = y.add_(bright.mul_(255.0 - 2.0 * y))

        mean = torch.tensor(spec.mean, device=y.device).view(1, c, 1, 1)
        std = torch.tensor(spec.std, device=y.device).view(1, c, 1, 1)
        return y.mul_(1.0 / 255.0).sub_(mean).div_(std)

    def _jitter(self, y: Tensor, params: ViewParams) -> None:
        """Colour jitter in each sample's own random order, one position of the order at a time:
        at position k, every operation runs on the samples that have it k-th."""
        spec, colour = self.spec, y.shape[1] == 3
        # torchvision skips an operation whose strength is 0; saturation and hue are identities
        # on one channel
        ops = [
            (op, fn, factor)
            for op, fn, factor, used in (
                (BRIGHTNESS, _adjust_brightness, params.brightness, spec.brightness > 0),
                (CONTRAST, _adjust_contrast, params.contrast, spec.contrast > 0),
                (SATURATION, _adjust_saturation, params.saturation, colour and spec.saturation > 0),
                (HUE, _adjust_hue, params.hue, colour and spec.hue > 0),
            )
            if used
        ]
        for position in range(4):
            op_here = torch.where(params.jitter, params.order[:, position], -1)
            for op, fn, factor in ops:
                _apply_to(y, op_here == op, fn, factor)


class BatchedMultiView:
    """Draw one batched view per spec from the same uint8 batch: ``images → (view_1, …)``.

    The batched counterpart of ``augment.MultiView``: (B, C, H, W) uint8 on any device →
    tuple of (B, C, s_k, s_k) float32, each sample with its own parameters per view.
    """

    def __init__(self, specs: Sequence[ViewSpec]) -> None:
        if not specs:
            raise ValueError("BatchedMultiView needs at least one ViewSpec")
        channels = {len(s.mean) for s in specs}
        if len(channels) != 1:
            raise ValueError(
                f"BatchedMultiView specs disagree on the number of channels ({sorted(channels)}); "
                "give every spec the dataset's mean/std"
            )
        self.views = tuple(BatchedView(s) for s in specs)
        self.specs = tuple(specs)

    def __call__(
        self, images: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, ...]:
        _check_images(images, len(self.specs[0].mean), "BatchedMultiView")
        _check_generator(generator, images.device)
        b, _, h, w = images.shape
        x = images.to(torch.float32)  # once, shared by the views
        return tuple(
            view._apply(x, view.sample(b, h, w, device=images.device, generator=generator))
            for view in self.views
        )
