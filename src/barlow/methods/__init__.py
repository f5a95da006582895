"""The registry of self-supervised methods (one line per method) and their factory."""

from __future__ import annotations

from typing import TYPE_CHECKING

from barlow.backbones import create_backbone
from barlow.methods.barlow_twins import BarlowTwins
from barlow.methods.base import Method, StepOutput
from barlow.methods.byol import BYOL
from barlow.methods.cmc import CMC
from barlow.methods.moco import MoCo
from barlow.methods.simclr import SimCLR
from barlow.methods.simsiam import SimSiam
from barlow.methods.vicreg import VICReg

if TYPE_CHECKING:
    from barlow.config import Config

METHODS: dict[str, type[Method]] = {
    "barlow_twins": BarlowTwins,
    "byol": BYOL,
    "cmc": CMC,
    "moco": MoCo,
    "simclr": SimCLR,
    "simsiam": SimSiam,
    "vicreg": VICReg,
}


def create_method(cfg: Config, *, in_channels: int, image_size: int) -> Method:
    """The configured method around a fresh backbone (``small_images`` auto: ≤ 64 px images)."""
    small = cfg.model.small_images if cfg.model.small_images is not None else image_size <= 64
    backbone = create_backbone(cfg.model.backbone, in_channels=in_channels, small_images=small)
    return METHODS[cfg.method.name](backbone, **cfg.method.params)


__all__ = [
    "BYOL",
    "CMC",
    "METHODS",
    "BarlowTwins",
    "Method",
    "MoCo",
    "SimCLR",
    "SimSiam",
    "StepOutput",
    "VICReg",
    "create_method",
]
