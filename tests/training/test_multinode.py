"""Two nodes on one host: ``torchrun --nnodes 2 --nproc-per-node 1`` twice, joined by a c10d
rendezvous on 127.0.0.1, as ``srun torchrun`` starts one agent per node on a cluster.

Each node runs :func:`node_main` (through a stub script): the distributed rule for Barlow Twins
across the two nodes — the loss and the gradients after DDP's averaging equal one process on the
global batch — with a negative control in the same process group (both nodes on the same half of
the batch), then a real ``barlow pretrain`` of 3 steps. The same script under a single-node
``torchrun --nproc-per-node 2`` is the reference for the run: gradients and final weights must be
bit-identical, since only the launch differs. The two launches start at once (one fixture) and
take about 40 s together on a loaded 2-core machine, most of it importing torch.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from barlow import distributed
from barlow.config import load_config
from barlow.encoder import build_method, crop_size
from barlow.methods import Method
from barlow.training import wrap_for_training
from comparisons import assert_identical, max_rel_err
from processes import free_port, leave_process_group, save_rank_result
from runs import FAST, records, sets, weights

pytestmark = pytest.mark.slow

WORLD_SIZE = 2
GLOBAL_BATCH = 16
TIMEOUT_S = 300  # per launch: a hang fails the test instead of blocking it
WAIT_S = 120  # the longest wait for the other node: rendezvous, process group, collectives
TESTS = Path(__file__).parents[1]
PRETRAIN = [*FAST, "train.max_steps=3", "train.log_every=1", f"train.dist_timeout_s={WAIT_S}"]
ENV_KEYS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "GROUP_RANK", "LOCAL_WORLD_SIZE")

STUB = """\
import sys
sys.path[:0] = {paths!r}
from test_multinode import node_main
raise SystemExit(node_main(sys.argv[1], sys.argv[2:]))
"""


def build() -> Method:
    """The digits recipe's Barlow Twins (small CNN, 16-16 projector), the same weights on every
    node. BatchNorm in eval mode: on CPU each process normalises its own shard (SyncBatchNorm
    refuses CPU tensors), so batch statistics would differ from one process's by design; the rule
    is about the loss, which sees the global batch."""
    torch.manual_seed(0)
    method = build_method(load_config("digits", FAST))
    for module in method.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
    return method


def global_views() -> tuple[Tensor, Tensor]:
    side = crop_size(load_config("digits", FAST))
    gen = torch.Generator().manual_seed(1)
    x1 = torch.randn(GLOBAL_BATCH, 1, side, side, generator=gen)
    return x1, x1 + 0.5 * torch.randn(GLOBAL_BATCH, 1, side, side, generator=gen)


def shard(rank: int) -> slice:
    """Rank ``rank``'s rows of the global batch: its contiguous half."""
    rows = GLOBAL_BATCH // WORLD_SIZE
    return slice(rank * rows, (rank + 1) * rows)


def step(rows: slice) -> dict[str, Tensor]:
    """The loss and every parameter's gradient of one forward and backward on ``rows`` of the
    global batch, the method wrapped as the training loop wraps it (DDP in a process group;
    channels_last in the reference too, so that only the distribution differs)."""
    method = build()
    model = wrap_for_training(
        method,
        device=torch.device("cpu"),
        world=distributed.world_size(),
        channels_last=True,
        sync_batchnorm=True,
    )
    x1, x2 = global_views()
    loss = model([x1[rows], x2[rows]]).loss
    loss.backward()
    grads = {f"grad/{n}": torch.as_tensor(p.grad).clone() for n, p in method.named_parameters()}
    return {"loss": loss.detach(), **grads}


def node_main(out_dir: str, pretrain_args: Sequence[str]) -> int:
    """In a torchrun worker: the gradient checks, saved as ``rank<R>.pt`` in ``out_dir``, then
    ``barlow pretrain PRETRAIN_ARGS`` in the same process group."""
    from barlow.cli import main

    torch.set_flush_denormal(True)  # as barlow's main does before any tensor work
    distributed.init_from_env(backend="gloo", timeout_s=WAIT_S)
    rank = distributed.rank()
    results: dict[str, Any] = {
        "env": {k: os.environ[k] for k in ENV_KEYS},
        "group": (distributed.rank(), distributed.world_size()),
        "ddp": step(shard(rank)),
        "same_shard": step(shard(0)),  # negative control: both nodes on rank 0's half
    }
    save_rank_result(out_dir, rank, results)
    try:
        return main(["pretrain", *pretrain_args])
    finally:
        leave_process_group()  # this stub made the group, so it ends it


@dataclass
class Launch:
    """What one launch left, after every torchrun exited 0."""

    logs: list[str]  # each torchrun's stdout and stderr, its workers' included
    ranks: list[dict[str, Any]]  # what node_main saved, in rank order
    run: Path  # the pretraining run directory


def torchrun(extra: Sequence[str], logs: Path, script: Path, out: Path) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--max-restarts", "0", *extra]
    cmd += [str(script), str(out), "--out", str(out / "run"), "--quiet", *sets(*PRETRAIN)]
    with logs.open("w") as log:  # a file, not a pipe: a full pipe would stall a node
        return subprocess.Popen(
            cmd,
            env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""},
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # killpg reaches the workers too
        )


