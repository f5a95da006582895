"""Barlow Twins across processes ("reduce_c", "sharded_gram", "auto") and the loss cost model.

The distributed rule, with 2 Gloo processes holding *different* data: the loss and the gradients
after DDP's averaging equal one process on the concatenated batch (here: the "correlation" path
in one process). Checked through DDP on a projector's parameters and directly on the embeddings
(a rank's gradient divided by W against the reference's rows), with the two ranks' rows of very
different magnitude. One process-group spawn runs every check; the results are asserted here.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn

from barlow import distributed
from barlow.losses import (
    BARLOW_TWINS_COMPUTATIONS,
    barlow_loss_cost,
    barlow_twins_loss,
    choose_path,
    finite_checks_by_caller,
)
from comparisons import max_rel_err, rel_err
from processes import even_rows as shard_rows
from processes import join_as_rank, leave_process_group, save_rank_result, skewed_embeddings
from test_distributed import (
    GLOBAL_BATCH,
    OUT_DIM,
    WORLD_SIZE,
    TwoViewLoss,
    global_views,
    loss_and_grads,
)

EMBED_DIM = 24  # width of the embedding-level checks
DISTRIBUTED_PATHS = ("reduce_c", "sharded_gram")
# Widths at which "auto" picks each distributed path for N = 16, W = 2 (asserted below).
AUTO_WIDTHS = {"reduce_c": 4, "sharded_gram": 32}
UNEVEN_ROWS = ((0, 6), (6, 16))  # shards of different sizes
EMPTY_ROWS = ((0, 0), (0, 16))  # rank 0 holds nothing
TINY_ROWS = ((0, 1), (1, 1))  # one sample in the whole batch


def global_embeddings() -> tuple[Tensor, Tensor]:
    """Rank 1's rows 40× larger than rank 0's and shifted by ±300; columns over 4 decades.

    Standardising with one rank's statistics, or Σz² − (Σz)² in float32, would show here.
    """
    return skewed_embeddings(GLOBAL_BATCH, EMBED_DIM, 40.0, 300.0, decades=4)


def even_rows(rank: int) -> tuple[int, int]:
    return shard_rows(rank, GLOBAL_BATCH, WORLD_SIZE)


def ddp_run(path: str, rank: int, out_dim: int = OUT_DIM) -> dict[str, Tensor]:
    model = nn.parallel.DistributedDataParallel(TwoViewLoss(path, out_dim))
    (start, stop), (x1, x2) = even_rows(rank), global_views()
    return loss_and_grads(model, x1[start:stop], x2[start:stop])


def embedding_run(path: str, rows: tuple[int, int], z1: Tensor, z2: Tensor) -> dict[str, Tensor]:
    """Loss terms and the gradients w.r.t. this rank's rows ``rows`` of z1, z2."""
    a = z1[rows[0] : rows[1]].clone().requires_grad_()
    b = z2[rows[0] : rows[1]].clone().requires_grad_()
    out = barlow_twins_loss(a, b, path=path)  # type: ignore[arg-type]
    out.loss.backward()
    return {
        "loss": out.loss.detach(),
        "on_diag": out.on_diag.detach(),
        "off_diag": out.off_diag.detach(),
        "z1": torch.as_tensor(a.grad),
        "z2": torch.as_tensor(b.grad),
    }


def error_of(run: Any) -> str:
    try:
        run()
    except ValueError as error:
        return str(error)
    return "no error"


def gradient_of_own_loss_only(x: Tensor) -> Tensor:
    """The classic bug: a raw all_reduce; the value is the sum, the gradient this rank's alone."""
    return x + (distributed.all_reduce_sum(x) - x.detach())


