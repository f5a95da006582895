"""The Barlow Twins ablations across 2 Gloo processes holding *different* shards.

The distributed rule for every variant: loss and gradients (after DDP's averaging) equal one
process on the concatenated batch. Checked on the embeddings along every computation path a
variant takes (equal and unequal shards), and through DDP on the method with its architecture
options (predictor, stop-gradient, no BatchNorm). One process-group spawn runs every check; the
results are asserted here.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from test_barlow_twins_variants import VARIANTS, paths_of
from torch import Tensor, nn

from barlow import distributed
from barlow.losses import barlow_twins_loss
from barlow.methods import BarlowTwins
from comparisons import max_rel_err, rel_errs
from processes import (
    BROKEN_GATHERS,
    distributed_replaced,
    join_as_rank,
    leave_process_group,
    save_rank_result,
    skewed_embeddings,
)
from processes import even_rows as shard_rows

WORLD_SIZE = 2
GLOBAL_BATCH = 16
EMBED_DIM = 24  # N = 16 < 3·D/4: "auto" picks "sharded_gram", or "reduce_c" for a temperature
UNEVEN_ROWS = ((0, 5), (5, 16))
IN_DIM = 6
METHOD_CASES: dict[str, dict[str, Any]] = {
    "predictor+stop_gradient": {"predictor": "20-12", "stop_gradient": True},
    "no_bn+feature+temperature": {
        "projector_bn": False,
        "normalize": "feature",
        "temperature": 0.3,
        # No predictor here: a BatchNorm-free hidden layer right before the loss's centring makes
        # its bias's gradient nearly 0 and its float32 rounding (8e-6 of float64) the test.
    },
    "no_bn+none+invariance": {
        "projector_bn": False,
        "normalize": "none",
        "terms": "invariance",
        "stop_gradient": True,
    },
    "redundancy+gram": {"terms": "redundancy", "loss_path": "gram", "stop_gradient": True},
}
# Negative controls: a collective broken so that each rank sees its own rows only.
BROKEN = {
    "none/reduce_c": ("none", "reduce_c", "all_reduce_with_grad", lambda x: x),
    "temperature/reduce_c": ("temperature", "reduce_c", "all_reduce_with_grad", lambda x: x),
    "feature/correlation": (
        "feature",
        "correlation",
        "gather_with_grad",
        BROKEN_GATHERS["no_gather"],
    ),
    "temperature/no_grad_sum": (
        "temperature",
        "correlation",
        "gather_with_grad",
        BROKEN_GATHERS["no_grad_sum"],
    ),
}


def global_embeddings() -> tuple[Tensor, Tensor]:
    """Rank 1's rows 4× larger than rank 0's and shifted by ±3; columns over 2 decades."""
    return skewed_embeddings(GLOBAL_BATCH, EMBED_DIM, 4.0, 3.0, decades=2)


def even_rows(rank: int) -> tuple[int, int]:
    return shard_rows(rank, GLOBAL_BATCH, WORLD_SIZE)


def embedding_run(name: str, path: str, rows: tuple[int, int]) -> dict[str, Tensor]:
    """Variant ``name``'s loss terms along ``path`` and the gradients w.r.t. rows ``rows``."""
    z1, z2 = global_embeddings()
    a = z1[rows[0] : rows[1]].clone().requires_grad_()
    b = z2[rows[0] : rows[1]].clone().requires_grad_()
    out = barlow_twins_loss(a, b, path=path, **VARIANTS[name])  # type: ignore[arg-type]
    out.loss.backward()
    return {
        "loss": out.loss.detach(),
        "on_diag": out.on_diag.detach(),
        "off_diag": out.off_diag.detach(),
        "z1": torch.as_tensor(a.grad),
        "z2": torch.as_tensor(b.grad),
    }


