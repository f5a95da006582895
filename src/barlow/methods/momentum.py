"""Target networks that follow the online one: the exponential moving average and its schedule
(BYOL's target, MoCo's key encoder)."""

from __future__ import annotations

import math

import torch
from torch import nn


def momentum_schedule(progress: float, base: float = 0.996, final: float = 1.0) -> float:
    """BYOL's target momentum, cosine-annealed: τ = 1 − (1 − τ_base)(cos(π·progress) + 1)/2."""
    progress = min(max(progress, 0.0), 1.0)
    return final - (final - base) * (math.cos(math.pi * progress) + 1) / 2


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """θ_target ← m·θ_target + (1 − m)·θ_online for parameters; buffers are copied."""
    for t, o in zip(target.parameters(), online.parameters(), strict=True):
        t.lerp_(o.detach(), 1.0 - momentum)
    for tb, ob in zip(target.buffers(), online.buffers(), strict=True):
        tb.copy_(ob)
