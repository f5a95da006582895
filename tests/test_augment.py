"""View recipes, their per-sample execution, and the evaluation preprocessing."""

import dataclasses
import math
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from barlow.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    RECIPES,
    EvalPreprocess,
    LinearEvalAugment,
    MultiView,
    ViewSpec,
    build_specs,
    eval_sample_transform,
    normalize_batch,
    per_sample_transform,
    recipe_for,
)

# Every random operation off: a view is then the (normalised) input itself.
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


def changed_fields(a: ViewSpec, b: ViewSpec) -> set[str]:
    return {
        f.name for f in dataclasses.fields(ViewSpec) if getattr(a, f.name) != getattr(b, f.name)
    }


def random_image(channels: int, size: int, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (channels, size, size), dtype=torch.uint8, generator=g)


def to_unit(view: Tensor) -> Tensor:
    """A view drawn with mean 0 / std 1 back on the uint8 scale."""
    return (view * 255).round()


# --- the recipes -------------------------------------------------------------------------------


def test_barlow_recipe_is_the_papers_asymmetric_pair() -> None:
    a, b = RECIPES["barlow"]
    for spec in (a, b):
        assert spec.crop_size == 224
        assert spec.crop_scale == (0.08, 1.0)
        assert spec.crop_ratio == pytest.approx((3 / 4, 4 / 3))
        assert spec.flip_p == 0.5
        assert (spec.brightness, spec.contrast, spec.saturation, spec.hue) == (0.4, 0.4, 0.2, 0.1)
        assert spec.jitter_p == 0.8
        assert spec.grayscale_p == 0.2
        assert spec.blur_sigma == (0.1, 2.0)
        assert spec.blur_kernel == 23
        assert spec.mean == IMAGENET_MEAN and spec.std == IMAGENET_STD
    assert (a.blur_p, a.solarize_p) == (1.0, 0.0)
    assert (b.blur_p, b.solarize_p) == (0.1, 0.2)
    assert changed_fields(a, b) == {"blur_p", "solarize_p"}


def test_barlow_recipe_crops_with_bicubic_interpolation() -> None:
    crop = per_sample_transform(RECIPES["barlow"][0]).transforms[0]
    assert crop.interpolation.value == "bicubic"


@pytest.mark.parametrize(
    ("variant", "intended"),
    [
        ("barlow-small", {"crop_size", "blur_p"}),
        (
            "barlow-gray",
            {"crop_size", "crop_scale", "blur_p", "saturation", "hue", "grayscale_p"},
        ),
    ],
)
def test_variants_differ_from_the_paper_only_where_intended(
    variant: str, intended: set[str]
) -> None:
    paper, specs = RECIPES["barlow"], RECIPES[variant]
    assert len(specs) == len(paper)
    for ours, theirs in zip(specs, paper, strict=True):
        assert changed_fields(ours, theirs) <= intended
        assert ours.solarize_p == theirs.solarize_p  # the asymmetry survives in every variant
    assert all(s.blur_p == 0.0 for s in specs)


def test_build_specs_fills_crop_and_normalisation_only() -> None:
    specs = build_specs("barlow-small", crop_size=40, mean=[0.1, 0.2, 0.3], std=[0.4, 0.5, 0.6])
    for built, base in zip(specs, RECIPES["barlow-small"], strict=True):
        assert built.crop_size == 40
        assert built.mean == (0.1, 0.2, 0.3) and built.std == (0.4, 0.5, 0.6)
        assert changed_fields(built, base) == {"crop_size", "mean", "std"}


def test_view_changes_apply_to_every_view_and_nothing_else() -> None:
    plain = build_specs("barlow-gray", crop_size=28, mean=(0.5,), std=(0.25,))
    changed = build_specs(
        "barlow-gray",
        crop_size=28,
        mean=(0.5,),
        std=(0.25,),
        changes={"solarize_p": 0.0, "crop_scale": [0.5, 1.0]},
    )
    for before, after in zip(plain, changed, strict=True):
        assert after.solarize_p == 0.0 and after.crop_scale == (0.5, 1.0)
        assert after == dataclasses.replace(before, solarize_p=0.0, crop_scale=(0.5, 1.0))
    assert plain[1].solarize_p > 0  # the recipe's own asymmetry is what was switched off


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.view_changes={solarise_p=0.0}", r"unknown view setting\(s\) solarise_p.*solarize_p"),
        ("data.view_changes={crop_size=16}", r"unknown view setting\(s\) crop_size"),
        ("data.view_changes={flip_p=1.5}", r"flip_p must be a probability"),
        ("data.view_changes={crop_scale=0.5}", r"crop_scale must be a pair \[min, max\]"),
        ("data.view_changes=0.3", r"must be a table such as \{solarize_p = 0.0\}"),
    ],
)
def test_bad_view_changes_are_refused_when_the_config_loads(override: str, message: str) -> None:
    from barlow.config import load_config

    with pytest.raises(ValueError, match=message):
        load_config("fashion-mnist", [override])


