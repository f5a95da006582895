"""Reading what a run directory holds for the report: config, command line, the step and epoch
records of ``metrics.jsonl``, the final ``metrics.json``, the insight files; and expanding a
study directory into its runs."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from barlow.report.insight import Insight, read_insight
from barlow.rundir import CONFIG_NAME, METRICS_LOG_NAME, METRICS_NAME

STUDY_NAME = "study.json"


@dataclass
class RunRecord:
    """What the report shows of one run directory."""

    path: Path
    name: str
    config: dict[str, Any]
    argv: list[str]
    version: str
    steps: list[dict[str, Any]]
    epochs: list[dict[str, Any]]
    metrics: dict[str, Any]
    insight: Insight = field(default_factory=lambda: Insight([], []))


def is_run_directory(path: Path) -> bool:
    """A directory ``barlow pretrain`` wrote: it holds ``config.json``."""
    return path.is_dir() and (path / CONFIG_NAME).is_file()


def expand_inputs(paths: Sequence[str | Path]) -> list[Path]:
    """The run directories of ``paths``: a run directory is itself; a study directory (holding
    ``study.json``, or run directories one or two levels down) is its runs, in name order."""
    runs: list[Path] = []
    for given in paths:
        path = Path(given)
        if not path.exists():
            raise FileNotFoundError(f"RUN {path} does not exist; give a run directory")
        if is_run_directory(path):
            runs.append(path)
            continue
        found = _runs_below(path) if path.is_dir() else []
        if not found:
            study = (
                " (it has a study.json, but no run directories)"
                if (path / STUDY_NAME).is_file()
                else ""
            )
            raise ValueError(
                f"{path} is not a run directory (no {CONFIG_NAME}){study}; give a directory "
                "written by `barlow pretrain --out DIR`, or a study directory holding such runs"
            )
        runs.extend(found)
    return runs


def _runs_below(folder: Path) -> list[Path]:
    children = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    runs = [p for p in children if is_run_directory(p)]
    if runs:
        return runs
    return [g for p in children for g in _runs_below_one(p)]


def _runs_below_one(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if is_run_directory(p))


def display_names(paths: Sequence[Path]) -> list[str]:
    """Short unique names: the directory's name, with its parents where names repeat."""
    parts = [p.resolve().parts for p in paths]
    depth = 1
    while depth < max((len(p) for p in parts), default=1):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
        depth += 1
    return [str(p) for p in paths]


def load_run(path: Path, name: str) -> RunRecord:
    """Read ``path``'s files (``metrics.jsonl`` and ``metrics.json`` may be missing: a run in
    progress, or one without a final evaluation)."""
    try:
        saved = json.loads((path / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path / CONFIG_NAME} cannot be read as JSON: {error}") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("config"), dict):
        raise ValueError(
            f"{path / CONFIG_NAME} holds no resolved config; {path} is not a barlow run directory"
        )
    steps, epochs = read_records(path / METRICS_LOG_NAME)
    metrics: dict[str, Any] = {}
    if (path / METRICS_NAME).is_file():
        try:
            loaded = json.loads((path / METRICS_NAME).read_text(encoding="utf-8"))
            metrics = loaded if isinstance(loaded, dict) else {}
        except json.JSONDecodeError as error:
            raise ValueError(f"{path / METRICS_NAME} is not valid JSON: {error}") from None
    return RunRecord(
        path=path,
        name=name,
        config=saved["config"],
        argv=[str(a) for a in saved.get("argv", [])],
        version=str(saved.get("version", "")),
        steps=steps,
        epochs=epochs,
        metrics=metrics,
        insight=read_insight(path),
    )


def read_records(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The step ("train") and epoch records, one per step / epoch in order (a resumed run logs
    steps after its last checkpoint twice: the later record wins); cut-off lines are skipped."""
    steps: dict[int, dict[str, Any]] = {}
    epochs: dict[int, dict[str, Any]] = {}
    if not path.is_file():
        return [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            continue
        if record.get("kind") == "train":
            steps[record["step"]] = {**steps.get(record["step"], {}), **record}
        elif record.get("kind") == "epoch":
            epochs[int(record.get("epoch", len(epochs) + 1))] = record
    return [steps[k] for k in sorted(steps)], [epochs[k] for k in sorted(epochs)]
