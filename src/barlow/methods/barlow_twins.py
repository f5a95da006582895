"""Barlow Twins (Zbontar et al., 2021, arXiv:2103.03230)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from barlow.heads import mlp
from barlow.losses import BarlowTwinsPath, barlow_twins_loss
from barlow.methods.base import CorrelationOrGramLoss, Method, StepOutput


class BarlowTwins(CorrelationOrGramLoss, Method):
    """Redundancy reduction: drive the cross-correlation of two views' embeddings to the identity.

    z_a = g(f(x_a)), z_b = g(f(x_b)) with f the backbone and g the projector;
    L = Σ_i (1 − C_ii)² + λ Σ_{i≠j} C_ij², C the batch cross-correlation of the standardised z.
    """

    views = "barlow"

    def __init__(
        self,
        backbone: nn.Module,
        *,
        projector: str = "8192-8192-8192",
        lambd: float = 0.0051,
        loss_path: BarlowTwinsPath = "auto",
    ) -> None:
        super().__init__(backbone)
        if lambd < 0:
            raise ValueError(f"lambd must be >= 0 (paper: 0.0051), got {lambd}")
        num_features: int = backbone.num_features  # type: ignore[assignment]
        self.projector = mlp(num_features, projector)
        self.lambd = lambd
        self.loss_path: BarlowTwinsPath = loss_path

    def forward(self, views: Sequence[Tensor]) -> StepOutput:
        self._check_views(views)
        # Separate passes per view, as the reference code does: BatchNorm statistics stay per view.
        z1 = self.projector(self.backbone(views[0]))
        z2 = self.projector(self.backbone(views[1]))
        out = barlow_twins_loss(z1, z2, self.lambd, path=self.loss_path)
        with torch.no_grad():
            logs = {"on_diag": out.on_diag.detach(), "off_diag": out.off_diag.detach()}
        return StepOutput(loss=out.loss, logs=logs)