def checks_in_worker(rank: int) -> dict[str, Any]:
    # A timeout turns a rank left waiting in a collective into a failure instead of a hang.
    distributed.init_from_env(backend="gloo", timeout_s=60.0)
    results: dict[str, Any] = {}
    for path in DISTRIBUTED_PATHS:
        results[f"ddp/{path}"] = ddp_run(path, rank)
    for path, width in AUTO_WIDTHS.items():
        results[f"ddp/auto/{width}"] = ddp_run("auto", rank, width)
        results[f"ddp/explicit/{width}"] = ddp_run(path, rank, width)

    z1, z2 = global_embeddings()
    for path in (*DISTRIBUTED_PATHS, "auto"):
        results[f"embed/{path}"] = embedding_run(path, even_rows(rank), z1, z2)
    rows = UNEVEN_ROWS[rank]
    results["uneven/reduce_c"] = embedding_run("reduce_c", rows, z1, z2)
    results["uneven/auto"] = embedding_run("auto", rows, z1, z2)
    results["empty/reduce_c"] = embedding_run("reduce_c", EMPTY_ROWS[rank], z1, z2)
    results["uneven/sharded_gram"] = error_of(lambda: embedding_run("sharded_gram", rows, z1, z2))
    results["tiny/reduce_c"] = error_of(lambda: embedding_run("reduce_c", TINY_ROWS[rank], z1, z2))
    bad = z2.clone()
    bad[even_rows(1)[0], 3] = float("nan")  # on rank 1's rows only
    for path in (*DISTRIBUTED_PATHS, "auto"):
        results[f"nan/{path}"] = error_of(lambda p=path: embedding_run(p, even_rows(rank), z1, bad))
    with finite_checks_by_caller():  # the caller checks the loss: no error, a NaN loss
        for path in (*DISTRIBUTED_PATHS, "auto"):
            results[f"caller/{path}"] = embedding_run(path, even_rows(rank), z1, bad)["loss"]

    # Negative controls: the same comparisons must notice a sum whose backward is local only,
    # and standardisation / C from this rank's rows alone.
    real = distributed.all_reduce_with_grad
    for name, broken in [("local_grad", gradient_of_own_loss_only), ("no_reduce", lambda x: x)]:
        distributed.all_reduce_with_grad = broken  # losses looks it up at call time
        try:
            for path in DISTRIBUTED_PATHS:
                results[f"broken/{name}/{path}"] = ddp_run(path, rank)
        finally:
            distributed.all_reduce_with_grad = real

    # all_reduce_with_grad on its own: rank-specific values in, rank-specific weights out.
    x = torch.full((2, 3), float(rank + 1), requires_grad=True)
    summed = distributed.all_reduce_with_grad(x)
    (summed * (torch.arange(6.0).view(2, 3) * (rank + 1))).sum().backward()
    results["reduce/value"], results["reduce/grad"] = summed.detach(), x.grad
    leave_process_group()
    return results


def worker(rank: int, port: int, out_dir: str) -> None:
    join_as_rank(rank, WORLD_SIZE, port)
    save_rank_result(out_dir, rank, checks_in_worker(rank))


def reference_ddp(out_dim: int = OUT_DIM) -> dict[str, Tensor]:
    return loss_and_grads(TwoViewLoss("correlation", out_dim), *global_views())


def reference_embeddings(rows: tuple[int, int]) -> dict[str, Tensor]:
    """One process on the whole batch, gradients cut to ``rows`` (what DDP's 1/W leaves)."""
    full = embedding_run("correlation", (0, GLOBAL_BATCH), *global_embeddings())
    return {
        **{k: full[k] for k in ("loss", "on_diag", "off_diag")},
        "z1": full["z1"][rows[0] : rows[1]],
        "z2": full["z2"][rows[0] : rows[1]],
    }


def averaged(result: dict[str, Tensor]) -> dict[str, Tensor]:
    """A rank's embedding gradients divided by W, as DDP's averaging divides them."""
    return {k: v / WORLD_SIZE if k in ("z1", "z2") else v for k, v in result.items()}


@pytest.mark.parametrize("path", DISTRIBUTED_PATHS)
def test_ddp_loss_and_gradients_equal_single_process(
    ranks: list[dict[str, Any]], path: str
) -> None:
    reference = reference_ddp()
    for result in ranks:
        # float32, 2 ranks against 1 process: measured 1.1e-6
        assert max_rel_err(result[f"ddp/{path}"], reference) < 1e-5


@pytest.mark.parametrize(("path", "width"), AUTO_WIDTHS.items())
def test_auto_takes_the_chosen_distributed_path(
    ranks: list[dict[str, Any]], path: str, width: int
) -> None:
    assert choose_path(GLOBAL_BATCH, width, WORLD_SIZE) == path
    reference = reference_ddp(width)
    for result in ranks:
        auto, explicit = result[f"ddp/auto/{width}"], result[f"ddp/explicit/{width}"]
        assert all(torch.equal(auto[k], explicit[k]) for k in explicit)
        assert max_rel_err(auto, reference) < 1e-5  # measured 8.3e-7


@pytest.mark.parametrize("path", [*DISTRIBUTED_PATHS, "auto"])
def test_embedding_gradients_with_uneven_magnitudes(ranks: list[dict[str, Any]], path: str) -> None:
    for r, result in enumerate(ranks):
        reference = reference_embeddings(even_rows(r))
        # float32 embedding gradients: measured 2.8e-6
        assert max_rel_err(averaged(result[f"embed/{path}"]), reference) < 1e-5


