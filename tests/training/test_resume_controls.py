"""Controls for exact resume (R5) and checkpoints across process counts (R10).

R5's positive cases live in test_resume.py. Here: what the random-state restore is for. barlow's
own steps draw nothing from the global generators (views are a function of seed, epoch and
index), so skipping the restore changes nothing there; a step that does draw (dropout, stochastic
depth, noise, as a user's backbone may) must resume exactly with the restore and must differ
without it, or the comparison could not catch a lost RNG state.
"""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch

from barlow import checkpoint
from barlow.config import Config, load_config
from barlow.methods import BarlowTwins
from barlow.training import CHECKPOINT_NAME, pretrain, setup
from barlow.training.state import validate_training_checkpoint
from comparisons import differing
from processes import pretrain_on_two_processes
from runs import FAST, records, sets, weights

LOGGED = [*FAST, "train.log_every=1"]  # a record per step


def fast(*extra: str) -> Config:
    return load_config("digits", [*LOGGED, *extra])


def step_losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(run, "train")}


def draw_noise_in_every_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each step adds Gaussian noise from the global torch generator to its views."""
    original = BarlowTwins.forward

    def noisy(self: BarlowTwins, views: list[torch.Tensor]) -> Any:
        return original(self, [v + 0.1 * torch.randn_like(v) for v in views])

    monkeypatch.setattr(BarlowTwins, "forward", noisy)


@pytest.mark.parametrize(
    ("draws", "restore"),
    [(True, True), (True, False), (False, False)],
    ids=["rng-step-restored", "rng-step-not-restored", "plain-step-not-restored"],
)
def test_rng_restore_on_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, draws: bool, restore: bool
) -> None:
    """Straight to step 6 vs stopped at step 3 and resumed: equal when no random state is lost."""
    if draws:
        draw_noise_in_every_step(monkeypatch)
    pretrain(fast("train.max_steps=6"), tmp_path / "straight", progress=False)
    pretrain(fast("train.max_steps=3"), tmp_path / "split", progress=False)
    if not restore:  # the negative control: a resume that forgets the random state
        monkeypatch.setattr(checkpoint, "set_rng_state", lambda state: None)
    pretrain(fast("train.max_steps=6"), tmp_path / "split", resume=True, progress=False)
    straight, split = step_losses(tmp_path / "straight"), step_losses(tmp_path / "split")
    assert sorted(straight) == sorted(split) == [1, 2, 3, 4, 5, 6]
    changed = differing(weights(tmp_path / "split"), weights(tmp_path / "straight"))
    if draws and not restore:
        assert changed, "a resume that lost the RNG state went undetected"
        assert [straight[s] for s in (4, 5, 6)] != [split[s] for s in (4, 5, 6)]
    else:
        assert split == straight, "per-step losses differ after the resume"
        assert not changed, f"{len(changed)} tensors differ after the resume, e.g. {changed[:3]}"


# R10: a checkpoint does not depend on the number of processes that wrote it.


def _torchrun(out: Path, *extra: str, resume: bool = False) -> subprocess.CompletedProcess[str]:
    args = sets(*LOGGED, *extra) + (["--resume"] if resume else [])
    return pretrain_on_two_processes(out, args)  # ~15 s on an idle machine


def test_a_two_process_checkpoint_resumes_in_one_process_and_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    two = _torchrun(run, "train.max_steps=2")
    assert two.returncode == 0, two.stderr[-2000:]
    saved = validate_training_checkpoint(run / CHECKPOINT_NAME)
    assert saved["global_step"] == 2 and len(saved["rng"]) == 2  # one RNG state per rank

    # What the 1-process resume holds right after loading: spy on the method and the optimizer.
    loaded: dict[str, Any] = {}
    build_method, build_optimizer = setup.build_method, setup.build_optimizer

    def spy_method(*args: Any, **kwargs: Any) -> Any:
        method = build_method(*args, **kwargs)
        load = method.load_state_dict

        def recording_load(state: Any, *a: Any, **k: Any) -> Any:
            result = load(state, *a, **k)
            loaded["method"] = {n: t.clone() for n, t in method.state_dict().items()}
            return result

        method.load_state_dict = recording_load  # type: ignore[method-assign]
        return method

    def spy_optimizer(*args: Any, **kwargs: Any) -> Any:
        optimizer = build_optimizer(*args, **kwargs)
        load = optimizer.load_state_dict

        def recording_load(state: Any) -> None:
            load(state)
            loaded["optimizer"] = copy.deepcopy(optimizer.state_dict())  # steps mutate it

        optimizer.load_state_dict = recording_load  # type: ignore[method-assign]
        return optimizer

    monkeypatch.setattr(setup, "build_method", spy_method)
    monkeypatch.setattr(setup, "build_optimizer", spy_optimizer)
    pretrain(fast("train.max_steps=3"), run, resume=True, progress=False)
    assert not differing(loaded["method"], saved["method"])
    saved_moments = saved["optimizer"]["state"]
    loaded_moments = loaded["optimizer"]["state"]
    assert saved_moments.keys() == loaded_moments.keys() and saved_moments
    for key, slots in saved_moments.items():
        assert all(torch.equal(v, loaded_moments[key][n]) for n, v in slots.items()), key
    one = validate_training_checkpoint(run / CHECKPOINT_NAME)
    assert one["global_step"] == 3 and len(one["rng"]) == 1
    assert differing(one["method"], saved["method"])  # it trained a step

    back = _torchrun(run, "train.max_steps=4", resume=True)
    assert back.returncode == 0, back.stderr[-2000:]
    assert "step 3" in back.stderr  # resumed from the 1-process checkpoint
    final = validate_training_checkpoint(run / CHECKPOINT_NAME)
    assert final["global_step"] == 4 and len(final["rng"]) == 2
    assert differing(final["method"], one["method"])
