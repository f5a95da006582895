"""SimCLR (Chen, Kornblith, Norouzi & Hinton, ICML 2020, arXiv:2002.05709)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from barlow.heads import mlp
from barlow.losses import nt_xent_loss
from barlow.methods.base import Method, StepOutput


class SimCLR(Method):
    """Contrast each view against every other view of the global batch (NT-Xent).

    z = g(f(x)) for both views, f the backbone and g the projector (paper: 2048-128 with BN and
    ReLU in the hidden layer); with u = z/‖z‖ over the 2N views of N images and p(i) the other
    view of image i,

        L = (1/2N) Σ_i −log( exp(u_iᵀu_p(i) / τ) / Σ_{k≠i} exp(u_iᵀu_k / τ) ).

    Negatives are the 2N − 2 other views of the *global* batch: embeddings are gathered with
    gradient across ranks inside :func:`barlow.losses.nt_xent_loss`. Both views go through the
    backbone as one batch, as in the paper, so BatchNorm statistics cover both views (global
    batch statistics under DDP on GPU, where the loop converts to SyncBatchNorm; per rank on CPU).
    τ: 0.5 suits small batches (paper, CIFAR-10), 0.1 the LARS recipe at batch 4096.
    """

    views = "simclr"

    def __init__(
        self,
        backbone: nn.Module,
        *,
        projector: str = "2048-128",
        temperature: float = 0.5,
    ) -> None:
        super().__init__(backbone)
        if not 0 < temperature < float("inf"):
            raise ValueError(
                f"temperature must be > 0 (paper: 0.5, or 0.1 at scale), got {temperature}"
            )
        num_features: int = backbone.num_features  # type: ignore[assignment]
        self.projector = mlp(num_features, projector)
        self.temperature = temperature

    def largest_loss_matrix(self, global_batch: int, world: int) -> tuple[str, tuple[int, int]]:
        """2·N_local anchors scored against the 2N views of the global batch."""
        return "2N_local×2N similarities", (2 * (global_batch // world), 2 * global_batch)

    def forward(self, views: Sequence[Tensor]) -> StepOutput:
        self._check_views(views)
        z1, z2 = self.projector(self.backbone(torch.cat(list(views)))).chunk(2)
        out = nt_xent_loss(z1, z2, self.temperature)
        logs = {"positive_similarity": out.positive_similarity, "accuracy": out.accuracy}
        return StepOutput(loss=out.loss, logs=logs)
