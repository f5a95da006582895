"""BYOL, SimSiam and VICReg under DDP with 2 Gloo processes holding *different* data.

The distributed rule: loss and gradients after DDP's averaging equal one process on
the concatenated batch; for BYOL also the target network after an optimizer step and
``after_step``. BatchNorm layers run in eval mode, the documented CPU policy (SyncBatchNorm refuses
CPU tensors, so per-rank batch statistics would differ from the global ones by design). One
process-group spawn runs every check; the results are asserted here.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn

from barlow import distributed
from barlow.methods import METHODS, Method
from comparisons import max_rel_err, rel_err, rel_errs
from processes import (
    BROKEN_GATHERS,
    distributed_replaced,
    join_as_rank,
    leave_process_group,
    save_rank_result,
)

WORLD_SIZE = 2
GLOBAL_BATCH = 16
IN_DIM = 8
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "byol": ("byol", {"projector": "24-12", "predictor_hidden": "20", "target_momentum": 0.9}),
    "simsiam": ("simsiam", {"projector": "24-12", "predictor_hidden": "6"}),
    # D = 12 < N = 16 picks the D×D path; the Gram path is checked explicitly.
    "vicreg/correlation": ("vicreg", {"projector": "24-12", "loss_path": "correlation"}),
    "vicreg/gram": ("vicreg", {"projector": "24-12", "loss_path": "gram"}),
}
PROGRESS = 0.25  # after_step's argument in the BYOL check


class TinyBackbone(nn.Module):
    """A two-layer MLP standing in for an image encoder: (B, IN_DIM) → (B, 16)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(IN_DIM, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())
        self.num_features = 16

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.net(x)
        return out


def build(case: str) -> Method:
    name, kwargs = CASES[case]
    torch.manual_seed(0)  # the same weights on every rank and in the reference
    method = METHODS[name](TinyBackbone(), **kwargs)
    for module in method.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
    return method


def global_views() -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(1)
    x1 = torch.randn(GLOBAL_BATCH, IN_DIM, generator=gen)
    return x1, x1 + 0.5 * torch.randn(GLOBAL_BATCH, IN_DIM, generator=gen)


def shard(x: Tensor, rank: int) -> Tensor:
    rows = GLOBAL_BATCH // WORLD_SIZE
    return x[rank * rows : (rank + 1) * rows]


def step_results(model: nn.Module, method: Method, x1: Tensor, x2: Tensor) -> dict[str, Tensor]:
    """Loss and gradients of one step; then, after an SGD step and after_step, the parameters."""
    loss = model([x1, x2]).loss
    loss.backward()
    trainable = {n: p for n, p in method.named_parameters() if p.requires_grad}
    results = {"loss": loss.detach()}
    results |= {f"grad/{n}": torch.as_tensor(p.grad).clone() for n, p in trainable.items()}
    torch.optim.SGD(trainable.values(), lr=0.5).step()
    method.after_step(PROGRESS)
    results |= {f"param/{n}": p.detach().clone() for n, p in method.named_parameters()}
    return results


def ddp_run(case: str, rank: int) -> dict[str, Tensor]:
    method = build(case)
    model = nn.parallel.DistributedDataParallel(method)
    x1, x2 = global_views()
    return step_results(model, method, shard(x1, rank), shard(x2, rank))


def unwrapped_run(case: str, rank: int) -> dict[str, Tensor]:
    """The broken setup of a method left out of DDP: nothing averages the gradients."""
    method = build(case)
    x1, x2 = global_views()
    return step_results(method, method, shard(x1, rank), shard(x2, rank))


def worker(rank: int, port: int, out_dir: str) -> None:
    join_as_rank(rank, WORLD_SIZE, port)
    distributed.init_from_env(backend="gloo")
    results: dict[str, Any] = {case: ddp_run(case, rank) for case in CASES}
    # Negative controls, in the same process group: a gather that is missing or does not sum
    # gradients across ranks, and a method that DDP does not wrap.
    for case in CASES:
        for broken, gather in BROKEN_GATHERS.items():
            with distributed_replaced("gather_with_grad", gather):
                results[f"broken/{broken}/{case}"] = ddp_run(case, rank)
        results[f"broken/no_ddp/{case}"] = unwrapped_run(case, rank)
    leave_process_group()
    save_rank_result(out_dir, rank, results)


def single_process(case: str) -> dict[str, Tensor]:
    method = build(case)
    return step_results(method, method, *global_views())


@pytest.mark.parametrize("case", sorted(CASES))
def test_ddp_step_equals_single_process(
    ranks: list[dict[str, dict[str, Tensor]]], case: str
) -> None:
    reference = single_process(case)
    assert any(k.startswith("grad/") for k in reference)
    for result in ranks:
        assert max_rel_err(result[case], reference) < 1e-6  # float32: measured 1.0e-7


def test_byol_target_moved_and_matches(ranks: list[dict[str, dict[str, Tensor]]]) -> None:
    reference = single_process("byol")
    initial = dict(build("byol").named_parameters())
    targets = [k for k in reference if k.startswith("param/target_")]
    assert targets
    for key in targets:
        assert not torch.equal(reference[key], initial[key.removeprefix("param/")]), key
        for result in ranks:
            assert rel_err(result["byol"][key], reference[key]) < 1e-6, key  # measured 7.6e-8


@pytest.mark.parametrize("broken", [*sorted(BROKEN_GATHERS), "no_ddp"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_the_comparison_catches_a_broken_distributed_step(
    ranks: list[dict[str, dict[str, Tensor]]], case: str, broken: str
) -> None:
    """Negative controls run by the same 2 processes: the comparison above fails for each."""
    reference = single_process(case)
    for result in (rank[f"broken/{broken}/{case}"] for rank in ranks):
        assert max_rel_err(result, reference) > 1e-3, rel_errs(result, reference)