def launch(launches: dict[str, list[list[str]]], tmp: Path) -> dict[str, Launch]:
    """Start every launch at once, one torchrun per entry of its list (that node's launcher
    flags), each node running :func:`node_main` in ``tmp/<launch name>``; wait for all, killing
    every process group after :data:`TIMEOUT_S`. At once: on a loaded machine the launches
    overlap their seconds of importing torch."""
    procs: dict[str, list[subprocess.Popen[str]]] = {}
    for name, nodes in launches.items():
        out = tmp / name
        out.mkdir()
        script = out / "node.py"
        script.write_text(STUB.format(paths=[str(Path(__file__).parent), str(TESTS)]))
        logs = [out / f"torchrun{i}.log" for i in range(len(nodes))]
        procs[name] = [torchrun(*node, script, out) for node in zip(nodes, logs, strict=True)]
    everything = [proc for started in procs.values() for proc in started]
    deadline = time.monotonic() + TIMEOUT_S
    try:
        for proc in everything:
            proc.wait(timeout=max(deadline - time.monotonic(), 0))
    except subprocess.TimeoutExpired:
        for proc in everything:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        raise
    done = {}
    for name, started in procs.items():
        out = tmp / name
        texts = [(out / f"torchrun{i}.log").read_text() for i in range(len(started))]
        returncodes = [proc.returncode for proc in started]
        assert returncodes == [0] * len(started), "\n\n".join(t[-3000:] for t in texts)
        ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD_SIZE)]
        done[name] = Launch(texts, ranks, out / "run")
    return done


def two_nodes(rendezvous_id: str) -> list[list[str]]:
    rendezvous = [
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{free_port()}",
        "--rdzv-id",
        rendezvous_id,
        "--rdzv-conf",
        f"join_timeout={WAIT_S},read_timeout={WAIT_S}",
    ]
    return [["--nnodes", "2", "--nproc-per-node", "1", *rendezvous]] * 2


def losses(run: Path) -> list[tuple[int, float, float, float]]:
    return [(r["step"], r["loss"], r["on_diag"], r["off_diag"]) for r in records(run, "train")]


@pytest.fixture(scope="module")
def launches(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Launch]:
    single_node = ["--nproc-per-node", "2", "--master-port", str(free_port())]
    return launch(
        {"multinode": two_nodes(uuid.uuid4().hex), "single_node": [single_node]},
        tmp_path_factory.mktemp("launches"),
    )


@pytest.fixture(scope="module")
def multinode(launches: dict[str, Launch]) -> Launch:
    return launches["multinode"]


@pytest.fixture(scope="module")
def single_node(launches: dict[str, Launch]) -> Launch:
    return launches["single_node"]


@pytest.fixture(scope="module")
def reference() -> dict[str, Tensor]:
    """One process on the global batch."""
    return step(slice(None))


def test_each_node_is_one_rank_of_a_world_of_two(multinode: Launch) -> None:
    for r, result in enumerate(multinode.ranks):
        assert result["group"] == (r, WORLD_SIZE)
        env = {"RANK": str(r), "LOCAL_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1"}
        assert result["env"] == {**env, "GROUP_RANK": str(r)}  # node r holds rank r


def test_loss_and_gradients_across_nodes_equal_one_process(
    multinode: Launch, reference: dict[str, Tensor]
) -> None:
    assert len(reference) > 10  # the loss and every parameter's gradient
    for result in multinode.ranks:
        assert max_rel_err(result["ddp"], reference) < 5e-6  # measured 5.2e-7


def test_the_comparison_catches_nodes_on_the_same_shard(
    multinode: Launch, reference: dict[str, Tensor]
) -> None:
    for result in multinode.ranks:
        assert max_rel_err(result["same_shard"], reference) > 1e-2


def test_pretraining_on_two_nodes_writes_one_checkpoint(multinode: Launch) -> None:
    run = multinode.run
    # One save, at step 3: the checkpoint and its step-numbered snapshot.
    names = sorted(p.name for p in run.glob("checkpoint*.pt"))
    assert names == ["checkpoint-step00000003.pt", "checkpoint.pt"]
    saved = torch.load(run / "checkpoint.pt", weights_only=True)
    assert saved["global_step"] == 3 and len(saved["rng"]) == WORLD_SIZE  # one state per rank
    assert weights(run)  # complete and finite, or weights() raises
    assert [r["step"] for r in records(run, "train")] == [1, 2, 3]  # one logger: rank 0's
    headers = [log.count("2 process(es) on cpu") for log in multinode.logs]
    assert sorted(headers) == [0, 1]  # printed by rank 0, on whichever node it is


def test_two_nodes_train_as_one_node_with_two_processes(
    multinode: Launch, single_node: Launch
) -> None:
    """Only the launch differs: the same ranks on the same shards, bit for bit."""
    for on_two_nodes, on_one_node in zip(multinode.ranks, single_node.ranks, strict=True):
        assert_identical(on_two_nodes["ddp"], on_one_node["ddp"])
    assert losses(multinode.run) == losses(single_node.run)
    assert_identical(weights(multinode.run), weights(single_node.run))
