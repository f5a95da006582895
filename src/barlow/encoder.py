"""The encoder a config describes: the method around a fresh backbone, fit to the dataset."""

from __future__ import annotations

import json

from barlow import data
from barlow.backbones import create_backbone
from barlow.config import Config
from barlow.methods import Method, create_method


def crop_size(cfg: Config) -> int:
    """The side of the images the encoder sees: ``data.crop_size``, else the dataset's size."""
    return cfg.data.crop_size or data.dataset_info(cfg.data.dataset).image_size


def build_method(cfg: Config) -> Method:
    """``cfg.method`` around a fresh ``cfg.model`` backbone with the dataset's channels
    (``small_images`` auto: images ≤ 64 px get the 3×3 stem without max-pool) and crop size
    (what a fixed-size timm model is built for)."""
    info, crop = data.dataset_info(cfg.data.dataset), crop_size(cfg)
    small = cfg.model.small_images if cfg.model.small_images is not None else crop <= 64
    backbone = create_backbone(
        cfg.model.backbone,
        in_channels=info.channels,
        small_images=small,
        image_size=crop,
        width=cfg.model.width,
        grid=cfg.model.feature_grid,
    )
    return create_method(cfg.method.name, cfg.method.params, backbone)


def weightless_settings(cfg: Config) -> dict[str, str]:
    """What a backbone file records besides its tensors (safetensors metadata is str → str):
    small_cnn's ``feature_grid``, which has no weights (JSON; "null" is global pooling), so
    ``torch.hub`` and other readers rebuild the same encoder from the file alone."""
    return {"feature_grid": json.dumps(cfg.model.feature_grid)}
