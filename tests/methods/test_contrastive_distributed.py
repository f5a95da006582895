"""SimCLR, MoCo and CMC under DDP with 2 Gloo processes equal one process on the whole batch.

Each rank holds a *different* half of the global batch. BatchNorm layers run in eval mode: on
CPU, SyncBatchNorm is unavailable and BatchNorm is per rank (the documented CPU policy), so batch
statistics would differ from one process by design. Float64 (three SGD steps amplify float32
rounding of BatchNorm gradients past 1e-5): the worst relative error measured is 3.6e-14, the
bound 1e-12, and every broken implementation below is off by 0.5 or more. Both processes are
spawned once; every check runs in that one process group and the results are asserted here
(the pattern of test_distributed.py).
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
from comparisons import max_rel_err, rel_err, rel_errs
from processes import (
    BROKEN_CONTRASTIVE_GATHERS,
    distributed_replaced,
    join_as_rank,
    leave_process_group,
    save_rank_result,
)

WORLD_SIZE = 2
GLOBAL_BATCH = 8
MOCO_STEPS = 3  # 3 batches of 8 keys in a queue of 20: the ring wraps around
QUEUE_SIZE = 20
TOLERANCE = 1e-12  # float64: measured 3.6e-14


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


def ddp_steps(name: str, rank: int) -> dict[str, Tensor]:
    return train_steps(name, nn.parallel.DistributedDataParallel(build(name)), rank)


def checks_in_worker(rank: int) -> dict[str, Any]:
    distributed.init_from_env(backend="gloo")
    results: dict[str, Any] = {name: ddp_steps(name, rank) for name in NAMES}
    # Negative controls, in the same process group: SimCLR and CMC with a gather that does not
    # sum gradients across ranks or puts the ranks in the wrong order; MoCo enqueueing only its
    # own rank's keys.
    for broken, gather in BROKEN_CONTRASTIVE_GATHERS.items():
        with distributed_replaced("gather_with_grad", gather):
            for name in ("simclr", "cmc"):
                results[f"broken/{broken}/{name}"] = ddp_steps(name, rank)
    with distributed_replaced("all_gather_no_grad", lambda keys: keys):
        results["broken/local_queue/moco"] = ddp_steps("moco", rank)
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
        errors = rel_errs(result[name], reference)
        assert max_rel_err(result[name], reference) < TOLERANCE, errors


def test_moco_queue_holds_the_keys_of_both_ranks(
    single_process: Callable[[str], dict[str, Tensor]], ranks: list[dict[str, Any]]
) -> None:
    reference = single_process("moco")
    assert reference["queue_ptr"].item() == (MOCO_STEPS * GLOBAL_BATCH) % QUEUE_SIZE
    for result in ranks:
        assert rel_err(result["moco"]["queue"], reference["queue"]) < TOLERANCE


CONTROLS = [
    *(
        f"broken/{broken}/{name}"
        for broken in sorted(BROKEN_CONTRASTIVE_GATHERS)
        for name in ("simclr", "cmc")
    ),
    "broken/local_queue/moco",
]


@pytest.mark.parametrize("control", CONTROLS)
def test_the_comparison_catches_a_broken_distributed_step(
    ranks: list[dict[str, Any]], single_process: Callable[[str], dict[str, Tensor]], control: str
) -> None:
    """Negative controls run by the same 2 processes: the comparison above fails for each."""
    name = control.split("/")[-1]
    reference = single_process(name)
    for result in ranks:
        assert max_rel_err(result[control], reference) > 1e-2, rel_errs(result[control], reference)
    if control == "broken/local_queue/moco":
        # The first step has no queued keys of this batch yet: only the later steps and the
        # queue tell the two apart, and the queue check above sees it.
        for result in ranks:
            assert rel_err(result[control]["0/loss"], reference["0/loss"]) < TOLERANCE
            assert rel_err(result[control]["queue"], reference["queue"]) > 1e-2