class TinyBackbone(nn.Module):
    """(B, IN_DIM) → (B, 10): a stand-in for an image encoder."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(IN_DIM, 10), nn.ReLU())
        self.num_features = 10

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.net(x)
        return out


def build(case: str) -> BarlowTwins:
    torch.manual_seed(0)  # the same weights on every rank and in the reference
    method = BarlowTwins(TinyBackbone(), projector="16-12", **METHOD_CASES[case])
    for module in method.modules():
        # The documented CPU policy: BatchNorm is per rank on Gloo (no SyncBatchNorm there).
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
    if method.predictor is not None:
        # Its gradient is 0 in theory (the loss centres along the batch), rounding noise here.
        method.predictor[-1].bias.requires_grad_(False)
    return method


def method_views() -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(1)
    x1 = torch.randn(GLOBAL_BATCH, IN_DIM, generator=gen)
    return x1, x1 + 0.5 * torch.randn(GLOBAL_BATCH, IN_DIM, generator=gen)


def step(model: nn.Module, method: BarlowTwins, rows: tuple[int, int]) -> dict[str, Tensor]:
    x1, x2 = (x[rows[0] : rows[1]] for x in method_views())
    out = model([x1, x2])
    out.loss.backward()
    trainable = {n: p for n, p in method.named_parameters() if p.requires_grad}
    grads = {n: torch.as_tensor(p.grad).clone() for n, p in trainable.items()}
    return {"loss": out.loss.detach(), **out.logs, **grads}


def checks_in_worker(rank: int) -> dict[str, Any]:
    distributed.init_from_env(backend="gloo", timeout_s=60.0)
    results: dict[str, Any] = {}
    for name, variant in VARIANTS.items():
        for path in paths_of(variant):
            results[f"embed/{name}/{path}"] = embedding_run(name, path, even_rows(rank))
        results[f"uneven/{name}"] = embedding_run(name, "reduce_c", UNEVEN_ROWS[rank])
        results[f"uneven_auto/{name}"] = embedding_run(name, "auto", UNEVEN_ROWS[rank])
    for case in METHOD_CASES:
        method = build(case)
        results[f"ddp/{case}"] = step(
            nn.parallel.DistributedDataParallel(method), method, even_rows(rank)
        )
    for key, (name, path, collective, broken) in BROKEN.items():
        with distributed_replaced(collective, broken):
            results[f"broken/{key}"] = embedding_run(name, path, even_rows(rank))
    leave_process_group()
    return results


def worker(rank: int, port: int, out_dir: str) -> None:
    join_as_rank(rank, WORLD_SIZE, port)
    save_rank_result(out_dir, rank, checks_in_worker(rank))


def reference(name: str, rows: tuple[int, int]) -> dict[str, Tensor]:
    """One process, the whole batch, gradients cut to ``rows`` and scaled by W: what a rank's
    gradient must be before DDP's 1/W (``averaged`` divides the rank's instead)."""
    full = embedding_run(name, "correlation", (0, GLOBAL_BATCH))
    return {
        **{k: full[k] for k in ("loss", "on_diag", "off_diag")},
        "z1": full["z1"][rows[0] : rows[1]],
        "z2": full["z2"][rows[0] : rows[1]],
    }


def averaged(result: dict[str, Tensor]) -> dict[str, Tensor]:
    """A rank's embedding gradients divided by W, as DDP's averaging divides them."""
    return {k: v / WORLD_SIZE if k in ("z1", "z2") else v for k, v in result.items()}


EMBED_CASES = [(name, path) for name, v in VARIANTS.items() for path in paths_of(v)]


@pytest.mark.parametrize(("name", "path"), EMBED_CASES)
def test_variant_on_two_ranks_equals_one_process(
    ranks: list[dict[str, Any]], name: str, path: str
) -> None:
    for r, result in enumerate(ranks):
        reference_rows = reference(name, even_rows(r))
        # float32, 2 ranks against 1 process: measured at most 4.7e-7
        assert max_rel_err(averaged(result[f"embed/{name}/{path}"]), reference_rows) < 1e-5


@pytest.mark.parametrize("name", VARIANTS)
def test_variant_with_uneven_shards_equals_one_process(
    ranks: list[dict[str, Any]], name: str
) -> None:
    for r, result in enumerate(ranks):
        reference_rows = reference(name, UNEVEN_ROWS[r])
        uneven, auto = result[f"uneven/{name}"], result[f"uneven_auto/{name}"]
        assert uneven["z1"].shape[0] == UNEVEN_ROWS[r][1] - UNEVEN_ROWS[r][0]
        assert max_rel_err(averaged(uneven), reference_rows) < 1e-5  # measured 8.3e-7
        assert all(torch.equal(auto[k], uneven[k]) for k in uneven)  # "auto" took "reduce_c"


@pytest.mark.parametrize("case", METHOD_CASES)
def test_method_options_under_ddp_equal_one_process(ranks: list[dict[str, Any]], case: str) -> None:
    method = build(case)
    reference_step = step(method, method, (0, GLOBAL_BATCH))
    assert any(k.startswith("projector.") for k in reference_step)
    for result in ranks:
        # float32 parameter gradients after DDP's averaging: measured at most 8.2e-7
        assert max_rel_err(result[f"ddp/{case}"], reference_step) < 1e-5


def test_stop_gradient_and_predictor_change_the_gradients() -> None:
    # Control for the test above: the options reach the gradients (not only the value).
    asymmetric, symmetric = build("predictor+stop_gradient"), build("predictor+stop_gradient")
    symmetric.stop_gradient = False
    a = step(asymmetric, asymmetric, (0, GLOBAL_BATCH))
    b = step(symmetric, symmetric, (0, GLOBAL_BATCH))
    assert torch.equal(a["loss"], b["loss"])
    assert max_rel_err(a, b) > 1e-2


@pytest.mark.parametrize("key", BROKEN)
def test_the_comparison_catches_a_broken_collective(ranks: list[dict[str, Any]], key: str) -> None:
    name = BROKEN[key][0]
    for r, result in enumerate(ranks):
        broken, reference_rows = averaged(result[f"broken/{key}"]), reference(name, even_rows(r))
        assert max_rel_err(broken, reference_rows) > 1e-2, rel_errs(broken, reference_rows)
