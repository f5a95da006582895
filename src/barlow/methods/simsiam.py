"""SimSiam (Chen & He, 2021, arXiv:2011.10566)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from barlow.heads import mlp, parse_spec
from barlow.health import normalized_std
from barlow.losses import negative_cosine
from barlow.methods.base import Method, StepOutput


class SimSiam(Method):
    """Simple Siamese networks: predict one view's projection from the other's, stop-gradient.

    z = g(f(x)), p = q(z), one network for both views and no momentum encoder:

        L = ½·D(p1, sg(z2)) + ½·D(p2, sg(z1)),   D(p, z) = −cos(p, z)   (batch mean)

    Projector: three Linear layers, BN after each, ReLU after the first two, the last BN without
    affine parameters (paper: 2048-2048-2048). Predictor: a Linear-BN-ReLU bottleneck then a
    Linear with bias back to the projector's width (paper: 512 hidden); ``predictor_hidden``
    gives the hidden widths. Logs ``z_std``: std over the batch of z1/‖z1‖, averaged over
    dimensions, ≈ 1/√D while healthy and 0 on collapse (the paper's Fig. 2; this rank's batch).

    Not supported: the paper keeps the predictor's learning rate constant (not decayed; §4.4);
    here the whole model follows optim's one warm-up + cosine schedule, because the optimizer
    has no per-module schedules.
    """

    views = "moco"  # MoCo v2's symmetric views (Chen & He, 2021, App. A)

    def __init__(
        self,
        backbone: nn.Module,
        *,
        projector: str = "2048-2048-2048",
        predictor_hidden: str = "512",
    ) -> None:
        super().__init__(backbone)
        num_features: int = backbone.num_features  # type: ignore[assignment]
        dim = parse_spec(projector)[-1]
        parse_spec(predictor_hidden)  # fails early, naming the spec
        self.projector = mlp(num_features, projector, last_bn=True)
        self.predictor = mlp(dim, f"{predictor_hidden}-{dim}", bias=True)

    def forward(self, views: Sequence[Tensor]) -> StepOutput:
        self._check_views(views)
        x1, x2 = views
        z1, z2 = self.projector(self.backbone(x1)), self.projector(self.backbone(x2))
        p1, p2 = self.predictor(z1), self.predictor(z2)
        # negative_cosine detaches its second argument: the stop-gradient.
        loss = (negative_cosine(p1, z2) + negative_cosine(p2, z1)) / 2
        with torch.no_grad():
            logs = {"z_std": normalized_std(z1)}
        return StepOutput(loss=loss, logs=logs)
