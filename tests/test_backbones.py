"""The backbone contract: pooled (B, num_features) features for every registered name (timm
models: test_timm_backbone.py)."""

import functools

import pytest
import torch
from torch import nn

from barlow.backbones import BACKBONES, create_backbone

NUM_FEATURES = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "small_cnn": 256}


def test_every_registered_backbone_has_an_expected_width() -> None:
    assert set(BACKBONES) == set(NUM_FEATURES)


@functools.cache
def backbone(name: str, in_channels: int = 3, small_images: bool = False) -> nn.Module:
    """Built once per test session: ResNet initialisation dominates the runtime."""
    torch.manual_seed(0)
    return create_backbone(name, in_channels=in_channels, small_images=small_images)


def check_features(net: nn.Module, name: str, in_channels: int) -> None:
    h = net(torch.randn(2, in_channels, 16, 16))
    assert net.num_features == NUM_FEATURES[name]
    assert h.shape == (2, NUM_FEATURES[name])
    assert torch.isfinite(h).all()


@pytest.mark.parametrize("small_images", [False, True])
@pytest.mark.parametrize("name", BACKBONES)
def test_features_are_pooled_to_num_features(name: str, small_images: bool) -> None:
    check_features(backbone(name, small_images=small_images), name, 3)


@pytest.mark.parametrize("small_images", [False, True])
@pytest.mark.parametrize("name", ["resnet18", "small_cnn"])
def test_one_channel_images_work(name: str, small_images: bool) -> None:
    check_features(backbone(name, 1, small_images), name, 1)


@pytest.mark.parametrize("in_channels", [1, 3])
def test_small_images_stem_is_a_3x3_stride_1_conv_without_max_pool(in_channels: int) -> None:
    net = backbone("resnet18", in_channels, True).net
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert net.conv1.in_channels == in_channels
    assert isinstance(net.maxpool, nn.Identity)


@pytest.mark.parametrize("in_channels", [1, 3])
def test_imagenet_stem_is_a_7x7_stride_2_conv_with_max_pool(in_channels: int) -> None:
    net = backbone("resnet18", in_channels, False).net
    assert net.conv1.kernel_size == (7, 7) and net.conv1.stride == (2, 2)
    assert net.conv1.in_channels == in_channels
    assert isinstance(net.maxpool, nn.MaxPool2d)


def test_small_images_keep_spatial_resolution() -> None:
    # the 3×3 stem keeps 32 px at 32 px into layer1; the ImageNet stem divides it by 4
    x = torch.randn(1, 3, 32, 32)
    small = backbone("resnet18", 3, True).net
    large = backbone("resnet18", 3, False).net
    assert small.maxpool(small.conv1(x)).shape[-1] == 32
    assert large.maxpool(large.conv1(x)).shape[-1] == 8


def test_resnet_residual_branches_start_at_zero() -> None:
    # zero_init_residual=True, as in the reference code: each block starts as the identity
    net = backbone("resnet50").net
    last_bns = [block.bn3 for layer in (net.layer1, net.layer4) for block in layer]
    assert all(torch.count_nonzero(bn.weight) == 0 for bn in last_bns)


def test_no_classifier_is_left() -> None:
    net = backbone("resnet18").net
    assert isinstance(net.fc, nn.Identity)


def test_unknown_name_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="resnet18") as info:
        create_backbone("resnet19")
    assert all(name in str(info.value) for name in BACKBONES)
    assert "timm:" in str(info.value)


def test_small_cnn_width_sets_its_channels_and_other_backbones_refuse_it() -> None:
    wide = create_backbone("small_cnn", in_channels=1, width=48)
    assert wide.num_features == 384
    assert wide(torch.zeros(2, 1, 28, 28)).shape == (2, 384)
    assert create_backbone("small_cnn", in_channels=1).num_features == 256
    with pytest.raises(ValueError, match="only small_cnn takes a width"):
        create_backbone("resnet18", width=48)
    with pytest.raises(ValueError, match="only small_cnn takes a width"):
        create_backbone("small_cnn", width=0)


def test_small_cnn_grid_keeps_each_cell_of_the_last_map() -> None:
    torch.manual_seed(0)
    pooled = create_backbone("small_cnn", in_channels=1, width=8)
    gridded = create_backbone("small_cnn", in_channels=1, width=8, grid=2)
    assert gridded.num_features == 4 * pooled.num_features == 256
    gridded.load_state_dict(pooled.state_dict())  # the same parameters: only the pooling differs
    images = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        cells = gridded.eval()(images).view(3, 64, 2, 2)
        # the mean of the four cells of the 4×4 map is the global average
        torch.testing.assert_close(cells.mean(dim=(2, 3)), pooled.eval()(images))
    with pytest.raises(ValueError, match="only small_cnn takes a grid"):
        create_backbone("resnet18", grid=2)
    with pytest.raises(ValueError, match="only small_cnn takes a grid"):
        create_backbone("small_cnn", grid=0)
    with pytest.raises(ValueError, match=r"at 24 px has only 3 × 3 cells"):
        create_backbone("small_cnn", grid=4, image_size=24)
    assert create_backbone("small_cnn", grid=4, image_size=28).num_features == 256 * 16


def test_bad_in_channels_is_rejected() -> None:
    with pytest.raises(ValueError, match="in_channels"):
        create_backbone("small_cnn", in_channels=0)
