"""``model.backbone = "timm:NAME"`` with real timm models: built headless and random, sized for the
crop, trained on the embedded digits, resumed exactly, exported for timm."""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
from torch import nn

from barlow import checkpoint
from barlow.backbones import TimmTrunk, create_backbone
from barlow.compute import Precision
from barlow.config import load_config
from barlow.encoder import build_method
from barlow.training import pretrain
from barlow.training.memory import memory_estimate
from comparisons import assert_identical, rel_err
from runs import FAST, weights

# timm's own test models: a few hundred thousand parameters, fast on 16-px digits on a CPU.
MODEL = "test_resnet"
# fp32: in torch 2.14 on CPU the weight gradient of a bf16 3×3 stride-2 convolution over a 1×1
# map (test_resnet's layer4 on 16-px digits) varies from call to call and is at times non-finite.
RUN = [*FAST, f'model.backbone="timm:{MODEL}"', 'train.precision="fp32"', "train.batch_size=64"]


@functools.cache
def trunk(name: str, in_channels: int = 1, image_size: int = 16) -> nn.Module:
    torch.manual_seed(0)
    return create_backbone(f"timm:{name}", in_channels=in_channels, image_size=image_size)


# test_mambaout's head has a pre-logits layer: 256 features out, timm's num_features is 64
WIDTHS = {"test_resnet": 96, "test_efficientnet": 256, "test_vit": 64, "test_mambaout": 256}


@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("name", sorted(WIDTHS))
def test_features_are_pooled_to_num_features(name: str, in_channels: int) -> None:
    net = trunk(name, in_channels)
    h = net(torch.randn(2, in_channels, 16, 16))
    assert net.num_features == WIDTHS[name]
    assert h.shape == (2, WIDTHS[name]) and torch.isfinite(h).all()
    assert net.training  # the width probe ran in eval mode and left the mode as it was


def test_the_model_is_timms_headless_and_never_pretrained(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, Any]] = []
    create_model = timm.create_model
    monkeypatch.setattr(
        timm, "create_model", lambda *a, **kw: calls.append(kw) or create_model(*a, **kw)
    )
    net = create_backbone(f"timm:{MODEL}", in_channels=1, image_size=16)
    assert calls == [{"pretrained": False, "num_classes": 0, "in_chans": 1}]
    assert isinstance(net, TimmTrunk) and net.net.num_classes == 0
    assert net.net.conv1[0].in_channels == 1


def test_fixed_size_models_are_built_for_the_crop() -> None:
    # test_vit3 is built for 160 px and refuses other sizes unless given img_size
    with pytest.raises(AssertionError, match="doesn't match model"):
        timm.create_model("test_vit3", num_classes=0)(torch.randn(1, 3, 16, 16))
    net = trunk("test_vit3", 3, 16)
    assert net.net.patch_embed.img_size == (16, 16)
    assert net(torch.randn(2, 3, 16, 16)).shape == (2, net.num_features)


@pytest.mark.parametrize("name", ["test_convnext", "test_maxvit", "test_coatnet"])
def test_a_model_that_cannot_take_the_crop_size_is_named_with_it(name: str) -> None:
    with pytest.raises(ValueError, match=f"timm model '{name}' cannot take 16-px images"):
        create_backbone(f"timm:{name}", in_channels=1, image_size=16)


def test_unknown_timm_model_lists_the_closest_names() -> None:
    with pytest.raises(ValueError, match="timm has no model 'test_resnt'; closest: test_resnet"):
        create_backbone("timm:test_resnt")
    with pytest.raises(ValueError, match="not a Hub id or a path"):
        create_backbone("timm:hf-hub:timm/resnet10t")


def test_config_refuses_an_unknown_timm_model_before_any_build() -> None:
    with pytest.raises(ValueError, match=r"model\.backbone: timm has no model 'test_resnt'"):
        load_config("digits", ['model.backbone="timm:test_resnt"'])


def test_missing_timm_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, *args: object) -> object:
        return None if name == "timm" else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(ValueError, match=r"needs timm: pip install barlow\[timm\]"):
        create_backbone(f"timm:{MODEL}")
    with pytest.raises(ValueError, match=r"model\.backbone: .*pip install barlow\[timm\]"):
        load_config("digits", [f'model.backbone="timm:{MODEL}"'])


def test_the_projector_and_memory_preflight_see_the_width_on_meta() -> None:
    cfg = load_config("digits", ['model.backbone="timm:test_mambaout"', 'method.projector="32"'])
    with torch.device("meta"):
        method = build_method(cfg)
    assert method.backbone.num_features == 256
    assert method.projector[0].in_features == 256
    estimate = memory_estimate(method, global_batch=64)
    assert estimate.parameters["backbone"] == sum(
        p.numel() for p in trunk("test_mambaout").parameters()
    )


def test_channels_last_and_bf16_autocast_keep_the_features() -> None:
    """At 32 px no stride-2 convolution sees a 1×1 map (see RUN)."""
    torch.manual_seed(0)
    plain = create_backbone(f"timm:{MODEL}", in_channels=1, image_size=32)
    nhwc = copy.deepcopy(plain).to(memory_format=torch.channels_last)
    x = torch.randn(8, 1, 32, 32)
    x_nhwc = x.contiguous(memory_format=torch.channels_last)
    exact = plain(x)
    assert rel_err(nhwc(x_nhwc), exact) < 1e-5  # another summation order
    with Precision(torch.bfloat16).autocast(torch.device("cpu")):
        mixed = nhwc(x_nhwc)
    mixed.float().square().sum().backward()
    assert mixed.dtype == torch.bfloat16
    assert rel_err(mixed.float(), exact) < 5e-2  # bf16 keeps 8 significant bits
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in nhwc.parameters())


def test_pretrain_then_knn_on_digits(tmp_path: Path) -> None:
    cfg = load_config(
        "digits", [*RUN, "train.max_steps=6", "eval.final=true", "eval.probe_epochs=1"]
    )
    results = pretrain(cfg, tmp_path, progress=False)
    rows = results["evaluation"]
    assert json.loads((tmp_path / "metrics.json").read_text())["evaluation"] == rows
    knn = rows["pretrained"]["knn_top1"]
    assert 0.2 < knn <= 1  # chance is 0.1
    assert rows["random init"]["knn_top1"] > 0.1

    # backbone.safetensors loads into timm's own model once the trunk's "net." is stripped
    exported = checkpoint.load_exported_backbone(tmp_path / "backbone.safetensors")
    trained = weights(tmp_path)
    assert_identical(exported, {k[9:]: v for k, v in trained.items() if k.startswith("backbone.")})
    model = timm.create_model(MODEL, pretrained=False, num_classes=0, in_chans=1)
    model.load_state_dict({k.removeprefix("net."): v for k, v in exported.items()}, strict=True)


def test_resume_continues_exactly(tmp_path: Path) -> None:
    pretrain(
        load_config("digits", [*RUN, "train.max_steps=4"]), tmp_path / "straight", progress=False
    )
    pretrain(load_config("digits", [*RUN, "train.max_steps=2"]), tmp_path / "split", progress=False)
    # the same run, continued to the same step
    resumed = load_config("digits", [*RUN, "train.max_steps=4"])
    pretrain(resumed, tmp_path / "split", resume=True, progress=False)
    assert_identical(weights(tmp_path / "straight"), weights(tmp_path / "split"))
