"""barlow.batched_views against the per-sample torchvision path (augment.per_sample_transform).

Two halves make "same distribution": the parameters are drawn from the same distributions as
torchvision's (two-sample Kolmogorov–Smirnov and binomial tests, fixed seeds), and given the same
parameters both paths give the same pixels (but for under 1 % of pixels one or two grey levels
apart, where torch's fixed-point uint8 resize rounds differently from float32). Plus exact checks
of single operations.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

import pytest
import torch
from torch import Tensor
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as TF

from barlow.augment import RECIPES, ViewSpec, build_specs, per_sample_transform
from barlow.batched_views import BatchedMultiView, BatchedView, ViewParams

# Every random operation off, full-image crop, mean 0 / std 1: a view is the input / 255.
IDENTITY = dict(
    crop_scale=(1.0, 1.0),
    crop_ratio=(1.0, 1.0),
    flip_p=0.0,
    jitter_p=0.0,
    grayscale_p=0.0,
    blur_p=0.0,
    solarize_p=0.0,
    mean=(0.0, 0.0, 0.0),
    std=(1.0, 1.0, 1.0),
)
GRAY_STATS = dict(mean=(0.0,), std=(1.0,))
KS_C = 1.95  # two-sample Kolmogorov–Smirnov critical value c(α) at α = 0.001
Z_MAX = 4.5  # binomial tolerance in standard errors (two-sided p ≈ 7e-6)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    # Images of a few pixels: intra-op threads only add OpenMP hand-offs, which stall badly when
    # the two cores are shared with other processes.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def identity_spec(size: int, channels: int = 3, **changes: object) -> ViewSpec:
    stats = {} if channels == 3 else GRAY_STATS
    return ViewSpec(crop_size=size, **{**IDENTITY, **stats, **changes})  # type: ignore[arg-type]


def random_images(b: int, c: int, h: int, w: int, seed: int = 0, low: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, 256, (b, c, h, w), dtype=torch.uint8, generator=g)


def unit(images: Tensor) -> Tensor:
    """uint8 → [0, 1] exactly as v2.ToDtype(torch.float32, scale=True)."""
    return images.float().mul_(1.0 / 255)


def levels(view: Tensor) -> Tensor:
    """A view drawn with mean 0 / std 1 back on the 0…255 scale."""
    return view * 255.0


def assert_close_levels(ours: Tensor, theirs: Tensor, most: float = 2.0) -> None:
    """Pixels on the 0…255 scale agree up to torchvision's uint8 rounding: torch's CPU uint8
    resize works in fixed point, so a few pixels are one grey level off, and the second
    (vertical) pass can turn one level into two."""
    diff = (ours - theirs).abs()
    assert diff.max() <= most + 1e-3
    assert (diff > 0.5).float().mean() < 0.02
    assert diff.mean() < 0.02


def ks_statistic(a: Tensor, b: Tensor) -> float:
    """sup_x |F_a(x) − F_b(x)| of the two empirical distribution functions."""
    a, b = a.double().sort().values, b.double().sort().values
    grid = torch.cat([a, b]).unique()
    cdf_a = torch.searchsorted(a, grid, right=True) / len(a)
    cdf_b = torch.searchsorted(b, grid, right=True) / len(b)
    return float((cdf_a - cdf_b).abs().max())


def assert_same_distribution(a: Tensor, b: Tensor, what: str) -> None:
    n, m = len(a), len(b)
    bound = KS_C * math.sqrt((n + m) / (n * m))
    assert ks_statistic(a, b) < bound, f"{what}: KS statistic above {bound:.3f}"


def assert_rate(successes: Tensor, p: float, what: str) -> None:
    n = successes.numel()
    rate = float(successes.float().mean())
    se = math.sqrt(max(p * (1 - p), 1e-12) / n)
    assert abs(rate - p) <= Z_MAX * se + 1e-12, f"{what}: rate {rate:.4f}, expected {p}"


def torchvision_boxes(n: int, h: int, w: int, spec: ViewSpec, seed: int) -> Tensor:
    """(n, 4) top, left, height, width from v2.RandomResizedCrop's own sampler."""
    crop = v2.RandomResizedCrop(spec.crop_size, scale=spec.crop_scale, ratio=spec.crop_ratio)
    probe = [torch.empty(1, h, w)]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        boxes = [crop.make_params(probe) for _ in range(n)]
    return torch.tensor([[b["top"], b["left"], b["height"], b["width"]] for b in boxes])


def batched_params(spec: ViewSpec, n: int, h: int, w: int, seed: int) -> ViewParams:
    return BatchedView(spec).sample(n, h, w, generator=torch.Generator().manual_seed(seed))


# --- parameter distributions against torchvision's samplers -----------------------------------


