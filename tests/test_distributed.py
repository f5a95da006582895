"""barlow.distributed and the distributed rule, with 2 Gloo processes on CPU.

Rule: with W processes each holding a *different* shard of the global batch, the loss and the
gradients after DDP's averaging equal one process on the concatenated batch. Both processes are
spawned once; every check runs inside that one process group and the results are asserted here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from barlow import distributed
from barlow.losses import barlow_twins_loss
from comparisons import max_rel_err, rel_err
from processes import (
    BROKEN_GATHERS,
    distributed_replaced,
    join_as_rank,
    leave_process_group,
    save_rank_result,
)

WORLD_SIZE = 2
GLOBAL_BATCH = 16
IN_DIM, HIDDEN, OUT_DIM = 6, 12, 10
PATHS = ("correlation", "gram")


class TwoViewLoss(nn.Module):
    """A projector and the Barlow Twins loss along ``path`` in one forward, as a Method runs
    under DDP (also the model of tests/losses/test_barlow_twins_distributed.py)."""

    def __init__(self, path: str, out_dim: int = OUT_DIM) -> None:
        super().__init__()
        torch.manual_seed(0)  # the same weights on every rank and in the reference
        # Last Linear bias-free, as in heads.mlp: the loss standardises z, so a bias there gets
        # a gradient of exactly 0 in theory and rounding noise in practice.
        self.projector = nn.Sequential(
            nn.Linear(IN_DIM, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, out_dim, bias=False)
        )
        self.path = path

    def forward(self, x1: Tensor, x2: Tensor) -> Tensor:
        z1, z2 = self.projector(x1), self.projector(x2)
        return barlow_twins_loss(z1, z2, path=self.path).loss  # type: ignore[arg-type]


def global_views() -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(1)
    x1 = torch.randn(GLOBAL_BATCH, IN_DIM, generator=gen)
    return x1, x1 + 0.5 * torch.randn(GLOBAL_BATCH, IN_DIM, generator=gen)


def shard(x: Tensor, rank: int) -> Tensor:
    rows = GLOBAL_BATCH // WORLD_SIZE
    return x[rank * rows : (rank + 1) * rows]


def loss_and_grads(model: nn.Module, x1: Tensor, x2: Tensor) -> dict[str, Tensor]:
    loss = model(x1, x2)
    loss.backward()
    module = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    grads = {name: torch.as_tensor(p.grad).clone() for name, p in module.named_parameters()}
    return {"loss": loss.detach(), **grads}


def ddp_run(path: str, rank: int) -> dict[str, Tensor]:
    model = nn.parallel.DistributedDataParallel(TwoViewLoss(path))
    x1, x2 = global_views()
    return loss_and_grads(model, shard(x1, rank), shard(x2, rank))


def checks_in_worker(rank: int) -> dict[str, Any]:
    results: dict[str, Any] = {
        "device": str(distributed.init_from_env(backend="gloo")),
        "again": str(distributed.init_from_env(backend="gloo")),  # idempotent
        "world_size": distributed.world_size(),
        "rank": distributed.rank(),
        "local_rank": distributed.local_rank(),
        "is_main": distributed.is_main_process(),
    }
    for path in PATHS:
        results[f"ddp/{path}"] = ddp_run(path, rank)

    # Negative controls: the same comparison must notice a loss that skips the gather, and a
    # gather whose backward does not sum gradients across ranks.
    for name, broken in BROKEN_GATHERS.items():
        with distributed_replaced("gather_with_grad", broken):
            results[f"broken/{name}"] = ddp_run("gram", rank)

    # gather_with_grad on its own: rank-specific rows in, rank-specific loss weights out.
    x = torch.full((2, 3), float(rank + 1), requires_grad=True)
    gathered = distributed.gather_with_grad(x)
    weights = torch.arange(12.0).view(4, 3) * (rank + 1)
    (gathered * weights).sum().backward()
    results["gather/value"] = gathered.detach()
    results["gather/grad"] = x.grad

    no_grad = distributed.all_gather_no_grad(x)
    results["gather_no_grad/value"] = no_grad
    results["gather_no_grad/requires_grad"] = no_grad.requires_grad
    local = torch.tensor([rank + 1.0, 10.0 * rank])
    results["sum"] = distributed.all_reduce_sum(local)
    results["mean"] = distributed.all_reduce_mean(local)
    results["local_untouched"] = local
    cpu = torch.device("cpu")
    results["any/one"] = distributed.any_rank(rank == 1, cpu)
    results["any/none"] = distributed.any_rank(False, cpu)
    results["any/all"] = distributed.any_rank(True, cpu)
    results["broadcast"] = distributed.broadcast_object({"from": rank}, src=1)
    distributed.barrier()
    distributed.leave()  # the group init_from_env made: what the command line does at its end
    results["after_shutdown"] = (distributed.is_distributed(), distributed.world_size())
    distributed.leave()  # and again: nothing left to end
    return results


def worker(rank: int, port: int, out_dir: str) -> None:
    join_as_rank(rank, WORLD_SIZE, port)
    save_rank_result(out_dir, rank, checks_in_worker(rank))


@pytest.fixture(scope="module")
def single_process() -> Iterator[Callable[[str], dict[str, Tensor]]]:
    def run(path: str) -> dict[str, Tensor]:
        return loss_and_grads(TwoViewLoss(path), *global_views())

    yield run


def test_process_group_facts(ranks: list[dict[str, Any]]) -> None:
    for r, result in enumerate(ranks):
        assert result["device"] == result["again"] == "cpu"
        assert (result["world_size"], result["rank"], result["local_rank"]) == (2, r, r)
        assert result["is_main"] == (r == 0)
        assert result["after_shutdown"] == (False, 1)


def test_ranks_hold_different_data() -> None:
    x1, _ = global_views()
    assert not torch.allclose(shard(x1, 0), shard(x1, 1))


@pytest.mark.parametrize("path", PATHS)
def test_ddp_loss_and_gradients_equal_single_process(
    ranks: list[dict[str, Any]], single_process: Callable[[str], dict[str, Tensor]], path: str
) -> None:
    reference = single_process(path)
    for result in ranks:
        assert max_rel_err(result[f"ddp/{path}"], reference) < 2e-6  # measured 1.7e-7


@pytest.mark.parametrize("broken", sorted(BROKEN_GATHERS))
def test_the_comparison_catches_broken_gathering(
    ranks: list[dict[str, Any]], single_process: Callable[[str], dict[str, Tensor]], broken: str
) -> None:
    reference = single_process("gram")
    for result in (rank[f"broken/{broken}"] for rank in ranks):
        assert max_rel_err(result, reference) > 1e-2
        if broken == "no_grad_sum":
            # The loss is right; only the gradients are off, by the factor 1/W.
            assert rel_err(result["loss"], reference["loss"]) < 2e-6
            weight = "projector.2.weight"
            assert rel_err(result[weight], reference[weight] / WORLD_SIZE) < 2e-6


def test_local_shard_loss_differs_from_global_loss(
    single_process: Callable[[str], dict[str, Tensor]],
) -> None:
    x1, x2 = global_views()
    local = TwoViewLoss("gram")(shard(x1, 0), shard(x2, 0))
    assert rel_err(local.detach(), single_process("gram")["loss"]) > 1e-2


def test_gather_with_grad_forward_and_backward(ranks: list[dict[str, Any]]) -> None:
    expected_value = torch.cat([torch.full((2, 3), 1.0), torch.full((2, 3), 2.0)])
    # d/dx_r Σ_s Σ gathered·weights_s = Σ_s weights_s[rows of r] = (1 + 2)·arange[rows of r]
    summed_weights = torch.arange(12.0).view(4, 3) * 3
    for r, result in enumerate(ranks):
        assert torch.equal(result["gather/value"], expected_value)
        assert torch.equal(result["gather/grad"], summed_weights[2 * r : 2 * r + 2])
        assert torch.equal(result["gather_no_grad/value"], expected_value)
        assert result["gather_no_grad/requires_grad"] is False


def test_reductions_and_agreement(ranks: list[dict[str, Any]]) -> None:
    for r, result in enumerate(ranks):
        assert torch.equal(result["sum"], torch.tensor([3.0, 10.0]))
        assert torch.equal(result["mean"], torch.tensor([1.5, 5.0]))
        assert torch.equal(result["local_untouched"], torch.tensor([r + 1.0, 10.0 * r]))
        assert (result["any/one"], result["any/none"], result["any/all"]) == (True, False, True)
        assert result["broadcast"] == {"from": 1}


def test_single_process_fallbacks(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert not distributed.is_distributed()
    expected_device = "cuda:0" if torch.cuda.is_available() else "cpu"
    assert str(distributed.init_from_env()) == expected_device
    assert not distributed.is_distributed()  # no group without torchrun
    assert (distributed.world_size(), distributed.rank(), distributed.local_rank()) == (1, 0, 0)
    assert distributed.is_main_process()
    x = torch.randn(3, 2, requires_grad=True)
    assert distributed.gather_with_grad(x) is x
    assert torch.equal(distributed.all_gather_no_grad(x), x)
    reduced = distributed.all_reduce_mean(x)
    assert torch.equal(reduced, x) and not reduced.requires_grad
    assert distributed.any_rank(True, torch.device("cpu"))
    assert not distributed.any_rank(False, torch.device("cpu"))
    assert distributed.broadcast_object("run-1") == "run-1"
    distributed.barrier()
    leave_process_group()


def test_environment_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCAL_RANK", "two")
    with pytest.raises(ValueError, match="LOCAL_RANK='two' is not an integer"):
        distributed.local_rank()
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match=r"RANK, MASTER_ADDR, MASTER_PORT not set.*torchrun"):
        distributed.init_from_env(backend="gloo")