def test_build_specs_unknown_recipe_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="barlow-gray"):
        build_specs("simclr-typo", crop_size=32, mean=[0.5], std=[0.5])


@pytest.mark.parametrize(
    ("channels", "size", "expected"),
    [(1, 28, "barlow-gray"), (1, 224, "barlow-gray"), (3, 32, "barlow-small"), (3, 96, "barlow")],
)
def test_recipe_for_fits_the_images(channels: int, size: int, expected: str) -> None:
    assert recipe_for("barlow", channels=channels, image_size=size) == expected


def test_recipe_for_falls_back_to_the_family() -> None:
    assert recipe_for("no-variants", channels=1, image_size=28) == "no-variants"


def test_blur_kernel_is_odd_and_about_a_tenth_of_the_crop() -> None:
    for size in (8, 28, 32, 96, 224, 512):
        k = ViewSpec(crop_size=size).blur_kernel
        assert k % 2 == 1 and k >= 3
        assert abs(k - max(3.0, 0.1 * size)) <= 1


# --- validation --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["flip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p"])
@pytest.mark.parametrize("value", [-0.1, 1.5])
def test_probability_out_of_range_is_rejected(name: str, value: float) -> None:
    with pytest.raises(ValueError, match=name):
        ViewSpec(**{name: value})


@pytest.mark.parametrize("scale", [(0.0, 1.0), (0.5, 0.2), (0.1, 1.5), (-0.1, 0.5)])
def test_bad_crop_scale_is_rejected(scale: tuple[float, float]) -> None:
    with pytest.raises(ValueError, match="crop_scale"):
        ViewSpec(crop_scale=scale)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        (dict(crop_size=2), "crop_size"),
        (dict(crop_ratio=(4 / 3, 3 / 4)), "crop_ratio"),
        (dict(blur_sigma=(0.0, 2.0)), "blur_sigma"),
        (dict(brightness=-0.1), "brightness"),
        (dict(hue=0.6), "hue"),
        (dict(mean=(0.5,), std=(0.5, 0.5)), "differ in length"),
        (dict(mean=(0.5,), std=(0.0,)), "std"),
    ],
)
def test_other_bad_spec_values_are_rejected(kwargs: dict[str, object], key: str) -> None:
    with pytest.raises(ValueError, match=key):
        ViewSpec(**kwargs)


def test_multiview_needs_a_spec() -> None:
    with pytest.raises(ValueError, match="at least one"):
        MultiView([])


# --- the per-sample path -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("recipe", "channels", "image_size", "crop"),
    [
        ("barlow-gray", 1, 28, 28),
        ("barlow-small", 3, 32, 32),
        ("barlow", 3, 224, 224),
        ("barlow-gray", 1, 8, 16),  # digits: 8×8 images upsampled by the crop
        ("barlow", 3, 8, 224),
    ],
)
def test_multiview_shapes_and_dtypes(
    recipe: str, channels: int, image_size: int, crop: int
) -> None:
    torch.manual_seed(0)
    stats = [0.5] * channels
    views = MultiView(build_specs(recipe, crop_size=crop, mean=stats, std=stats))(
        random_image(channels, image_size)
    )
    assert len(views) == 2
    for view in views:
        assert view.shape == (channels, crop, crop)
        assert view.dtype == torch.float32
        assert torch.isfinite(view).all()
        # normalised with mean 0.5 / std 0.5: [0, 1] maps onto [-1, 1]
        assert view.min() >= -1.0 - 1e-6 and view.max() <= 1.0 + 1e-6


