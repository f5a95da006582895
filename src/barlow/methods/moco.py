"""MoCo v2 (Chen, Fan, Girshick & He, 2020, arXiv:2003.04297; MoCo: He et al., CVPR 2020)."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from barlow import distributed
from barlow.heads import mlp, parse_spec
from barlow.losses import info_nce_loss
from barlow.methods.base import Method, StepOutput
from barlow.methods.momentum import ema_update


class MoCo(Method):
    """Momentum contrast: queries against the momentum encoder's key and a queue of old keys.

    q = g(f(x_1)) from the online backbone f and projector g; k = g'(f'(x_2)) from the key
    encoder (f', g'), a copy that follows θ' ← m·θ' + (1 − m)·θ after every optimizer step and
    gets no gradient. With Q the queue of the K most recent keys (unit vectors),

        L = mean_n −log( exp(q̂_nᵀk̂_n / τ) / (exp(q̂_nᵀk̂_n / τ) + Σ_j exp(q̂_nᵀQ_j / τ)) ).

    MoCo v2 defaults: projector 2048-128 (the paper's MLP head; here with BatchNorm in the hidden
    layer, as :func:`barlow.heads.mlp` builds it), τ 0.2, K 65536, m 0.999 (0.99 for small data).

    Choices, and why:

    - Asymmetric loss (query from view 1, key from view 2), as in the MoCo v2 paper: its K, m,
      τ and results were measured that way. Symmetrising sends both views through both
      encoders: twice the compute per step, much like training twice as long.
    - The queue starts as random unit vectors, as in the paper, rather than being masked until
      full: a few hundred steps of easy negatives, no masking logic, and the logits keep one
      shape for the whole run.
    - The queue is fed in :meth:`after_step` with this step's keys, gathered from all ranks in
      rank order, so every rank holds the same queue (and it equals one process on the
      concatenated batch). ``queue`` and ``queue_ptr`` are buffers: checkpoints hold them.
    - BatchNorm: the paper shuffles the key batch across GPUs ("shuffle BN") so that a query and
      its key never share batch statistics. Here the training loop converts BatchNorm to
      SyncBatchNorm under multi-process GPU training (``train.sync_batchnorm``), so statistics
      cover the global batch and say little about any single pair (MoCo v3 does the same).
      SyncBatchNorm does not run on CPU: with several CPU processes BatchNorm is per rank, and
      with one process the key batch's statistics are those of the whole batch, as with
      SyncBatchNorm.
    """

    views = "moco"

    def __init__(
        self,
        backbone: nn.Module,
        *,
        projector: str = "2048-128",
        temperature: float = 0.2,
        queue_size: int = 65536,
        key_momentum: float = 0.999,
    ) -> None:
        super().__init__(backbone)
        if not 0 < temperature < float("inf"):
            raise ValueError(f"temperature must be > 0 (MoCo v2: 0.2), got {temperature}")
        if queue_size < 1:
            raise ValueError(f"queue_size must be >= 1 (MoCo v2: 65536), got {queue_size}")
        if not 0 <= key_momentum <= 1:
            raise ValueError(
                f"key_momentum must be in [0, 1] (MoCo: 0.999, 0.99 for small data), "
                f"got {key_momentum}"
            )
        num_features: int = backbone.num_features  # type: ignore[assignment]
        self.projector = mlp(num_features, projector)
        self.key_backbone = copy.deepcopy(backbone).requires_grad_(False)
        self.key_projector = copy.deepcopy(self.projector).requires_grad_(False)
        self.temperature, self.key_momentum = temperature, key_momentum
        dim = parse_spec(projector)[-1]
        self.queue: Tensor
        self.queue_ptr: Tensor
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self._pending_keys: Tensor | None = None  # this step's gathered keys, for after_step

    def largest_loss_matrix(self, global_batch: int, world: int) -> tuple[str, tuple[int, int]]:
        """N_local queries scored against their key and the K queued keys."""
        return "N_local×(1+K) logits", (global_batch // world, 1 + len(self.queue))

    def forward(self, views: Sequence[Tensor]) -> StepOutput:
        self._check_views(views)
        global_batch = views[0].shape[0] * distributed.world_size()
        if global_batch > self.queue.shape[0]:
            raise ValueError(
                f"the global batch of {global_batch} does not fit in the queue of "
                f"{self.queue.shape[0]} keys; raise queue_size or lower the batch size"
            )
        q = self.projector(self.backbone(views[0]))
        with torch.no_grad():
            k = self.key_projector(self.key_backbone(views[1]))
        out = info_nce_loss(q, k, self.queue, self.temperature)
        if self.training:
            keys = F.normalize(k.to(self.queue.dtype), dim=1)
            self._pending_keys = distributed.all_gather_no_grad(keys)
        logs = {"positive_similarity": out.positive_similarity, "accuracy": out.accuracy}
        return StepOutput(loss=out.loss, logs=logs)

    def after_step(self, progress: float) -> None:
        """Move the key encoder by the EMA rule, then enqueue the last step's keys."""
        ema_update(self.key_backbone, self.backbone, self.key_momentum)
        ema_update(self.key_projector, self.projector, self.key_momentum)
        if self._pending_keys is not None:
            self._enqueue(self._pending_keys)
            self._pending_keys = None

    @torch.no_grad()
    def _enqueue(self, keys: Tensor) -> None:
        """Write keys (B, D) at rows ptr, ptr + 1, … (mod K): the queue is a ring, oldest at ptr."""
        size = self.queue.shape[0]
        rows = (self.queue_ptr + torch.arange(keys.shape[0], device=keys.device)) % size
        self.queue.index_copy_(0, rows, keys)
        self.queue_ptr.copy_((self.queue_ptr + keys.shape[0]) % size)
