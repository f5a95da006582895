"""channels_last under DDP (2 gloo processes): ``training.wrap_for_training`` converts the layout
before DDP builds its gradient buckets, so the first step's averaged gradients equal one process's.

Reference: BatchNorm normalises per process on CPU, so DDP's gradient is the mean of the gradients
of each process's half of the batch computed alone. The negative control converts after wrapping
(the order the training loop used to have) and must be far off, or the test could not fail.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import Tensor, nn

from barlow.backbones import SmallCNN
from barlow.training import wrap_for_training
from comparisons import max_rel_err
from processes import join_as_rank, save_rank_result

WORLD_SIZE, HALF = 2, 4
CPU = torch.device("cpu")


def images() -> Tensor:
    return torch.randn(WORLD_SIZE * HALF, 1, 28, 28, generator=torch.Generator().manual_seed(1))


def model() -> nn.Module:
    torch.manual_seed(0)
    return SmallCNN(in_channels=1)


def first_step_gradients(net: nn.Module, x: Tensor, params: nn.Module) -> dict[str, Tensor]:
    net(x.contiguous(memory_format=torch.channels_last)).square().sum().backward()
    grads = {}
    for name, p in params.named_parameters():
        assert p.grad is not None
        grads[name] = p.grad.detach().contiguous().clone()
    return grads


def worker(rank: int, port: int, out_dir: str) -> None:
    join_as_rank(rank, WORLD_SIZE, port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    x = images()[rank * HALF : (rank + 1) * HALF]
    results: dict[str, Any] = {}
    method = model()
    wrapped = wrap_for_training(
        method, device=CPU, world=WORLD_SIZE, channels_last=True, sync_batchnorm=True
    )
    results["wrap_for_training"] = first_step_gradients(wrapped, x, method)
    late = model()
    late_wrapped = nn.parallel.DistributedDataParallel(late).to(memory_format=torch.channels_last)
    results["converted_after_ddp"] = first_step_gradients(late_wrapped, x, late)
    dist.destroy_process_group()
    save_rank_result(out_dir, rank, results)


@pytest.fixture(scope="module")
def rank0(ranks: list[dict[str, dict[str, Tensor]]]) -> dict[str, dict[str, Tensor]]:
    return ranks[0]


def reference() -> dict[str, Tensor]:
    x = images()
    total: dict[str, Tensor] = {}
    for r in range(WORLD_SIZE):
        net = model()
        grads = first_step_gradients(net, x[r * HALF : (r + 1) * HALF], net)
        for name, g in grads.items():
            total[name] = total.get(name, torch.zeros_like(g)) + g / WORLD_SIZE
    return total


def test_first_step_gradients_equal_one_process(rank0: dict[str, dict[str, Tensor]]) -> None:
    assert max_rel_err(rank0["wrap_for_training"], reference()) < 1e-4


def test_converting_after_ddp_would_scramble_them(rank0: dict[str, dict[str, Tensor]]) -> None:
    assert max_rel_err(rank0["converted_after_ddp"], reference()) > 0.1
