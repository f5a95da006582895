"""SimCLR, MoCo and CMC under DDP with 2 Gloo processes equal one process on the whole batch.

Each rank holds a *different* half of the global batch. BatchNorm layers run in eval mode: on
CPU, SyncBatchNorm is unavailable and BatchNorm is per rank (the documented CPU policy), so batch
statistics would differ from one process by design. Float64, so that the 1e-5 tolerance is far
above rounding (three SGD steps amplify float32 rounding of BatchNorm gradients past 1e-5) and
far below any real error (a missing gather or a gradient at 1/W is off by percents). Both
processes are spawned once; every check runs in that one process group and the results are
asserted here (the pattern of test_distributed.py).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from barlow import distributed
from barlow.backbones import create_backbone
from barlow.methods import CMC, Method, MoCo, SimCLR
from comparisons import rel_err
from processes import join_as_rank, leave_process_group, save_rank_result

WORLD_SIZE = 2
GLOBAL_BATCH = 8
MOCO_STEPS = 3  # 3 batches of 8 keys in a queue of 20: the ring wraps around
QUEUE_SIZE = 20


def build(name: str) -> Method:
    torch.manual_seed(0)  # the same weights (and queue) on every rank and in the reference
    gray = create_backbone("small_cnn", in_channels=1)
    method: Method
    if name == "simclr":
        method = SimCLR(gray, projector="16-8")
    elif name == "moco":
        method = MoCo(gray, projector="16-8", queue_size=QUEUE_SIZE, key_momentum=0.9)
    elif name == "cmc":
        method = CMC(gray, projector="8", num_views=3)
    else:  # "cmc-lab": two encoders on L and ab of 2 colour views
        colour = create_backbone("small_cnn", in_channels=3)
        method = CMC(colour, projector="8", split="lab", num_views=2, rgb_stats="cifar10")
    for module in method.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
    return method.double()


NAMES = ("simclr", "moco", "cmc", "cmc-lab")


def global_views(name: str, step: int = 0) -> list[Tensor]:
    gen = torch.Generator().manual_seed(100 * step + NAMES.index(name))
    method_views = {"simclr": 2, "moco": 2, "cmc": 3, "cmc-lab": 2}[name]
    channels = 3 if name == "cmc-lab" else 1
    x = torch.randn(GLOBAL_BATCH, channels, 12, 12, generator=gen)
    views = [x + 0.5 * torch.randn(x.shape, generator=gen) for _ in range(method_views)]
    return [v.double() for v in views]


def shard(x: Tensor, rank: int) -> Tensor:
    rows = GLOBAL_BATCH // WORLD_SIZE
    return x[rank * rows : (rank + 1) * rows]


def train_steps(name: str, model: nn.Module, rank: int | None) -> dict[str, Tensor]:
    """Loss and gradients of each step (SGD in between), plus MoCo's queue and key encoder."""
    method = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.1)
    results: dict[str, Tensor] = {}
    for step in range(MOCO_STEPS if name == "moco" else 1):
        views = global_views(name, step)
        if rank is not None:
            views = [shard(v, rank) for v in views]
        opt.zero_grad()
        loss = model(views).loss
        loss.backward()
        results[f"{step}/loss"] = loss.detach()
        for p_name, p in method.named_parameters():
            if p.requires_grad:
                results[f"{step}/grad/{p_name}"] = torch.as_tensor(p.grad).clone()
        opt.step()
        method.after_step((step + 1) / MOCO_STEPS)
    if isinstance(method, MoCo):
        results["queue"] = method.queue.clone()
        results["queue_ptr"] = method.queue_ptr.clone().float()
        for p_name, p in method.key_backbone.named_parameters():
            results[f"key/{p_name}"] = p.detach().clone()
    return results


def checks_in_worker(rank: int) -> dict[str, Any]:
    distributed.init_from_env(backend="gloo")
    results = {
        name: train_steps(name, nn.parallel.DistributedDataParallel(build(name)), rank)
        for name in NAMES
    }
    leave_process_group()
    return results


def worker(rank: int, port: int, out_dir: str) -> None:
    join_as_rank(rank, WORLD_SIZE, port)
    save_rank_result(out_dir, rank, checks_in_worker(rank))


@pytest.fixture(scope="module")
def single_process() -> Callable[[str], dict[str, Tensor]]:
    @functools.cache
    def run(name: str) -> dict[str, Tensor]:
        return train_steps(name, build(name), rank=None)

    return run


def test_ranks_hold_different_data() -> None:
    for name in NAMES:
        x = global_views(name)[0]
        assert not torch.allclose(shard(x, 0), shard(x, 1))


@pytest.mark.parametrize("name", NAMES)
def test_ddp_equals_one_process_on_the_global_batch(
    ranks: list[dict[str, Any]], single_process: Callable[[str], dict[str, Tensor]], name: str
) -> None:
    reference = single_process(name)
    for result in ranks:
        got = result[name]
        assert got.keys() == reference.keys()
        errors = {key: rel_err(got[key], reference[key]) for key in reference}
        worst = max(errors, key=errors.__getitem__)
        assert errors[worst] < 1e-5, (worst, errors[worst])


def test_moco_queue_holds_the_keys_of_both_ranks(
    single_process: Callable[[str], dict[str, Tensor]], ranks: list[dict[str, Any]]
) -> None:
    reference = single_process("moco")
    assert reference["queue_ptr"].item() == (MOCO_STEPS * GLOBAL_BATCH) % QUEUE_SIZE
    for result in ranks:
        assert torch.allclose(result["moco"]["queue"], reference["queue"], atol=1e-6)


def test_the_comparison_sees_a_local_shard(
    single_process: Callable[[str], dict[str, Tensor]],
) -> None:
    """A rank that skipped the gather would see half the negatives: a different loss."""
    for name in ("simclr", "cmc"):
        views = [shard(v, 0) for v in global_views(name)]
        local = build(name)(views).loss.detach()
        assert rel_err(local, single_process(name)["0/loss"]) > 1e-2