def test_views_of_one_image_differ() -> None:
    torch.manual_seed(0)
    a, b = MultiView(RECIPES["barlow-small"])(random_image(3, 32))
    assert not torch.equal(a, b)


def test_all_operations_off_gives_back_the_input() -> None:
    image = random_image(3, 16)
    view = per_sample_transform(ViewSpec(crop_size=16, **IDENTITY))(image)
    assert torch.equal(to_unit(view), image.float())


def test_solarize_p1_inverts_pixels_at_or_above_128() -> None:
    image = random_image(3, 16)
    spec = ViewSpec(crop_size=16, **{**IDENTITY, "solarize_p": 1.0})
    expected = torch.where(image >= 128, 255 - image, image).float()
    assert torch.equal(to_unit(per_sample_transform(spec)(image)), expected)


def test_flip_p1_mirrors_the_width() -> None:
    image = random_image(3, 16)
    spec = ViewSpec(crop_size=16, **{**IDENTITY, "flip_p": 1.0})
    assert torch.equal(to_unit(per_sample_transform(spec)(image)), image.flip(-1).float())


def test_grayscale_p1_makes_channels_equal() -> None:
    image = random_image(3, 16)
    spec = ViewSpec(crop_size=16, **{**IDENTITY, "grayscale_p": 1.0})
    view = per_sample_transform(spec)(image)
    assert torch.equal(view[0], view[1]) and torch.equal(view[1], view[2])
    assert not torch.equal(image[0], image[1])


def application_rate(
    spec: ViewSpec, image: Tensor, applied: Callable[[Tensor], object], draws: int = 2000
) -> float:
    torch.manual_seed(0)
    transform = per_sample_transform(spec)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread, as in a loader worker: on 8×8 images hand-offs dominate
    try:
        hits = sum(bool(applied(to_unit(transform(image)))) for _ in range(draws))
    finally:
        torch.set_num_threads(threads)
    return hits / draws


def assert_binomial(rate: float, p: float, draws: int = 2000) -> None:
    sigma = math.sqrt(p * (1 - p) / draws)
    assert abs(rate - p) < 4.5 * sigma, f"rate {rate:.4f} vs p {p} (σ {sigma:.4f})"


def only(spec: ViewSpec, field: str, **extra: object) -> ViewSpec:
    """``spec`` with every random operation off except ``field`` (kept at the recipe's value)."""
    return dataclasses.replace(
        spec, crop_size=8, **{**IDENTITY, field: getattr(spec, field), **extra}
    )


def test_second_paper_view_solarizes_at_rate_0_2() -> None:
    spec = only(RECIPES["barlow"][1], "solarize_p")
    image = torch.full((3, 8, 8), 200, dtype=torch.uint8)
    assert_binomial(application_rate(spec, image, lambda v: (v == 55).all()), 0.2)


def test_first_paper_view_never_solarizes() -> None:
    spec = only(RECIPES["barlow"][0], "solarize_p")
    image = torch.full((3, 8, 8), 200, dtype=torch.uint8)
    assert application_rate(spec, image, lambda v: (v == 55).any(), draws=200) == 0.0


def test_paper_views_grayscale_at_rate_0_2() -> None:
    spec = only(RECIPES["barlow"][1], "grayscale_p")
    image = random_image(3, 8)
    assert_binomial(application_rate(spec, image, lambda v: torch.equal(v[0], v[1])), 0.2)


def test_paper_views_flip_at_rate_0_5() -> None:
    spec = only(RECIPES["barlow"][0], "flip_p")
    image = random_image(3, 8)
    flipped = image.flip(-1).float()
    assert_binomial(application_rate(spec, image, lambda v: torch.equal(v, flipped)), 0.5)


def test_paper_views_jitter_at_rate_0_8() -> None:
    # brightness alone, on a flat image: a factor within ±0.25 % of 1 rounds back to 200
    spec = only(RECIPES["barlow"][0], "jitter_p", contrast=0.0, saturation=0.0, hue=0.0)
    image = torch.full((3, 8, 8), 200, dtype=torch.uint8)
    assert_binomial(application_rate(spec, image, lambda v: (v != 200).any()), 0.8)


