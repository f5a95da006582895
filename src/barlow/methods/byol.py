"""BYOL (Grill et al., 2020, arXiv:2006.07733)."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from barlow.heads import mlp, parse_spec
from barlow.health import normalized_std
from barlow.losses import normalized_mse
from barlow.methods.base import Method, StepOutput
from barlow.methods.momentum import ema_update, momentum_schedule


class BYOL(Method):
    """Bootstrap Your Own Latent: an online network predicts a slowly moving target network.

    Online: z = g(f(x)), p = q(z); target: z' = g'(f'(x)) with (f', g') an exponential moving
    average of (f, g). With p̂ = p/‖p‖,

        L = ‖p̂1 − ẑ'2‖² + ‖p̂2 − ẑ'1‖² = (2 − 2·cos(p1, z'2)) + (2 − 2·cos(p2, z'1)),

    each term a batch mean, no gradient into the target. After every optimizer step
    θ' ← τ·θ' + (1 − τ)·θ with τ = 1 − (1 − τ_base)(cos(π·progress) + 1)/2, from
    τ_base = ``target_momentum`` (0.996) to 1; target BatchNorm statistics are copied from the
    online network. Projector and predictor are Linear-BN-ReLU-Linear (4096 hidden, 256 out in the
    paper); ``predictor_hidden`` gives the predictor's hidden widths, its output width is the
    projector's. Logs: ``momentum`` (τ of the last update, a buffer so that ``torch.compile``
    does not specialise on it and a resumed run logs it right) and ``z_std`` (std over the batch
    of ẑ1, averaged over dimensions: about 1/√D while healthy, 0 on collapse; this rank's batch).
    """

    # BYOL's asymmetric pair (Grill et al., 2020, Table 6) is the one Barlow Twins adopted
    views = "barlow"
    momentum: Tensor

    def __init__(
        self,
        backbone: nn.Module,
        *,
        projector: str = "4096-256",
        predictor_hidden: str = "4096",
        target_momentum: float = 0.996,
    ) -> None:
        super().__init__(backbone)
        if not 0 <= target_momentum <= 1:
            raise ValueError(
                f"target_momentum must be in [0, 1] (paper: 0.996), got {target_momentum}"
            )
        num_features: int = backbone.num_features  # type: ignore[assignment]
        dim = parse_spec(projector)[-1]
        parse_spec(predictor_hidden)  # fails early, naming the spec
        # The paper's Linear layers have biases. Before a BatchNorm they do nothing, and so does
        # the projector's last one: the predictor's first Linear is followed by a BatchNorm, so
        # its gradient is exactly 0 (and the target's copy would never move). Only the
        # predictor's output keeps a bias.
        self.projector = mlp(num_features, projector)
        self.predictor = mlp(dim, f"{predictor_hidden}-{dim}", bias=True)
        self.target_backbone = copy.deepcopy(backbone).requires_grad_(False)
        self.target_projector = copy.deepcopy(self.projector).requires_grad_(False)
        self.target_momentum = target_momentum
        self.register_buffer("momentum", torch.tensor(target_momentum, dtype=torch.float64))

    def forward(self, views: Sequence[Tensor]) -> StepOutput:
        self._check_views(views)
        x1, x2 = views
        # Separate passes per view: BatchNorm statistics stay per view, as in the paper.
        z1, z2 = self.projector(self.backbone(x1)), self.projector(self.backbone(x2))
        p1, p2 = self.predictor(z1), self.predictor(z2)
        with torch.no_grad():
            t1 = self.target_projector(self.target_backbone(x1))
            t2 = self.target_projector(self.target_backbone(x2))
        loss = normalized_mse(p1, t2) + normalized_mse(p2, t1)
        with torch.no_grad():
            logs = {
                "momentum": self.momentum.clone(),
                "z_std": normalized_std(z1),
            }
        return StepOutput(loss=loss, logs=logs)

    def after_step(self, progress: float) -> None:
        """EMA update of the target network with τ from the cosine schedule at ``progress``."""
        tau = momentum_schedule(progress, self.target_momentum, 1.0)
        self.momentum.fill_(tau)
        ema_update(self.target_backbone, self.backbone, tau)
        ema_update(self.target_projector, self.projector, tau)