@pytest.mark.parametrize(
    ("h", "w", "scale", "ratio"),
    [
        (32, 32, (0.08, 1.0), (3 / 4, 4 / 3)),  # the paper's crop
        (24, 40, (0.2, 1.0), (3 / 4, 4 / 3)),  # a wide source
        (16, 16, (0.9, 1.0), (2.5, 3.0)),  # mostly rejected: the centre-crop fallback
    ],
)
def test_crop_boxes_follow_torchvisions_distribution(
    h: int, w: int, scale: tuple[float, float], ratio: tuple[float, float]
) -> None:
    n = 3000
    spec = ViewSpec(crop_size=16, crop_scale=scale, crop_ratio=ratio)
    p = batched_params(spec, n, h, w, seed=1)
    ours = torch.stack([p.top, p.left, p.height, p.width], dim=1)
    theirs = torchvision_boxes(n, h, w, spec, seed=2)
    for boxes in (ours, theirs):
        top, left, bh, bw = boxes.unbind(1)
        assert (bh >= 1).all() and (bw >= 1).all()
        assert (top >= 0).all() and (top + bh <= h).all()
        assert (left >= 0).all() and (left + bw <= w).all()

    def features(boxes: Tensor) -> dict[str, Tensor]:
        top, left, bh, bw = boxes.double().unbind(1)
        return {
            "area fraction": bh * bw / (h * w),
            "aspect ratio": bw / bh,
            "vertical centre": (top + bh / 2) / h,
            "horizontal centre": (left + bw / 2) / w,
        }

    for (name, a), b in zip(features(ours).items(), features(theirs).values(), strict=True):
        assert_same_distribution(a, b, name)
    # the fallback box (here: centred) comes up as often in both
    fallback_ours = (ours == ours[ours[:, 2:].prod(1).argmax()]).all(1).float().mean()
    fallback_theirs = (theirs == ours[ours[:, 2:].prod(1).argmax()]).all(1).float()
    assert_rate(fallback_theirs, float(fallback_ours), "largest box")


def test_jitter_factors_order_and_sigma_follow_torchvisions_distribution() -> None:
    n, spec = 3000, RECIPES["barlow"][1]
    ours = batched_params(spec, n, 32, 32, seed=3)
    jitter = v2.ColorJitter(spec.brightness, spec.contrast, spec.saturation, spec.hue)
    blur = v2.GaussianBlur(spec.blur_kernel, sigma=spec.blur_sigma)
    with torch.random.fork_rng():
        torch.manual_seed(4)
        theirs = [jitter.make_params([]) for _ in range(n)]
        sigmas = torch.tensor([blur.make_params([])["sigma"][0] for _ in range(n)])
    for name, strength, lowest in (
        ("brightness", spec.brightness, 0.0),
        ("contrast", spec.contrast, 0.0),
        ("saturation", spec.saturation, 0.0),
        ("hue", spec.hue, -0.5),
    ):
        centre = 0.0 if name == "hue" else 1.0
        a = getattr(ours, name).double()
        b = torch.tensor([t[f"{name}_factor"] for t in theirs], dtype=torch.float64)
        assert a.min() >= max(lowest, centre - strength) and a.max() <= centre + strength
        assert abs(float(a.mean()) - centre) < Z_MAX * strength / math.sqrt(3 * n)
        assert_same_distribution(a, b, name)
    assert_same_distribution(ours.sigma, sigmas, "blur sigma")
    # every op at every position of the random order with probability 1/4, in both
    for orders in (ours.order, torch.stack([t["fn_idx"] for t in theirs])):
        assert (orders.sort(dim=1).values == torch.arange(4)).all()  # permutations
        for position in range(4):
            for op in range(4):
                assert_rate(orders[:, position] == op, 0.25, f"op {op} at position {position}")


def test_probabilities_of_every_operation() -> None:
    spec = dataclasses.replace(RECIPES["barlow"][1], grayscale_p=0.3, blur_p=0.6)
    p = batched_params(spec, 4000, 32, 32, seed=5)
    for name, prob in (
        ("flip", spec.flip_p),
        ("jitter", spec.jitter_p),
        ("grayscale", spec.grayscale_p),
        ("blur", spec.blur_p),
        ("solarize", spec.solarize_p),
    ):
        assert_rate(getattr(p, name), prob, name)
    # independent draws: jitter and grayscale together as often as the product says
    assert_rate(p.jitter & p.grayscale, spec.jitter_p * spec.grayscale_p, "jitter and grayscale")


