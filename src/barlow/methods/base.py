"""The one interface every self-supervised method implements."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from torch import Tensor, nn

from barlow.losses import choose_path


@dataclass
class StepOutput:
    """What a method's forward returns to the training loop."""

    loss: Tensor  # float32 scalar; the loop calls backward on it
    logs: dict[str, Tensor] = field(default_factory=dict)  # detached scalars for the logger


class Method(nn.Module):
    """A self-supervised method: views in, loss out.

    Subclasses take the backbone plus typed keyword hyper-parameters with the paper's defaults; they
    never see a config, an optimizer or a loader. The loss lives in ``forward`` because DDP's
    gradient bookkeeping runs through the wrapped forward.
    """

    num_views: int = 2  # a class default; a method may set it per instance (CMC)
    views: ClassVar[str] = "barlow"  # default recipe name in augment.RECIPES

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, views: Sequence[Tensor]) -> StepOutput:
        raise NotImplementedError

    def embed(self, images: Tensor) -> Tensor:
        """The representation used for evaluation: backbone features h, shape (B, num_features)."""
        out: Tensor = self.backbone(images)
        return out

    def project(self, h: Tensor) -> Tensor:
        """The embedding z = g(h) the loss compares, of backbone features h (B, num_features):
        (B, D). This default applies ``self.projector`` (a predictor, where there is one, is not
        part of z); a method whose head is named otherwise overrides it."""
        projector = getattr(self, "projector", None)
        if not isinstance(projector, nn.Module):
            raise NotImplementedError(
                f"{type(self).__name__} has no `projector` module; override Method.project"
            )
        z: Tensor = projector(h)
        return z

    def after_step(self, progress: float) -> None:
        """Hook run after each optimizer step (EMA / queue updates); progress ∈ [0, 1]."""

    def largest_loss_matrix(self, global_batch: int, world: int) -> tuple[str, tuple[int, int]]:
        """The biggest matrix this method's loss builds on each process, and its name (memory
        preflight). N = ``global_batch`` (the losses gather it), N_local = N / ``world``. This
        default: the N_local×D embeddings, D the projector's output width."""
        return "N_local×D embeddings", (global_batch // world, self.embedding_dim())

    def embedding_dim(self) -> int:
        """D: the output width of the projector (the last Linear layer's)."""
        linears = [m for m in self.modules() if isinstance(m, nn.Linear)]
        return linears[-1].out_features if linears else 0

    def _check_views(self, views: Sequence[Tensor]) -> None:
        if len(views) != self.num_views:
            raise ValueError(
                f"{type(self).__name__} takes {self.num_views} views per image, got {len(views)}; "
                f"use a view recipe with {self.num_views} views"
            )


class CorrelationOrGramLoss:
    """For a method whose loss builds the D×D correlation or the N×N Gram matrices (Barlow
    Twins, VICReg), as its ``loss_path`` (``auto``: ``losses.choose_path``) decides."""

    loss_path: str

    def largest_loss_matrix(self, global_batch: int, world: int) -> tuple[str, tuple[int, int]]:
        d = self.embedding_dim()  # type: ignore[attr-defined]
        path = choose_path(global_batch, d) if self.loss_path == "auto" else self.loss_path
        if path == "correlation":
            return "D×D matrix (correlation path)", (d, d)
        return "N×N Gram matrix", (global_batch, global_batch)
