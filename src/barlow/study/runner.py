"""Run a study: each point is an ordinary run directory under the study directory, trained by
``barlow pretrain`` in a child process.

Why a child process per point rather than ``pretrain()`` in this one: a point that crashes the
interpreter (a segfault, the kernel's OOM killer) or leaks global torch state (threads, RNG,
flush-denormal, autocast caches) cannot touch the others; each point is the very command a user
would type, so a point's result equals a lone ``barlow pretrain`` bit for bit. The cost is an
import of torch and a load of the data per point: seconds against minutes of training.

Re-running is the way to resume: a point whose ``metrics.json`` exists and whose config equals
the point's is skipped; a point with a run directory continues with ``--resume`` (bitwise, from
its last checkpoint); a failed point is recorded, the others go on, and the command ends non-zero.
A study file whose grid only gains levels at the end of its axes continues the directory (the
points run before keep their names and results); any other change is refused.
``--point K`` (or ``SLURM_ARRAY_TASK_ID``) runs point K alone, so a cluster array task per point
can share one study directory: each point holds its own run lock, and the study's files are
written under the study lock (``.study.lock``).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from barlow.config import apply_overrides, from_dict, read_recipe, shipped_recipes
from barlow.logbook import console
from barlow.preemption import EXIT_CODE, INTERRUPT_EXIT_CODE, Preempted
from barlow.rundir import RunDir, atomic_write_text, make_run_directory
from barlow.study import results
from barlow.study.catalogue import Study
from barlow.study.grid import Point

MANIFEST = "study.json"
LOCK = ".study.lock"
ARRAY_VARIABLE = "SLURM_ARRAY_TASK_ID"


@dataclass
class Outcome:
    """What one invocation did: the points it trained, skipped and saw fail."""

    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # name -> error


def selected_point(point: int | None, count: int) -> int | None:
    """``--point K``, else ``SLURM_ARRAY_TASK_ID`` when set, else None (every point)."""
    where = "--point"
    if point is None and os.environ.get(ARRAY_VARIABLE, "").strip():
        where = f"{ARRAY_VARIABLE}"
        try:
            point = int(os.environ[ARRAY_VARIABLE])
        except ValueError:
            raise ValueError(
                f"{ARRAY_VARIABLE}={os.environ[ARRAY_VARIABLE]!r} is not an integer; pass --point"
            ) from None
    if point is not None and not 0 <= point < count:
        raise ValueError(
            f"{where} {point} is outside the study's points 0..{count - 1}; submit the array as "
            f"--array=0-{count - 1} (see --list)"
        )
    return point


def point_config(point: Point) -> dict[str, Any]:
    """The point's resolved config as JSON (what its ``config.json`` holds); ``ValueError`` or
    ``FileNotFoundError`` naming a bad recipe or value."""
    cfg = from_dict(apply_overrides(read_recipe(point.recipe), point.overrides))
    return dict(json.loads(json.dumps(cfg.to_dict())))


def check_points(points: Sequence[Point]) -> dict[str, dict[str, Any] | str]:
    """Each point's config, or its validation error; refuses a grid in which every point fails
    (a wrong key, not a wrong cell)."""
    configs: dict[str, dict[str, Any] | str] = {}
    for point in points:
        try:
            configs[point.name] = point_config(point)
        except (ValueError, FileNotFoundError) as exc:
            configs[point.name] = str(exc)
    errors = [c for c in configs.values() if isinstance(c, str)]
    if errors and len(errors) == len(points):
        raise ValueError(f"every point of the study is invalid: {errors[0]}")
    return configs


@contextlib.contextmanager
def study_lock(study_dir: Path) -> Iterator[None]:
    """Hold the study directory's lock (blocking: others wait a moment, they are not refused)."""
    try:
        import fcntl
    except ImportError:  # Windows: no cluster arrays, no lock
        yield
        return
    with open(study_dir / LOCK, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def claim_directory(study: Study, study_dir: Path) -> None:
    """Write ``study.json``, or check that the one there describes this study.

    A grid that only gains levels at the end of its axes is accepted (and ``study.json``
    updated): a point's directory is named by its settings, so the points run before keep
    their meaning. Any other change is refused, since finished points would mean another study.
    """
    make_run_directory(study_dir)
    manifest, path = study.manifest(), study_dir / MANIFEST
    with study_lock(study_dir):
        if not path.is_file():
            atomic_write_text(path, json.dumps(manifest, indent=2) + "\n")
            return
        saved = json.loads(path.read_text(encoding="utf-8"))
        differ = [key for key in manifest if saved.get(key) != manifest[key]]
        added = _added_levels(saved["grid"], manifest["grid"]) if differ == ["grid"] else 0
        if added:
            atomic_write_text(path, json.dumps(manifest, indent=2) + "\n")
    if added:
        console(
            f"{study_dir}: the grid gains {added} level(s) at the end of its axes; points run "
            f"before keep their results ({path} updated)"
        )
    elif differ:
        raise ValueError(
            f"{study_dir} holds another study (its {', '.join(differ)} differ from this one's; "
            f"see {path}); choose another --out, or run the same grid, recipe, seeds and --set "
            "to continue it (adding levels at the end of an axis is allowed)"
        )


def _added_levels(saved: list[dict[str, Any]], grid: list[dict[str, Any]]) -> int:
    """How many levels ``grid`` appends to ``saved``'s axes; 0 unless that is its only change
    (same axes in the same order, each old axis's levels a prefix of the new one's)."""
    same_axes = [old["name"] for old in saved] == [new["name"] for new in grid]
    if not same_axes:
        return 0
    pairs = list(zip(saved, grid, strict=True))
    if any(new["levels"][: len(old["levels"])] != old["levels"] for old, new in pairs):
        return 0
    return sum(len(new["levels"]) - len(old["levels"]) for old, new in pairs)


def run_study(
    study: Study, study_dir: Path, *, point: int | None = None, progress: bool = True
) -> Outcome:
    """Train every point of ``study`` (or point ``point``) into ``study_dir``, skipping finished
    points and resuming interrupted ones; write the results. Failed points are in the outcome."""
    points = study.points()
    chosen = selected_point(point, len(points))
    configs = check_points(points)
    claim_directory(study, study_dir)
    todo = points if chosen is None else [points[chosen]]
    outcome, durations = Outcome(), []
    left = [p for p in todo if not finished(study_dir / p.name, configs[p.name])]
    for current in todo:
        head = f"[study {study.name}] point {current.index + 1}/{len(points)}: {current.name}"
        config = configs[current.name]
        if not isinstance(config, str) and finished(study_dir / current.name, config):
            console(f"{head}: finished before, skipped")
            outcome.skipped.append(current.name)
            _keep_record(study, study_dir, current, config)
            continue
        console(f"{head} (recipe {current.recipe})")
        start = time.monotonic()
        error = _refusal(study_dir / current.name, config)
        if error is None:
            try:
                error = train_point(current, study_dir, progress)
            except Preempted:  # saved by the point's run: this study stops, to go on later
                _record(study, study_dir, current, config, None, time.monotonic() - start, True)
                with study_lock(study_dir):
                    results.write_results(study, study_dir, plot=False)
                raise
        durations.append(time.monotonic() - start)
        _record(study, study_dir, current, config, error, durations[-1])
        if error:
            outcome.failed[current.name] = error
        else:
            outcome.ran.append(current.name)
        left = [p for p in left if p.name != current.name]
        console(f"{head}: {_summary(study_dir, current, error, durations, len(left))}")
        with study_lock(study_dir):
            results.write_results(study, study_dir, plot=False)
    with study_lock(study_dir):
        results.write_results(study, study_dir)
    return outcome


def saved_config(run: RunDir) -> dict[str, Any]:
    """The config a run saved, read as this version reads it: a setting added since the run was
    made takes its default (the run did not know it, and its default keeps the old behaviour), so
    a finished point still counts as finished. ``ValueError`` / ``OSError`` when unreadable."""
    saved = json.loads(run.config.read_text(encoding="utf-8"))["config"]
    with contextlib.suppress(ValueError, TypeError, KeyError):
        return dict(json.loads(json.dumps(from_dict(saved).to_dict())))
    return dict(saved)  # a value this version refuses: compared as written


def finished(run_dir: Path, config: Mapping[str, Any] | str) -> bool:
    """Whether the point's run is complete: ``metrics.json`` there, and its config the point's."""
    run = RunDir(run_dir)
    if isinstance(config, str) or not run.metrics.is_file() or not run.config.is_file():
        return False
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        return saved_config(run) == config
    return False


def _refusal(run_dir: Path, config: Mapping[str, Any] | str) -> str | None:
    """Why a point cannot train: its config is invalid, or its directory holds a finished run
    of another config (an older version's defaults, a hand-made run)."""
    if isinstance(config, str):
        return config
    run = RunDir(run_dir)
    if not (run.metrics.is_file() and run.config.is_file()):
        return None
    try:
        saved = saved_config(run)
    except (OSError, ValueError, KeyError, TypeError):
        return f"{run.config} cannot be read; delete {run_dir} to train the point again"
    keys = [
        f"{section}.{key}"
        for section in sorted(set(saved) | set(config))
        for key in sorted(set(saved.get(section, {})) | set(config.get(section, {})))
        if saved.get(section, {}).get(key) != config.get(section, {}).get(key)
    ]
    return (
        f"{run_dir} holds a finished run of another config ({', '.join(keys[:5])} differ); "
        "delete it to train the point again, or choose another --out"
    )


def _keep_record(study: Study, study_dir: Path, point: Point, config: Mapping[str, Any]) -> None:
    """A skipped point keeps its record; one finished without (an older study) gets one."""
    if results.load_record(study_dir, point) is None:
        _record(study, study_dir, point, config, None, None)


def _record(
    study: Study,
    study_dir: Path,
    point: Point,
    config: Mapping[str, Any] | str,
    error: str | None,
    seconds: float | None,
    interrupted: bool = False,
) -> None:
    before = results.load_record(study_dir, point) or {}
    wall = (before.get("wall_s") or 0.0) + seconds if seconds is not None else None
    resolved = config if isinstance(config, Mapping) else {}
    record = results.point_record(
        point, study, study_dir / point.name, resolved, error=error, wall_s=wall
    )
    if interrupted:
        record["status"] = "interrupted"
    results.save_record(study_dir, record)


def _summary(
    study_dir: Path, point: Point, error: str | None, durations: Sequence[float], left: int
) -> str:
    """``done in 3.2 min: kNN 81.2 %, linear 85.3 %; about 12 min left`` (or the error)."""
    took = f"{durations[-1] / 60:.1f} min"
    if error:
        text = f"FAILED after {took}: {error}"
    else:
        record = results.load_record(study_dir, point) or {}
        scores = ", ".join(
            f"{label} {100 * record[key]:.1f} %"
            for key, label in results.METRICS
            if record.get(key) is not None
        )
        text = f"done in {took}" + (f": {scores}" if scores else "")
    if left:
        mean = sum(durations) / len(durations)
        text += f"; about {left * mean / 60:.0f} min left ({left} point(s) at {mean / 60:.1f} min)"
    return text


def pretrain_command(point: Point, run_dir: Path) -> list[str]:
    """The ``barlow pretrain`` command of a point (``--resume`` once its directory exists)."""
    recipe = point.recipe
    if recipe not in shipped_recipes():
        recipe = str(Path(recipe).resolve())
    command = [sys.executable, "-m", "barlow", "pretrain", recipe, "--out", str(run_dir)]
    for item in point.overrides:
        command += ["--set", item]
    return command + (["--resume"] if run_dir.exists() else [])


def train_point(point: Point, study_dir: Path, progress: bool) -> str | None:
    """Run the point's ``barlow pretrain`` and relay its lines; None, or the error it ended with."""
    command = pretrain_command(point, study_dir / point.name)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop(ARRAY_VARIABLE, None)
    tail: deque[str] = deque(maxlen=40)
    with subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        preexec_fn=_stop_with_parent if sys.platform == "linux" else None,
    ) as child:
        assert child.stdout is not None
        try:
            for line in child.stdout:
                tail.append(line.rstrip())
                if progress:
                    console("  " + line.rstrip())
        except KeyboardInterrupt:  # the child got Ctrl-C too: it saves a checkpoint and stops
            child.wait()
            raise
    if child.returncode == 0:
        return None
    if child.returncode in (EXIT_CODE, INTERRUPT_EXIT_CODE):  # Ctrl-C or a preemption signal
        raise Preempted(
            f"point {point.name} stopped ({_error_of(list(tail), child.returncode)}); run the "
            "same command again to go on from its checkpoint",
            child.returncode,
        )
    return _error_of(list(tail), child.returncode)


def _error_of(lines: Sequence[str], code: int) -> str:
    """The line a failed ``barlow pretrain`` ended with (``barlow pretrain: error: …``)."""
    for line in reversed(lines):
        if line.startswith("barlow pretrain:"):
            return line.removeprefix("barlow pretrain:").strip().removeprefix("error:").strip()
    last = next((line for line in reversed(lines) if line.strip()), "")
    if code < 0:
        return f"barlow pretrain was killed by signal {-code}" + (f"; last: {last}" if last else "")
    return f"barlow pretrain exited {code}" + (f": {last}" if last else "")


def _stop_with_parent() -> None:
    """In the child, before exec: SIGTERM when the study process dies, so a killed study leaves
    no orphan training (SIGTERM is a preemption: the child saves a checkpoint and stops)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
