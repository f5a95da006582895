"""Fixtures shared by the test files. Plain helpers live beside this file: ``processes.py``
(real runs and spawned ranks), ``runs.py`` (a run's records and weights), ``comparisons.py``
(relative errors, bit-identical state dicts)."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch

from processes import spawn_ranks

# Runs compared bit for bit need one thread count throughout: barlow's adaptive threads
# (cpu_share) leave a count the environment names alone, in this process and in the runs it
# starts. tests/test_cpu_share.py tests the adaptation itself.
os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))

# Their asserts explain a failure like a test's own (pytest rewrites test modules only).
pytest.register_assert_rewrite("comparisons", "runs")


@pytest.fixture(scope="module")
def ranks(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> list[Any]:
    """What each rank of the test module's ``worker(rank, port, out_dir)`` saved, in rank order:
    ``WORLD_SIZE`` (a module constant) Gloo processes spawned once per module; every check runs
    in that one process group and the tests assert on the results."""
    module = request.module
    return spawn_ranks(module.worker, module.WORLD_SIZE, tmp_path_factory.mktemp("ranks"))