def test_second_paper_view_blurs_at_rate_0_1() -> None:
    # σ ≥ 1 so that every blur spreads a single bright pixel into its neighbours
    spec = only(RECIPES["barlow"][1], "blur_p", blur_sigma=(1.0, 2.0))
    image = torch.zeros(3, 8, 8, dtype=torch.uint8)
    image[:, 4, 4] = 255
    assert_binomial(application_rate(spec, image, lambda v: v[:, 4, 5].sum() > 0), 0.1)


# --- batched helpers and evaluation ------------------------------------------------------------


def test_normalize_batch_matches_the_formula() -> None:
    images = torch.randint(0, 256, (4, 3, 5, 5), dtype=torch.uint8)
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 2.0)
    out = normalize_batch(images, mean, std)
    assert out.dtype == torch.float32
    for c in range(3):
        expected = (images[:, c].double() / 255 - mean[c]) / std[c]
        # float32 against float64: measured 1.7e-7 absolute, 2.3e-7 relative
        torch.testing.assert_close(out[:, c].double(), expected, rtol=1e-6, atol=1e-6)
    # [0, 1] floats are taken as already scaled
    torch.testing.assert_close(normalize_batch(images.float() / 255, mean, std), out)


def test_normalize_batch_rejects_a_channel_mismatch() -> None:
    with pytest.raises(ValueError, match="len\\(mean\\)"):
        normalize_batch(torch.zeros(2, 1, 4, 4), IMAGENET_MEAN, IMAGENET_STD)


def test_eval_preprocess_standardises_each_channel() -> None:
    torch.manual_seed(0)
    mean, std = (0.2, 0.5, 0.7), (0.05, 0.1, 0.15)
    images = torch.randn(64, 3, 16, 16) * torch.tensor(std).view(1, 3, 1, 1)
    images += torch.tensor(mean).view(1, 3, 1, 1)
    out = EvalPreprocess(16, mean, std)(images)
    assert out.shape == images.shape
    # (x − mean) / std itself, not the sample's statistics (whose mean, -0.0175 here, was
    # checked against 0 within 0.02: sampling noise near the bound); measured 1.3e-7
    channel = (1, 3, 1, 1)
    expected = (images.double() - torch.tensor(mean).view(channel)) / torch.tensor(std).view(
        channel
    )
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-6)


def test_eval_preprocess_resizes_to_the_crop() -> None:
    images = torch.full((2, 1, 8, 8), 51, dtype=torch.uint8)
    out = EvalPreprocess(16, [0.0], [1.0])(images)
    assert out.shape == (2, 1, 16, 16)
    torch.testing.assert_close(out, torch.full_like(out, 0.2))  # flat stays flat


def test_eval_preprocess_downsampling_averages_instead_of_aliasing() -> None:
    # a one-pixel checkerboard halved: antialiased resizing gives flat grey, not the pattern
    checker = (torch.arange(16).view(1, 16) + torch.arange(16).view(16, 1)) % 2
    images = (checker * 255).to(torch.uint8).expand(2, 1, 16, 16)
    out = EvalPreprocess(8, [0.0], [1.0])(images)
    assert out.shape == (2, 1, 8, 8)
    # the antialiasing filter's edge rows and columns: measured 0.0102 from flat grey
    torch.testing.assert_close(out, torch.full_like(out, 0.5), atol=0.03, rtol=0)


def test_eval_sample_transform_resizes_then_centre_crops() -> None:
    out = eval_sample_transform(224)(random_image(3, 300)[:, :, :250])
    assert out.shape == (3, 224, 224) and out.dtype == torch.uint8


def test_linear_eval_augment_shape_and_randomness() -> None:
    torch.manual_seed(0)
    images = torch.randint(0, 256, (5, 3, 40, 40), dtype=torch.uint8)
    augment = LinearEvalAugment(32, IMAGENET_MEAN, IMAGENET_STD)
    a, b = augment(images), augment(images)
    assert a.shape == (5, 3, 32, 32) and a.dtype == torch.float32
    assert not torch.equal(a, b)


def test_a_pretraining_run_draws_its_views_with_the_changes() -> None:
    from barlow.config import load_config
    from barlow.training.setup import pretraining_data

    cfg = load_config("digits", ["data.view_changes={flip_p=0.0, jitter_p=0.0}"])
    specs = pretraining_data(cfg, torch.device("cpu")).specs
    assert specs and all(s.flip_p == 0.0 and s.jitter_p == 0.0 for s in specs)
