"""Resuming: the output-directory checks, which settings make a different run, and loading
another run's weights into a fresh method (``train.resume_weights_only``)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from barlow import checkpoint, distributed
from barlow.config import Config
from barlow.logbook import console
from barlow.methods import METHODS, resolved_params
from barlow.rundir import RunDir
from barlow.training.state import CHECKPOINT_KEYS, TrainState

if TYPE_CHECKING:  # setup imports this module
    from barlow.training.setup import Run


@dataclass(frozen=True)
class ResumePoint:
    """The checkpoint a run starts from: its path, its contents, and whether only its weights
    are taken (its run differs in ``differences``; the schedule starts fresh)."""

    path: Path
    state: dict[str, Any]
    differences: list[str]

    @property
    def weights_only(self) -> bool:
        return bool(self.differences)


def find_resume_point(
    run_dir: RunDir, cfg: Config, *, resume: bool, overwrite: bool
) -> ResumePoint | None:
    """Check ``run_dir`` (on the main process; every rank gets its answer) and load the
    checkpoint to resume from, if any. Raises when the checkpoint belongs to a different run
    and ``train.resume_weights_only`` is off, listing the settings that differ."""
    found = None
    if distributed.is_main_process():
        found = check_output_dir(run_dir, resume=resume, overwrite=overwrite)
    path: Path | None = distributed.broadcast_object(found)  # type: ignore[assignment]
    if path is None:
        return None
    state = checkpoint.load_checkpoint(path, map_location="cpu")
    differences = resume_differences(state.get("config") or {}, cfg)
    if differences and not cfg.train.resume_weights_only:
        raise ValueError(
            f"{path} belongs to a different run; these settings differ:\n  "
            + "\n  ".join(differences)
            + "\nResume with the run's own settings; or pass --resume-weights-only "
            "(train.resume_weights_only=true) to start a fresh schedule from its weights; or "
            "choose another --out (or --overwrite) for a new run"
        )
    return ResumePoint(path, state, differences)


def check_output_dir(run_dir: RunDir, *, resume: bool, overwrite: bool) -> Path | None:
    """Refuse to mix two runs in one directory; return the checkpoint to resume from, if any.
    Nothing is removed here: ``--overwrite`` replaces the old run through ``rundir.Replacement``
    once the new one has written its first checkpoint."""
    out_dir = run_dir.path
    if resume:
        return resume_checkpoint(run_dir)
    if run_dir.holds_a_run() and not overwrite:
        raise FileExistsError(
            f"{out_dir} already holds a run; pass --resume to continue it, --overwrite to replace "
            "it, or choose another --out"
        )
    return None  # --overwrite: the old run stays until the new one's first checkpoint (Replacement)


def check_resume_target(run_dir: RunDir) -> None:
    """``--resume`` into a directory that does not exist is an error: a mistyped ``--out``
    must not start a new run."""
    if not run_dir.path.is_dir():
        raise FileNotFoundError(
            f"--resume given but {run_dir.path} does not exist; check --out, or drop --resume "
            "to start a new run there"
        )


def resume_checkpoint(run_dir: RunDir) -> Path | None:
    """``--resume``: the newest checkpoint in ``run_dir`` that loads and validates (a damaged
    latest one is skipped, with a warning), or None to start afresh in an existing directory
    that holds no checkpoint at all (a run that died before its first one: the same command
    serves the first launch and a requeued restart). A missing directory is an error (a
    mistyped ``--out`` must not start a new run), and so is one whose checkpoints are all
    damaged (nothing is overwritten)."""
    out_dir = run_dir.path
    check_resume_target(run_dir)
    found = checkpoint.latest_valid_checkpoint(out_dir, required_keys=CHECKPOINT_KEYS)
    if found is None and run_dir.checkpoints():
        raise FileNotFoundError(
            f"--resume given but {out_dir} holds no valid checkpoint (every one is damaged: "
            f"{', '.join(p.name for p in run_dir.checkpoints())}); move them aside to start a "
            "new run there, or choose another --out"
        )
    if found is None:
        console(f"--resume: {out_dir} holds no checkpoint yet; starting the run from the beginning")
    return found


# What shapes the model, the data order or the schedule: a run resumes only when these agree.
_RUN_IDENTITY = (("train", "batch_size"), ("data", "dataset"))


def _method_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """``method.*`` of a saved config as ``{"method.name": …, "method.<param>": …}``, with the
    method's defaults filled in, so a default written out and one left out compare equal."""
    method = config.get("method") or {}
    name = method.get("name")
    params = dict(method.get("params") or {})
    if name in METHODS:
        params = resolved_params(name, params)
    return {"method.name": name, **{f"method.{k}": v for k, v in params.items()}}


def resume_differences(saved_config: Mapping[str, Any], cfg: Config) -> list[str]:
    """The settings that make ``saved_config`` a different run from ``cfg``, one line each.

    Compared: the method and its hyper-parameters (defaults filled in), every ``model.*`` key,
    the global ``train.batch_size`` and ``data.dataset``. Empty when the run can resume.
    """
    current = cfg.to_dict()
    a, b = _method_settings(saved_config), _method_settings(current)
    if a["method.name"] != b["method.name"]:  # another method's parameters do not compare
        a, b = {"method.name": a["method.name"]}, {"method.name": b["method.name"]}
    models = (saved_config.get("model") or {}, current["model"])
    for key in sorted(set(models[0]) | set(models[1])):
        a[f"model.{key}"], b[f"model.{key}"] = models[0].get(key), models[1].get(key)
    for section, key in _RUN_IDENTITY:
        a[f"{section}.{key}"] = (saved_config.get(section) or {}).get(key)
        b[f"{section}.{key}"] = current[section][key]
    return [
        f"{key}: checkpoint {a.get(key)!r}, config {b.get(key)!r}"
        for key in sorted(set(a) | set(b), key=lambda k: (k.split(".")[0], k))
        if a.get(key) != b.get(key)
    ]


