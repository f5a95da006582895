"""Barlow Twins (Zbontar et al., 2021, arXiv:2103.03230)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from barlow.heads import mlp, parse_spec
from barlow.losses import BarlowTwinsPath, barlow_twins_loss
from barlow.losses.barlow_twins import BarlowTwinsNormalize, BarlowTwinsTerms, check_variant
from barlow.methods.base import CorrelationOrGramLoss, Method, StepOutput


class BarlowTwins(CorrelationOrGramLoss, Method):
    """Redundancy reduction: drive the cross-correlation of two views' embeddings to the identity.

    z_a = g(f(x_a)), z_b = g(f(x_b)) with f the backbone and g the projector;
    L = Σ_i (1 − C_ii)² + λ Σ_{i≠j} C_ij², C the batch cross-correlation of the standardised z.

    The paper's ablations (§4, Tables 5 and 6; docs/variants.md), all off by default:
    ``terms``, ``normalize`` and ``temperature`` choose the loss (see
    :func:`barlow.losses.barlow_twins_loss`); ``projector_bn=False`` drops BatchNorm from the
    hidden blocks of the projector and of the predictor; ``predictor`` (a spec such as
    "8192-8192", output width = the projector's) puts an MLP p on branch A only, L(p(z_a), z_b);
    ``stop_gradient`` detaches z_b. With a temperature, "auto" takes the D×D path.
    """

    views = "barlow"

    def __init__(
        self,
        backbone: nn.Module,
        *,
        projector: str = "8192-8192-8192",
        lambd: float = 0.0051,
        loss_path: BarlowTwinsPath = "auto",
        terms: BarlowTwinsTerms = "both",
        normalize: BarlowTwinsNormalize = "batch",
        projector_bn: bool = True,
        temperature: float | None = None,
        stop_gradient: bool = False,
        predictor: str | None = None,
    ) -> None:
        super().__init__(backbone)
        if lambd < 0:
            raise ValueError(f"lambd must be >= 0 (paper: 0.0051), got {lambd}")
        # Checked here, not at the first step; named as the [method] keys are.
        check_variant(terms, normalize, temperature, loss_path, path_key="loss_path")
        num_features: int = backbone.num_features  # type: ignore[assignment]
        self.projector = mlp(num_features, projector, batch_norm=projector_bn)
        self.predictor = _predictor(parse_spec(projector)[-1], predictor, projector_bn)
        self.lambd = lambd
        self.loss_path: BarlowTwinsPath = loss_path
        self.terms: BarlowTwinsTerms = terms
        self.normalize: BarlowTwinsNormalize = normalize
        self.temperature = temperature
        self.stop_gradient = stop_gradient

    def forward(self, views: Sequence[Tensor]) -> StepOutput:
        self._check_views(views)
        # Separate passes per view, as the reference code does: BatchNorm statistics stay per view.
        z1 = self.projector(self.backbone(views[0]))
        z2 = self.projector(self.backbone(views[1]))
        if self.predictor is not None:
            z1 = self.predictor(z1)
        if self.stop_gradient:
            z2 = z2.detach()
        out = barlow_twins_loss(
            z1,
            z2,
            self.lambd,
            path=self.loss_path,
            terms=self.terms,
            normalize=self.normalize,
            temperature=self.temperature,
        )
        with torch.no_grad():
            logs = {"on_diag": out.on_diag.detach(), "off_diag": out.off_diag.detach()}
        return StepOutput(loss=out.loss, logs=logs)

    def largest_loss_matrix(self, global_batch: int, world: int) -> tuple[str, tuple[int, int]]:
        if self.temperature is not None:  # needs all of C: the D×D paths, whatever "auto" says
            d = self.embedding_dim()
            return "D×D matrix (correlation path)", (d, d)
        return super().largest_loss_matrix(global_batch, world)


def _predictor(dim: int, spec: str | None, batch_norm: bool) -> nn.Sequential | None:
    """The predictor on branch A: mlp(D, spec) with a bias on its last Linear, or None."""
    if spec is None:
        return None
    try:
        widths = parse_spec(spec)
    except ValueError as exc:
        raise ValueError(f"predictor: {exc}; or None for no predictor") from exc
    if widths[-1] != dim:
        raise ValueError(
            f"predictor={spec!r} ends at width {widths[-1]}, but its output is compared with "
            f"the projector's ({dim}); end the spec with {dim}, e.g. '{dim}-{dim}'"
        )
    return mlp(dim, spec, bias=True, batch_norm=batch_norm)