@pytest.mark.parametrize(
    ("changes", "low"),
    [
        (dict(flip_p=0.5), 0),
        (dict(jitter_p=0.8, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1), 0),
        (dict(grayscale_p=0.2), 0),
        (dict(blur_p=0.3, blur_sigma=(1.0, 2.0)), 0),
        (dict(solarize_p=0.2), 128),
    ],
)
def test_how_often_each_operation_changes_the_image_in_both_paths(
    changes: dict[str, object], low: int
) -> None:
    # Counted from the outputs alone: the image comes back changed iff the operation ran.
    n, size = 1500, 8
    spec = identity_spec(size, **changes)
    image = random_images(1, 3, size, size, seed=6, low=low)
    plain = unit(image[0])
    batched = BatchedView(spec)(image.expand(n, -1, -1, -1), torch.Generator().manual_seed(7))
    transform = per_sample_transform(spec)
    with torch.random.fork_rng():
        torch.manual_seed(8)
        per_sample = torch.stack([transform(image[0]) for _ in range(n)])
    prob = next(float(v) for k, v in changes.items() if k.endswith("_p"))  # type: ignore[arg-type]
    for views in (batched, per_sample):
        changed = ((views - plain).abs() > 1e-6).flatten(1).any(1)
        assert_rate(changed, prob, f"{changes}")


# --- the same pixels given the same parameters ------------------------------------------------


@pytest.mark.parametrize(
    ("c", "h", "w", "size"),
    [(3, 32, 32, 32), (1, 28, 28, 28), (3, 40, 56, 16), (3, 8, 8, 24), (1, 64, 48, 20)],
)
def test_crop_and_flip_match_torchvision_given_the_same_box(
    c: int, h: int, w: int, size: int
) -> None:
    spec = identity_spec(size, c, crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3), flip_p=0.5)
    images = random_images(24, c, h, w, seed=9)
    view = BatchedView(spec)
    p = view.sample(24, h, w, generator=torch.Generator().manual_seed(10))
    ours = levels(view.apply(images, p))
    expected = []
    for i, image in enumerate(images):
        box = (int(p.top[i]), int(p.left[i]), int(p.height[i]), int(p.width[i]))
        crop = TF.resized_crop(image, *box, [size, size], InterpolationMode.BICUBIC, antialias=True)
        expected.append(crop.flip(-1) if p.flip[i] else crop)
    assert_close_levels(ours, torch.stack(expected).float())


@pytest.mark.parametrize("c", [3, 1])
def test_colour_jitter_matches_torchvision_given_the_same_factors_and_order(c: int) -> None:
    strengths = dict(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)
    spec = identity_spec(16, c, jitter_p=1.0, **strengths)
    images = random_images(32, c, 16, 16, seed=11)
    view = BatchedView(spec)
    p = view.sample(32, 16, 16, generator=torch.Generator().manual_seed(12))
    ours = levels(view.apply(images, p))
    jitter = v2.ColorJitter(**strengths)
    expected = torch.stack(
        [
            jitter.transform(
                image,
                dict(
                    fn_idx=p.order[i],
                    brightness_factor=float(p.brightness[i]),
                    contrast_factor=float(p.contrast[i]),
                    saturation_factor=float(p.saturation[i]),
                    hue_factor=float(p.hue[i]),
                ),
            )
            for i, image in enumerate(images)
        ]
    ).float()
    assert_close_levels(ours, expected)
    assert (ours != images.float()).any()


def test_gaussian_blur_matches_torchvision_given_the_same_sigma() -> None:
    spec = identity_spec(32, blur_p=1.0)
    images = random_images(12, 3, 32, 32, seed=13)
    view = BatchedView(spec)
    p = view.sample(12, 32, 32, generator=torch.Generator().manual_seed(14))
    ours = levels(view.apply(images, p))
    k = spec.blur_kernel
    expected = torch.stack(
        [
            TF.gaussian_blur(image, [k, k], [float(s), float(s)])
            for image, s in zip(images, p.sigma, strict=True)
        ]
    ).float()
    assert_close_levels(ours, expected, most=1.0)  # separable here, a 2-D kernel there


# --- exact single operations -------------------------------------------------------------------


@pytest.mark.parametrize(("h", "size"), [(28, 28), (20, 32), (48, 32)])
def test_all_probabilities_zero_and_full_crop_is_resize_and_normalise(h: int, size: int) -> None:
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    spec = identity_spec(size, mean=mean, std=std)
    images = random_images(6, 3, h, h, seed=15)
    ours = BatchedView(spec)(images)
    resized = TF.resize(images, [size, size], InterpolationMode.BICUBIC, antialias=True)
    expected = TF.normalize(unit(resized), list(mean), list(std))
    assert torch.equal(expected, torch.stack([per_sample_transform(spec)(i) for i in images]))
    if h == size:  # nothing to interpolate: bit for bit
        assert torch.equal(ours, expected)
    else:
        scale = torch.tensor(std).view(3, 1, 1) * 255
        assert_close_levels(ours * scale, expected * scale)


