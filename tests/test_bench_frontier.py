"""bench/frontier.py's budget sizing: each budget's epochs come from the loop's 1-epoch point."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).parents[1] / "bench"


@pytest.fixture
def frontier(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.syspath_prepend(str(BENCH))
    import frontier as module

    yield module
    sys.modules.pop("frontier", None)


def _fake_point(epochs: int) -> dict[str, Any]:
    # one epoch: 60 s of training + 30 s of start-up and evaluation
    return {"epochs": epochs, "knn": 0.8, "linear": 0.85, "wall_s": 30 + 60 * epochs}


def _run(frontier: Any, tmp_path: Path, budgets: list[float], monkeypatch: Any) -> list[Any]:
    ran: list[tuple[str, float, int]] = []

    def run_point(loop: str, budget: float, epochs: int, seed: int, args: Any) -> Any:
        ran.append((loop, budget, epochs))
        row = {"loop": loop, "budget": budget, "seed": seed, "holdout": args.holdout}
        row |= _fake_point(epochs) | {"epoch_s": 60.0}
        with open(args.out / "points.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        return row

    monkeypatch.setattr(frontier, "run_point", run_point)
    args = argparse.Namespace(
        recipes=["fashion-mnist"], seeds=[0], holdout=0, out=tmp_path, budgets=budgets
    )
    frontier.run_frontier(args)
    return ran


def test_budgets_are_sized_from_the_one_epoch_point(frontier: Any, tmp_path: Path, monkeypatch):
    ran = _run(frontier, tmp_path, [2, 5], monkeypatch)
    # 2 min: the 1-epoch calibration; 5 min: (300 - 30) // 60 = 4 epochs
    assert ran == [("fashion-mnist", 2, 1), ("fashion-mnist", 5, 4)]


def test_a_later_run_with_larger_budgets_only_reads_the_stored_calibration(
    frontier: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _run(frontier, tmp_path, [2], monkeypatch)
    ran = _run(frontier, tmp_path, [10], monkeypatch)
    assert ran == [("fashion-mnist", 10, 9)]  # (600 - 30) // 60, not a second 1-epoch run
