"""What a report page needs of a run and its other files lack: the two views' cross-correlation,
the covariance spectra and RankMe on a fixed probe batch, in ``<run>/insight/`` (``eval.insight``).

**Probe batch.** The first ``PROBE_IMAGES`` (512) training images, or all of a smaller dataset,
two views of each (the method's first two view specs; the first one twice for a one-view method)
drawn from generators seeded with ``PROBE_SEED`` alone: the same images and views at every
recording, for any ``train.seed`` and any world size, and no draw from the training random
streams, so a run with insight on trains bit-identically to one with it off. In-memory datasets
draw the views on the device (``batched_views``), others per image (``augment``, the global
generator seeded and put back as in ``epoch_data.ViewDataset``). The method runs in eval mode
(BatchNorm on its running statistics, which it then leaves alone), without gradients, in float32,
on the main process alone: no collective.

**Files.** ``epoch-EEEE.safetensors``, E = 0 before the first step, else after epoch E; written at
epoch 0, every ``eval.online_knn_every`` epochs and at the last, atomically. float32 tensors:

- ``cross_correlation_block`` (k, k), k = min(64, D): the top-left block of C, full resolution;
  C = ẑ1ᵀẑ2 / N with ẑ the embeddings z = g(f(x)) of each view standardised along the batch as
  in the Barlow Twins loss (biased variance, eps 1e-5), so C_ij ∈ [−1, 1];
- ``cross_correlation_pooled`` (P, P), P = min(256, D): C itself (signed, not |C|) average-pooled
  by ``adaptive_avg_pool2d`` (D = m·P: plain m×m blocks; else its overlapping windows of ≈ D/P);
- ``diagonal`` (D,): C_ii;
- ``off_diagonal_histogram`` (100,): counts of the C_ij, i ≠ j, in 100 equal bins on [−1, 1]
  (the last bin includes 1), with edges ``histogram_edges`` (101,);
- ``embedding_eigenvalues``, ``representation_eigenvalues``: the eigenvalues of the covariance
  (centred, divided by N) of z and of the backbone features h, of the first view of each probe
  image, descending: min(N, dim) of them, the rest are 0.

Metadata: ``epoch``, ``probe_images`` (N), ``method``, and ``rankme_embedding``,
``rankme_representation`` (``repr`` of a float), which with ``insight_time_s`` also go into the
epoch's record in ``metrics.jsonl`` (epoch 0 has no record: its RankMe is in the file alone).
The header's keys are sorted, so a recording redone by a resumed run rewrites the same bytes.
The heatmap of the block (blue −1, white 0, red +1) goes to TensorBoard as
``insight/cross_correlation`` at the global step. z is ``Method.project(Method.embed(x))``:
for CMC with ``split="lab"`` the concatenation of the L and ab embeddings (D twice the head's).

**RankMe** (Garrido, Balestriero, Najman & LeCun, ICML 2023, arXiv:2210.02885): with σ_k the
singular values of the N×dim matrix of first-view z (or h), uncentred as in the paper and in
``health.embedding_health``, p_k = σ_k / ‖σ‖₁ + ε and RankMe = exp(−Σ_k p_k log p_k).

The spectra use the probe batch, not the online kNN's test features: the probe's z and h are at
hand, the kNN's would need the projector run over the whole test split, and unlabelled data has
none. One view: each image counted once, as RankMe and the kNN count them; it also keeps the
eigenproblems at most N×N.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor

from barlow import data, distributed
from barlow.augment import MultiView, ViewSpec
from barlow.batched_views import BatchedMultiView
from barlow.checkpoint import sorted_header
from barlow.losses import standardize
from barlow.methods.base import Method
from barlow.rundir import INSIGHT_NAME, atomic_write
from barlow.training.epoch_data import CorruptSample, ViewDataset, sample_seed

if TYPE_CHECKING:
    from barlow.logbook import Logbook
    from barlow.training.loop import EpochMonitor
    from barlow.training.setup import Run
    from barlow.training.state import TrainState

PROBE_IMAGES = 512
PROBE_SEED = 20_230_101  # fixed: the probe does not follow train.seed
PROBE_CHUNK = 128  # images per view draw and per forward: bounded memory, same views any config
BLOCK, POOLED, BINS = 64, 256, 100
RANKME_EPS = 1e-7  # RankMe's ε: "a small constant" in the paper; the value is ours
IMAGE_TAG = "insight/cross_correlation"


def insight_path(run_dir: Path, epoch: int) -> Path:
    """``<run>/insight/epoch-EEEE.safetensors``: epoch 0 is before training."""
    return run_dir / INSIGHT_NAME / f"epoch-{epoch:04d}.safetensors"


def cross_correlation(z1: Tensor, z2: Tensor) -> Tensor:
    """C = ẑ1ᵀẑ2 / N of embeddings (N, D), each standardised along the batch: (D, D) float32."""
    z1, z2 = standardize(z1.float()), standardize(z2.float())
    return z1.T @ z2 / z1.shape[0]


def _gram_eigenvalues(x: Tensor) -> Tensor:
    """The min(N, D) largest eigenvalues of xᵀx for x (N, D), descending, ≥ 0, float64: from the
    smaller of xᵀx and xxᵀ (the same nonzero eigenvalues)."""
    x = x.double() if x.device.type in ("cpu", "cuda") else x.cpu().double()  # MPS: no float64
    gram = x.T @ x if x.shape[1] <= x.shape[0] else x @ x.T
    return torch.linalg.eigvalsh(gram).flip(0).clamp_min(0.0)


def covariance_eigenvalues(x: Tensor) -> Tensor:
    """Eigenvalues of the covariance (x − x̄)ᵀ(x − x̄) / N of x (N, D), descending, min(N, D)."""
    return _gram_eigenvalues(x - x.mean(dim=0)) / x.shape[0]


def singular_values(x: Tensor) -> Tensor:
    """The min(N, D) singular values of x (N, D), uncentred, descending, float64."""
    return _gram_eigenvalues(x).sqrt()


def rankme(sigma: Tensor, eps: float = RANKME_EPS) -> float:
    """RankMe = exp(−Σ_k p_k log p_k), p_k = σ_k / ‖σ‖₁ + ε (Garrido et al., 2023):
    ≈ the number of singular values σ in use, from ≈ 1 (one direction) to len(σ) (all equal).
    0 for an all-zero σ."""
    sigma = sigma.detach().double().clamp_min(0.0)
    total = float(sigma.sum())
    if total == 0.0:
        return 0.0
    p = sigma / total + eps
    return math.exp(float(-(p * p.log()).sum()))


def correlation_summary(c: Tensor) -> dict[str, Tensor]:
    """The file's views of C (D, D): block, pooled, diagonal, off-diagonal histogram, edges (CPU
    float32). The histogram is taken in row chunks of < 2²⁴ entries, whose float32 counts are
    exact, summed in float64."""
    d = c.shape[0]
    k, p = min(BLOCK, d), min(POOLED, d)
    counts = torch.zeros(BINS, dtype=torch.float64, device=c.device)
    rows = max(1, 2**24 // d)
    for start in range(0, d, rows):  # clamped: rounding may put a C_ij a hair beyond ±1
        part = c[start : start + rows].clamp(-1.0, 1.0)
        counts += torch.histc(part, bins=BINS, min=-1.0, max=1.0).double()
    diagonal = c.diagonal()
    counts -= torch.histc(diagonal.clamp(-1.0, 1.0), bins=BINS, min=-1.0, max=1.0).double()
    pooled = F.adaptive_avg_pool2d(c[None, None], p)[0, 0]
    out = {
        "cross_correlation_block": c[:k, :k],
        "cross_correlation_pooled": pooled,
        "diagonal": diagonal,
        "off_diagonal_histogram": counts,
        "histogram_edges": torch.linspace(-1.0, 1.0, BINS + 1, dtype=torch.float64),
    }
    return {name: t.detach().float().cpu().contiguous() for name, t in out.items()}


def heatmap(c: Tensor, scale: int = 4) -> Tensor:
    """RGB image (3, s·H, s·W) in [0, 1] of values in [−1, 1]: blue −1, white 0, red +1, each
    entry a s×s square (TensorBoard shows small images small)."""
    v = c.detach().float().cpu().clamp(-1.0, 1.0)
    rgb = torch.stack([1 - (-v).clamp_min(0), 1 - v.abs(), 1 - v.clamp_min(0)])
    return rgb.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)


class ProbeBatch:
    """The fixed probe images and their two views (see the module docstring), drawn afresh at
    each recording in chunks of ``PROBE_CHUNK`` images, identically every time."""

    def __init__(
        self,
        dataset: Any,
        specs: Sequence[ViewSpec],
        device: torch.device,
        *,
        size: int = PROBE_IMAGES,
        channels_last: bool = False,
    ) -> None:
        pair = tuple(specs[:2]) if len(specs) >= 2 else (specs[0], specs[0])
        self.size, self.device, self.channels_last = min(size, len(dataset)), device, channels_last
        held = data.in_memory_images(dataset)
        self.images = None if held is None else held[0][: self.size].to(device)
        self.batched = BatchedMultiView(pair)
        self.generator = torch.Generator(device=device)
        # a corrupt image is left out of the probe (the views of the others stay the same)
        self.per_sample = ViewDataset(dataset, MultiView(pair), PROBE_SEED, skip_corrupt=True)

    def views(self) -> Iterator[tuple[Tensor, Tensor]]:
        """The two views of each chunk of probe images, on the device."""
        for chunk, start in enumerate(range(0, self.size, PROBE_CHUNK)):
            stop = min(start + PROBE_CHUNK, self.size)
            if self.images is not None:
                self.generator.manual_seed(sample_seed(PROBE_SEED, 0, chunk))
                v1, v2 = self.batched(self.images[start:stop], self.generator)
            else:
                samples = [self.per_sample[(0, i)] for i in range(start, stop)]
                good = [s[0] for s in samples if not isinstance(s, CorruptSample)]
                if not good:
                    continue
                v1, v2 = (torch.stack(v).to(self.device) for v in zip(*good, strict=True))
            if self.channels_last:
                v1, v2 = (v.contiguous(memory_format=torch.channels_last) for v in (v1, v2))
            yield v1, v2


def probe_embeddings(method: Method, probe: ProbeBatch) -> tuple[Tensor, Tensor, Tensor]:
    """(h1, z1, z2) of the probe: first-view features h and both views' embeddings z, float32,
    the method in eval mode without gradients (its training mode is put back)."""
    was_training = method.training
    method.eval()
    hs, z1s, z2s = [], [], []
    try:
        with torch.no_grad():
            for v1, v2 in probe.views():
                h = method.embed(torch.cat([v1, v2])).float()
                z1, z2 = method.project(h).float().chunk(2)
                hs.append(h[: len(v1)])
                z1s.append(z1)
                z2s.append(z2)
    finally:
        method.train(was_training)
    return torch.cat(hs), torch.cat(z1s), torch.cat(z2s)


def measure(method: Method, probe: ProbeBatch) -> tuple[dict[str, Tensor], dict[str, float]]:
    """The file's tensors (CPU float32), and the two RankMe values and ``probe_images`` (N) of
    the probe batch now."""
    h, z1, z2 = probe_embeddings(method, probe)
    tensors = correlation_summary(cross_correlation(z1, z2))
    tensors["embedding_eigenvalues"] = covariance_eigenvalues(z1).float().cpu()
    tensors["representation_eigenvalues"] = covariance_eigenvalues(h).float().cpu()
    ranks = {
        "rankme_embedding": rankme(singular_values(z1)),
        "rankme_representation": rankme(singular_values(h)),
        "probe_images": len(h),
    }
    return tensors, ranks


class InsightRecorder:
    """Records the probe batch's insight file for an epoch into ``logbook.out_dir / insight``
    (the run directory, also after an ``--overwrite`` run's swap), and the heatmap of the block
    of C to TensorBoard as ``insight/cross_correlation``. Main process only."""

    def __init__(self, method: Method, probe: ProbeBatch, logbook: Logbook, *, name: str) -> None:
        self.method, self.probe, self.logbook, self.name = method, probe, logbook, name
        self.seconds: list[float] = []  # the duration of each recording (bench/insight_overhead)

    def record(self, epoch: int, *, step: int) -> dict[str, float]:
        """Write ``epoch-EEEE.safetensors``; the RankMe values and the time taken."""
        from safetensors.torch import save  # late: only runs that record need it

        start = time.perf_counter()
        tensors, ranks = measure(self.method, self.probe)
        metadata = {
            "epoch": str(epoch),
            "probe_images": str(ranks.pop("probe_images")),
            "method": self.name,
            **{key: repr(value) for key, value in ranks.items()},
        }
        payload = sorted_header(save(tensors, metadata=metadata))
        atomic_write(insight_path(self.logbook.out_dir, epoch), lambda file: file.write(payload))
        self.logbook.image(IMAGE_TAG, heatmap(tensors["cross_correlation_block"]), step=step)
        self.seconds.append(time.perf_counter() - start)
        return {**ranks, "insight_time_s": self.seconds[-1]}


def insight_monitor(run: Run, logbook: Logbook, state: TrainState) -> EpochMonitor | None:
    """The epoch monitor of a pretraining run that records every ``eval.online_knn_every``
    epochs and at the last, having recorded epoch 0 if the run is at its first step; None
    without ``eval.insight`` and on processes other than the main one."""
    if not (run.cfg.eval.insight and distributed.is_main_process()):
        return None
    from barlow.compute import uses_channels_last
    from barlow.training.setup import pretraining_data  # late: barlow.training imports this

    cfg, device = run.cfg, run.device
    source = pretraining_data(cfg, device, run.images)
    probe = ProbeBatch(
        source.dataset,
        source.specs,
        device,
        channels_last=uses_channels_last(cfg.train.channels_last, device),
    )
    method = cast(Method, run.module)
    recorder = InsightRecorder(method, probe, logbook, name=cfg.method.name)
    if state.global_step == 0:  # before the first step; a resumed run has it already
        recorder.record(0, step=0)
    every = cfg.eval.online_knn_every

    def monitor(epoch: int, is_last: bool, views: Any) -> dict[str, Any]:
        if not is_last and not (every and (epoch + 1) % every == 0):
            return {}
        return recorder.record(epoch + 1, step=state.global_step)

    return monitor
