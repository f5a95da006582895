"""VICReg (Bardes, Ponce & LeCun, 2022, arXiv:2105.04906)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from barlow.heads import mlp
from barlow.losses import vicreg_loss
from barlow.methods.base import CorrelationOrGramLoss, Method, StepOutput


class VICReg(CorrelationOrGramLoss, Method):
    """Variance-Invariance-Covariance Regularisation of the two views' embeddings.

    z = g(f(x)) for each view, and with global-batch statistics (see :func:`vicreg_loss`):

        L = sim_coeff·MSE(z1, z2) + std_coeff·v + cov_coeff·c

    v: hinge max(0, 1 − std) per dimension, averaged; c: squared off-diagonal covariances / D.
    Paper: coefficients 25, 25, 1 and an expander 8192-8192-8192 (Linear-BN-ReLU blocks, last
    Linear plain). Logs the unweighted ``invariance``, ``variance`` and ``covariance`` terms and
    ``z_std``, the mean per-dimension std of z1 on this rank's batch (0 on collapse).
    """

    views = "barlow"  # VICReg uses BYOL's pair, Barlow Twins' recipe (Bardes et al., 2022)

    def __init__(
        self,
        backbone: nn.Module,
        *,
        projector: str = "8192-8192-8192",
        sim_coeff: float = 25.0,
        std_coeff: float = 25.0,
        cov_coeff: float = 1.0,
        loss_path: Literal["auto", "correlation", "gram"] = "auto",
    ) -> None:
        super().__init__(backbone)
        for name, value, paper in (
            ("sim_coeff", sim_coeff, 25.0),
            ("std_coeff", std_coeff, 25.0),
            ("cov_coeff", cov_coeff, 1.0),
        ):
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0 (paper: {paper}), got {value}")
        num_features: int = backbone.num_features  # type: ignore[assignment]
        self.projector = mlp(num_features, projector)
        self.sim_coeff, self.std_coeff, self.cov_coeff = sim_coeff, std_coeff, cov_coeff
        self.loss_path: Literal["auto", "correlation", "gram"] = loss_path

    def forward(self, views: Sequence[Tensor]) -> StepOutput:
        self._check_views(views)
        # Separate passes per view: BatchNorm statistics stay per view.
        z1 = self.projector(self.backbone(views[0]))
        z2 = self.projector(self.backbone(views[1]))
        out = vicreg_loss(
            z1, z2, self.sim_coeff, self.std_coeff, self.cov_coeff, path=self.loss_path
        )
        with torch.no_grad():
            logs = {
                "invariance": out.invariance.detach(),
                "variance": out.variance.detach(),
                "covariance": out.covariance.detach(),
                "z_std": z1.detach().float().std(dim=0).mean(),
            }
        return StepOutput(loss=out.loss, logs=logs)