def test_reduce_c_accepts_shards_of_different_sizes(ranks: list[dict[str, Any]]) -> None:
    for r, result in enumerate(ranks):
        reference = reference_embeddings(UNEVEN_ROWS[r])
        assert result["uneven/reduce_c"]["z1"].shape[0] != GLOBAL_BATCH // WORLD_SIZE
        # float32, shards of 5 and 11 rows: measured 4.6e-6
        assert max_rel_err(averaged(result["uneven/reduce_c"]), reference) < 2e-5
        auto = result["uneven/auto"]  # falls back to reduce_c
        assert all(torch.equal(auto[k], result["uneven/reduce_c"][k]) for k in auto)
        empty, reference = averaged(result["empty/reduce_c"]), reference_embeddings(EMPTY_ROWS[r])
        assert empty["z1"].shape == reference["z1"].shape  # (0, D) on rank 0
        if r == 0:  # nothing to compare but the loss terms
            empty, reference = ({k: x[k] for k in ("loss", "on_diag")} for x in (empty, reference))
        assert max_rel_err(empty, reference) < 5e-6  # measured 2.4e-7


def test_every_rank_raises_together(ranks: list[dict[str, Any]]) -> None:
    for result in ranks:
        assert "path='sharded_gram' gathers equal shards" in result["uneven/sharded_gram"]
        assert "use path='reduce_c'" in result["uneven/sharded_gram"]
        assert result["tiny/reduce_c"].startswith("the global batch has 1 sample(s)")
        for path in (*DISTRIBUTED_PATHS, "auto"):
            # The NaN is on rank 1's rows only; rank 0 must raise too, or rank 1 would hang.
            assert result[f"nan/{path}"].startswith("z2 contains NaN or Inf")


def test_inside_finite_checks_by_caller_every_rank_gets_a_non_finite_loss(
    ranks: list[dict[str, Any]],
) -> None:
    for result in ranks:
        for path in (*DISTRIBUTED_PATHS, "auto"):
            assert not torch.isfinite(result[f"caller/{path}"]), path


@pytest.mark.parametrize("broken", ["local_grad", "no_reduce"])
@pytest.mark.parametrize("path", DISTRIBUTED_PATHS)
def test_the_comparison_catches_broken_reductions(
    ranks: list[dict[str, Any]], broken: str, path: str
) -> None:
    reference = reference_ddp()
    result = ranks[0][f"broken/{broken}/{path}"]
    assert max_rel_err(result, reference) > 1e-2
    if broken == "local_grad":  # the value is right, only the gradients are off
        assert rel_err(result["loss"], reference["loss"]) < 1e-6  # measured 7.4e-8


def test_all_reduce_with_grad_forward_and_backward(ranks: list[dict[str, Any]]) -> None:
    # d/dx_r Σ_s Σ summed·weights_s = Σ_s weights_s = (1 + 2)·arange, on every rank.
    for result in ranks:
        assert torch.equal(result["reduce/value"], torch.full((2, 3), 3.0))
        assert torch.equal(result["reduce/grad"], torch.arange(6.0).view(2, 3) * 3)
    x = torch.randn(2, 3, requires_grad=True)
    assert distributed.all_reduce_with_grad(x) is x  # identity in one process


# --- one process: the distributed forms reduce to the plain ones ---


@pytest.mark.parametrize(("n", "d"), [(40, 12), (12, 40)])
@pytest.mark.parametrize(("path", "plain"), [("reduce_c", "correlation"), ("sharded_gram", "gram")])
def test_single_process_forms_equal_the_plain_paths(n: int, d: int, path: str, plain: str) -> None:
    gen = torch.Generator().manual_seed(3)
    z1 = torch.randn(n, d, generator=gen) * 5 + 2
    z2 = 0.5 * z1 + torch.randn(n, d, generator=gen)
    expected = embedding_run(plain, (0, n), z1, z2)
    assert max_rel_err(embedding_run(path, (0, n), z1, z2), expected) < 1e-5  # measured 1.6e-6


def test_unknown_path_lists_every_path() -> None:
    with pytest.raises(ValueError, match=r"unknown path='svd'.*reduce_c, sharded_gram"):
        barlow_twins_loss(torch.randn(8, 4), torch.randn(8, 4), path="svd")  # type: ignore[arg-type]


# --- the cost model ---