def test_solarize_only_equals_torchvision_solarize() -> None:
    spec = identity_spec(16, solarize_p=1.0)
    images = random_images(8, 3, 16, 16, seed=16)
    expected = unit(TF.solarize(images, 128))
    assert torch.equal(BatchedView(spec)(images), expected)


def test_grayscale_only_equals_torchvision_grayscale() -> None:
    spec = identity_spec(16, grayscale_p=1.0)
    images = random_images(8, 3, 16, 16, seed=17)
    expected = unit(v2.Grayscale(num_output_channels=3)(images))
    assert torch.equal(BatchedView(spec)(images), expected)


def test_flip_only_equals_torch_flip() -> None:
    spec = identity_spec(16, flip_p=1.0)
    images = random_images(8, 3, 16, 16, seed=18)
    assert torch.equal(BatchedView(spec)(images), unit(images.flip(-1)))


def test_one_channel_images_skip_saturation_hue_and_grayscale() -> None:
    spec = identity_spec(12, 1, jitter_p=1.0, brightness=0.0, contrast=0.0, saturation=0.5)
    spec = dataclasses.replace(spec, hue=0.5, grayscale_p=1.0)
    images = random_images(8, 1, 12, 12, seed=19)
    assert torch.equal(BatchedView(spec)(images), unit(images))


# --- the public interface ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("recipe", "c", "source", "crop"),
    [("barlow-gray", 1, 28, 28), ("barlow-small", 3, 32, 32), ("barlow", 3, 40, 24)],
)
def test_multiview_shapes_range_and_reproducibility(
    recipe: str, c: int, source: int, crop: int
) -> None:
    specs = build_specs(recipe, crop_size=crop, mean=[0.5] * c, std=[0.5] * c)
    bmv = BatchedMultiView(specs)
    images = random_images(16, c, source, source, seed=20)
    views = bmv(images, torch.Generator().manual_seed(0))
    again = bmv(images, torch.Generator().manual_seed(0))
    other = bmv(images, torch.Generator().manual_seed(1))
    assert len(views) == len(specs)
    for view, same, different in zip(views, again, other, strict=True):
        assert view.shape == (16, c, crop, crop) and view.dtype == torch.float32
        assert view.min() >= -1.0 - 1e-6 and view.max() <= 1.0 + 1e-6
        assert torch.equal(view, same)
        assert not torch.equal(view, different)
    assert not torch.equal(views[0], views[1])  # each view draws its own parameters


@pytest.mark.parametrize(
    ("images", "match"),
    [
        (torch.zeros(2, 3, 8, 8), "uint8"),
        (torch.zeros(3, 8, 8, dtype=torch.uint8), r"\(B, C, H, W\)"),
        (torch.zeros(2, 1, 8, 8, dtype=torch.uint8), "1 channels"),
        (torch.zeros(0, 3, 8, 8, dtype=torch.uint8), "non-empty"),
    ],
)
def test_bad_images_are_rejected(images: Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        BatchedMultiView(RECIPES["barlow-small"])(images)


def test_bad_specs_and_params_are_rejected() -> None:
    with pytest.raises(ValueError, match="at least one"):
        BatchedMultiView([])
    gray = build_specs("barlow-gray", crop_size=28, mean=[0.5], std=[0.5])[0]
    colour = RECIPES["barlow"][0]
    with pytest.raises(ValueError, match="channels"):
        BatchedMultiView([gray, colour])
    view = BatchedView(colour)
    params = view.sample(4, 8, 8)
    with pytest.raises(ValueError, match="4 samples"):
        view.apply(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), params)
    with pytest.raises(ValueError, match=r"params.to"):
        view.apply(torch.zeros(4, 3, 8, 8, dtype=torch.uint8), params.to("meta"))
    with pytest.raises(ValueError, match="1 or 3 channels"):
        BatchedView(dataclasses.replace(colour, mean=(0.5,) * 4, std=(0.5,) * 4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu_given_the_same_parameters() -> None:
    spec = dataclasses.replace(RECIPES["barlow"][1], crop_size=32, blur_p=0.5, solarize_p=0.5)
    view = BatchedView(spec)
    images = random_images(64, 3, 48, 48, seed=21)
    params = view.sample(64, 48, 48, generator=torch.Generator().manual_seed(22))
    on_cpu = view.apply(images, params)
    on_gpu = view.apply(images.cuda(), params.to("cuda")).cpu()
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    diff = ((on_gpu - on_cpu) * std * 255).abs()
    assert diff.max() <= 2.0 + 1e-3 and diff.mean() < 0.05
    views = BatchedMultiView([spec, spec])(images.cuda(), torch.Generator("cuda").manual_seed(0))
    assert all(v.device.type == "cuda" and v.shape == (64, 3, 32, 32) for v in views)
