"""The registry of self-supervised methods (one line per method) and their factory."""

from __future__ import annotations

from typing import TYPE_CHECKING

from barlow.backbones import create_backbone
from barlow.methods.barlow_twins import BarlowTwins
from barlow.methods.base import Method, StepOutput

if TYPE_CHECKING:
    from barlow.config import Config

METHODS: dict[str, type[Method]] = {
    "barlow_twins": BarlowTwins,
}


def create_method(cfg: Config, *, in_channels: int, image_size: int) -> Method:
    """The configured method around a freshly initialised backbone (``small_images`` auto: ≤ 64 px)."""
    small = cfg.model.small_images if cfg.model.small_images is not None else image_size <= 64
    backbone = create_backbone(cfg.model.backbone, in_channels=in_channels, small_images=small)
    return METHODS[cfg.method.name](backbone, **cfg.method.params)


__all__ = ["METHODS", "BarlowTwins", "Method", "StepOutput", "create_method"]