def test_reduce_c_communication_grows_with_d_squared_not_n() -> None:
    base = barlow_loss_cost(256, 1024, 8, "reduce_c")["comm_bytes"]
    assert barlow_loss_cost(4096, 1024, 8, "reduce_c")["comm_bytes"] == base
    assert 3.9 < barlow_loss_cost(256, 2048, 8, "reduce_c")["comm_bytes"] / base < 4.1


@pytest.mark.parametrize("path", ["correlation", "gram", "sharded_gram"])
def test_gathering_communication_grows_with_n(path: str) -> None:
    small, large = (barlow_loss_cost(n, 1024, 8, path)["comm_bytes"] for n in (1024, 4096))
    assert 3.9 < large / small <= 4.0


def test_cost_volumes_follow_the_ring_formulas() -> None:
    n, d, w = 2048, 8192, 16
    cost = {p: barlow_loss_cost(n, d, w, p) for p in BARLOW_TWINS_COMPUTATIONS}
    ring = (w - 1) / w  # an all-gather moves ring·M words per rank, an all-reduce 2·ring·M
    # Gathered: all-gather z1, z2 forward, all-reduce both (N, D) gradients backward.
    gathered = 4 * ring * (2 * n * d + 2 * 2 * n * d)
    # reduce_c: all-reduce C, diag C, sums and centred squares (D² + 5·D), forward and backward,
    # and the shard check (4 float64).
    reduce_c = 4 * 2 * ring * 2 * (d * d + 5 * d) + 8 * 2 * ring * 4
    # sharded_gram: all-gather Ẑ1, Ẑ2; the D-vectors and the scalar both ways; the shard check.
    sharded = 4 * ring * 2 * n * d + 4 * 2 * ring * 2 * (5 * d + 1) + 8 * 2 * ring * 4
    expected = {"correlation": gathered, "gram": gathered, "reduce_c": reduce_c}
    for path, volume in {**expected, "sharded_gram": sharded}.items():
        assert cost[path]["comm_bytes"] == pytest.approx(volume, abs=1), path
    assert cost["sharded_gram"]["comm_bytes"] < cost["gram"]["comm_bytes"] / 2.9
    # The distributed forms do 1/W of the products; the gathered ones repeat all of them.
    assert cost["reduce_c"]["flops"] * w == cost["correlation"]["flops"]
    assert cost["sharded_gram"]["flops"] * w == cost["gram"]["flops"]
    for path in BARLOW_TWINS_COMPUTATIONS:
        single = barlow_loss_cost(n, d, 1, path)
        assert single["comm_bytes"] == single["collectives"] == 0
        assert single["flops"] >= cost[path]["flops"]
    assert cost["sharded_gram"]["memory_bytes"] < cost["gram"]["memory_bytes"]
    assert cost["reduce_c"]["memory_bytes"] < cost["correlation"]["memory_bytes"]


def test_choose_path_in_one_process_keeps_the_flop_rule() -> None:
    for n in (2, 8, 48, 96, 300, 1024):
        for d in (4, 64, 128, 400, 8192):
            assert choose_path(n, d) == ("gram" if 4 * n < 3 * d else "correlation")


def test_choose_path_across_ranks() -> None:
    for w in (2, 16, 32):
        for balance in (0, 500, 1e5):
            # N < 3·D/4 (the paper's scale): fewer flops and bytes; N ≥ 2·D: likewise.
            assert choose_path(2048, 8192, w, flops_per_byte=balance) == "sharded_gram"
            assert choose_path(16384, 8192, w, flops_per_byte=balance) == "reduce_c"
    for w in (2, 4, 8):  # from N ≥ 8 on, never the gathered forms, whatever the balance
        for n in range(8, 400, w):
            for d in (1, 3, 16, 256, 8192):
                for balance in (0, 500, 1e5):
                    assert choose_path(n, d, w, flops_per_byte=balance) in DISTRIBUTED_PATHS
    # Between 3·D/4 and 2·D the balance decides: flops alone favour reduce_c.
    assert choose_path(8192, 8192, 8, flops_per_byte=0) == "reduce_c"
    assert choose_path(8192, 8192, 8, flops_per_byte=1e4) == "sharded_gram"


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((0, 8, 1), "n >= 1 and d >= 1"),
        ((8, 8, 0), "world_size >= 1"),
        ((10, 8, 4), r"n=10 does not split evenly over world_size=4"),
    ],
)
def test_cost_model_rejects_bad_sizes(args: tuple[int, int, int], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        barlow_loss_cost(*args, "gram")
    with pytest.raises(ValueError, match=match):
        choose_path(*args)
    with pytest.raises(ValueError, match=r"unknown path='auto'"):
        barlow_loss_cost(8, 8, 1, "auto")
