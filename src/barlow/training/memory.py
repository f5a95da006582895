"""Memory: the preflight estimate printed before training, the peak per epoch, the OOM advice."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from barlow.config import Config
from barlow.encoder import crop_size
from barlow.methods import Method


@dataclass(frozen=True)
class MemoryEstimate:
    """Float32 memory of a run's model and of its loss's largest matrix, per process.

    Every parameter and buffer holds a weight (4 bytes); a trainable parameter also a gradient
    and ``optimizer_slots`` optimizer tensors (momentum: 1, AdamW: 2):

        model bytes = 4 · (P + B + T · (1 + slots)),    loss bytes = 4 · rows · cols

    with P parameters, B buffer values, T trainable parameters. Activations, which grow with
    the per-process batch and the image size, come on top.
    """

    parameters: dict[str, int]  # per top-level submodule (backbone, projector, target_*, …)
    buffers: int
    trainable: int
    optimizer_slots: int
    loss_matrix: tuple[int, int]
    loss_matrix_name: str

    @property
    def total_parameters(self) -> int:
        return sum(self.parameters.values())

    @property
    def model_mib(self) -> float:
        values = self.total_parameters + self.buffers
        return 4 * (values + self.trainable * (1 + self.optimizer_slots)) / 2**20

    @property
    def loss_matrix_mib(self) -> float:
        rows, cols = self.loss_matrix
        return 4 * rows * cols / 2**20

    def summary(self) -> str:
        parts = ", ".join(f"{k} {v / 1e6:.2f} M" for k, v in self.parameters.items() if v)
        rows, cols = self.loss_matrix
        return (
            f"memory preflight: {self.total_parameters / 1e6:.1f} M parameters ({parts}); "
            f"weights, gradients and optimizer state {self.model_mib:.0f} MiB; loss "
            f"{self.loss_matrix_name} {rows}×{cols}: {self.loss_matrix_mib:.0f} MiB per process "
            "(activations come on top)"
        )


def memory_estimate(
    method: Method, *, global_batch: int, world: int = 1, optimizer: str = "lars"
) -> MemoryEstimate:
    """Count ``method``'s parameters per top-level submodule and ask it for its loss's largest
    matrix (see :class:`MemoryEstimate`). Reads shapes only: a method on ``meta`` works."""
    counts: dict[str, int] = {}
    trainable = 0
    for name, parameter in method.named_parameters():
        head = name.partition(".")[0]
        counts[head] = counts.get(head, 0) + parameter.numel()
        trainable += parameter.numel() if parameter.requires_grad else 0
    name, shape = method.largest_loss_matrix(global_batch, world)
    return MemoryEstimate(
        parameters=counts,
        buffers=sum(b.numel() for b in method.buffers()),
        trainable=trainable,
        optimizer_slots=2 if optimizer == "adamw" else 1,
        loss_matrix=shape,
        loss_matrix_name=name,
    )


def is_out_of_memory(error: BaseException) -> bool:
    """torch's OutOfMemoryError (GPU), or a plain allocator failure: the CPU allocator's
    RuntimeError ("DefaultCPUAllocator: can't allocate memory", e.g. under ``ulimit -v``) or
    Python's MemoryError."""
    if isinstance(error, torch.OutOfMemoryError | MemoryError):
        return True
    return isinstance(error, RuntimeError) and "can't allocate memory" in str(error)


def oom_message(
    cfg: Config, *, world: int, where: str, last_saved: str | None, estimate: str | None
) -> str:
    """What ran out of memory and what to shrink: the batch (unless it is already the least),
    the crop, the projector, the precision."""
    projector = cfg.method.params.get("projector", "the method's default")
    per_process = cfg.train.batch_size // world
    batch = (
        "Lower train.batch_size (and optim.lr with it, or keep it: it is scaled per 256 images), "
        if per_process > 2
        else "train.batch_size is already the least (2 per process); "
    )
    return (
        f"out of memory {where} with train.batch_size={cfg.train.batch_size} ({per_process} per "
        f"process), crop {crop_size(cfg)} px, method.projector={projector!r}, "
        f"train.precision={cfg.train.precision}. {estimate + '. ' if estimate else ''}{batch}"
        "choose a narrower method.projector or a smaller crop (data.crop_size), or train in "
        "bf16 (train.precision=bf16 on a GPU or CPU that has it); checkpoints written so far "
        f"are intact, the last good one: {last_saved or 'none yet'}"
    )


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory of this process so far, MiB: allocated CUDA memory on a GPU, else the peak
    resident set size (``ru_maxrss``: model, data in memory, activations, allocator slack; loader
    worker processes not included)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    if sys.platform == "win32":  # no getrusage
        return float("nan")
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, else KiB