def _groups(state: Mapping[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """A state dict split by top-level submodule: ``{"backbone": {"conv1.weight": …}, …}``."""
    groups: dict[str, dict[str, Tensor]] = {}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        groups.setdefault(head, {})[rest] = value
    return groups


def _fits(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)


def _same_random_weights(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> bool:
    """Equal, and random (a floating tensor with more than one value): one was copied from the
    other, as a target or key network is at construction."""
    if not _fits(a, b) or not all(torch.equal(a[k], b[k]) for k in a):
        return False
    return any(
        t.is_floating_point() and t.numel() > 1 and bool(t.min() < t.max()) for t in a.values()
    )


def load_weights_only(method: nn.Module, saved: Mapping[str, Tensor]) -> dict[str, list[str]]:
    """Load the weights of another run's checkpoint into a fresh ``method``; say what went where.

    Each top-level submodule (backbone, projector, predictor, target/key networks, buffers) is
    loaded whole when its keys and shapes all match the checkpoint's. The backbone must match
    (ValueError listing the mismatches otherwise). A submodule that is a copy of another at
    construction (BYOL's target, MoCo's key network) and was not loaded becomes a copy of its
    loaded original again. Everything else keeps its fresh initialisation. Returns the names
    ``{"loaded": […], "copied": ["target_backbone ← backbone", …], "fresh": […]}``.
    """
    fresh = {k: v.detach().clone() for k, v in method.state_dict().items()}
    mine, theirs = _groups(fresh), _groups(saved)
    if "backbone" in mine:
        # strict, with one error listing missing / unexpected keys and shape mismatches
        checkpoint.load_backbone_weights(method.backbone, theirs.get("backbone", {}))  # type: ignore[arg-type]
    loaded = [name for name in mine if name in theirs and _fits(mine[name], theirs[name])]
    state = {name: dict(theirs[name]) if name in loaded else mine[name] for name in mine}
    copied = []
    for name in mine:
        if name in loaded:
            continue
        for original in loaded:
            if _same_random_weights(mine[name], mine[original]):
                state[name] = dict(theirs[original])
                copied.append(f"{name} ← {original}")
                break
    method.load_state_dict(
        {f"{g}.{k}" if k else g: v for g, group in state.items() for k, v in group.items()}
    )
    done = set(loaded) | {c.split(" ")[0] for c in copied}
    return {"loaded": loaded, "copied": copied, "fresh": [n for n in mine if n not in done]}


def keep_source(source: Path, out: Path, global_step: int) -> Path:
    """Hard-link (or copy) the checkpoint a weights-only resume starts from, so the new run's
    saves and snapshot retention in ``out`` cannot delete it."""
    kept = out / f"weights-source-step{global_step:08d}.pt"
    if not kept.exists():
        try:
            os.link(source, kept)
        except OSError:  # no hard links on this file system
            shutil.copyfile(source, kept)
    return kept


def announce_weights_only(point: ResumePoint, parts: dict[str, list[str]], kept: Path) -> None:
    """The banner of a weights-only resume: what was loaded, copied and left fresh."""
    rule = "!" * 100
    console(
        f"{rule}\nWEIGHTS-ONLY RESUME (train.resume_weights_only) from {point.path}: its "
        f"run differs in {', '.join(d.split(':')[0] for d in point.differences)}.\n"
        f"Loaded: {', '.join(parts['loaded']) or 'nothing'}"
        + (f"; copied: {', '.join(parts['copied'])}" if parts["copied"] else "")
        + (f"; freshly initialised: {', '.join(parts['fresh'])}" if parts["fresh"] else "")
        + ".\nOptimizer state, learning-rate schedule, step counters and random state "
        f"start fresh at step 0. This run's checkpoints replace the old run's in "
        f"{kept.parent}; the source is kept as {kept}\n{rule}"
    )


def take_weights(method: nn.Module, point: ResumePoint, run_dir: RunDir) -> None:
    """A weights-only resume: ``point``'s weights into the fresh ``method``, its file kept."""
    parts = load_weights_only(method, point.state["method"])
    if distributed.is_main_process():
        kept = keep_source(point.path, run_dir.path, int(point.state.get("global_step", 0)))
        announce_weights_only(point, parts, kept)


def restored_state(run: Run, point: ResumePoint | None) -> TrainState:
    """The training state to start from: the checkpoint's (announced), or a fresh one."""
    if point is None or point.weights_only:
        return TrainState()
    state = TrainState.from_checkpoint(
        point.state,
        module=run.module,
        optimizer=run.optimizer,
        scaler=run.scaler,
        steps_per_epoch=run.steps_per_epoch,
        source=str(point.path),
    )
    if distributed.is_main_process():
        where = f", batch {state.step_in_epoch}" if state.step_in_epoch else ""
        console(
            f"resumed from {point.path} at epoch {state.epoch + 1}{where}, step {state.global_step}"
        )
    return state
