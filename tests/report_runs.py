"""Run directories for the report tests, made without training: the digits recipe's config, a
fabricated ``metrics.jsonl`` / ``metrics.json``, a random-init backbone, and insight files in the
format ``barlow.insight`` writes."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from barlow.checkpoint import export_backbone
from barlow.config import load_config
from barlow.encoder import build_method

OVERRIDES = ('method.projector="32-32"', "train.epochs=3")


def make_run(
    path: Path,
    *,
    epochs: int = 3,
    metrics: bool = True,
    step_keys: tuple[str, ...] = (),
    overrides: tuple[str, ...] = (),
) -> Path:
    """A digits run directory of ``epochs`` epochs (its weights a random initialisation)."""
    cfg = load_config("digits", (*OVERRIDES, *overrides))
    path.mkdir(parents=True)
    argv = ["barlow", "pretrain", "digits", "--out", str(path)]
    record = {"config": cfg.to_dict(), "argv": argv, "version": "0.1.0"}
    (path / "config.json").write_text(json.dumps(record, indent=2))
    keys = step_keys or ("on_diag", "off_diag")
    lines = []
    for epoch in range(1, epochs + 1):
        for step in range(epoch * 10 - 5, epoch * 10 + 1, 5):
            terms = {k: 10.0 / step + i for i, k in enumerate(keys)}
            train = {"kind": "train", "step": step, "epoch": step / 10, "loss": 50.0 / step}
            lines.append({**train, **terms, "lr": 0.01 * step, "images_per_s": 100.0})
        lines.append(
            {
                "kind": "epoch",
                "step": epoch * 10,
                "epoch": epoch,
                "loss": 5.0 / epoch,
                "knn_top1": 0.5 + 0.1 * epoch,
                "rankme_embedding": 10.0 + epoch,
                "rankme_representation": 20.0 + epoch,
            }
        )
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    if metrics:
        table = {
            "evaluation": {
                "pretrained": {"knn_top1": 0.9444444444444444, "linear_top1": 0.96875},
                "random init": {"knn_top1": 0.95, "linear_top1": 0.9722222222222222},
            },
            "knn": {"knn_top1": 0.9472222, "k": 20, "temperature": 0.1},
        }
        (path / "metrics.json").write_text(json.dumps(table))
    torch.manual_seed(0)
    export_backbone(build_method(cfg).backbone.state_dict(), path / "backbone.safetensors")
    return path


def write_insight(run: Path, epoch: int, dim: int = 32, *, seed: int = 0) -> Path:
    """``run/insight/epoch-EEEE.safetensors`` with C drifting towards the identity."""
    generator = torch.Generator().manual_seed(seed + epoch)
    progress = min(1.0, epoch / 3)
    noise = torch.randn(dim, dim, generator=generator) * (0.5 - 0.4 * progress)
    c = (progress * torch.eye(dim) + noise).clamp(-1, 1)
    off = c[~torch.eye(dim, dtype=torch.bool)]
    edges = torch.linspace(-1, 1, 101)
    counts = torch.histc(off, bins=100, min=-1, max=1)
    spectrum = torch.sort(torch.rand(dim, generator=generator) * (1 + epoch), descending=True)
    tensors = {
        "cross_correlation_block": c[:64, :64].contiguous(),
        "cross_correlation_pooled": c.contiguous(),
        "diagonal": c.diagonal().contiguous(),
        "off_diagonal_histogram": counts,
        "histogram_edges": edges,
        "embedding_eigenvalues": spectrum.values.contiguous(),
        "representation_eigenvalues": (spectrum.values * 2).contiguous(),
    }
    folder = run / "insight"
    folder.mkdir(exist_ok=True)
    path = folder / f"epoch-{epoch:04d}.safetensors"
    metadata = {"epoch": str(epoch), "probe_images": "512", "method": "barlow_twins"}
    save_file({k: v.float().clone() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path
