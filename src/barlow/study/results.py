"""A study's results: one record per point, gathered into ``results.jsonl``, ``results.md`` (a
row per point, mean ± standard deviation over seeds, the paper's number beside it) and
``results.png`` (accuracy against the swept value, a line per other level).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from barlow.logbook import console
from barlow.rundir import RunDir, atomic_write, atomic_write_text
from barlow.study.catalogue import Study
from barlow.study.grid import Point

RESULTS_JSONL = "results.jsonl"
RESULTS_MD = "results.md"
RESULTS_PNG = "results.png"
RECORDS = "records"  # one <point>.json per point that ran: survives re-runs and array tasks
# The keys of health.embedding_health in each epoch record (a test checks they still match).
COLLAPSE_KEYS = ("std", "std_ratio", "effective_rank", "rank_fraction")
# Fields of a step record that are not loss terms.
_NOT_LOSS = {"kind", "step", "epoch", "lr", "images_per_s", "peak_memory_mib"}
METRICS = (("knn_top1", "kNN top-1"), ("linear_top1", "linear top-1"))


def config_value(config: Mapping[str, Any], key: str) -> Any:
    """The value of ``section.key`` in a resolved config dict (method keys live in its params)."""
    section, _, name = key.partition(".")
    table = config.get(section, {})
    if section == "method" and name != "name":
        table = table.get("params", {})
    return table.get(name)


def point_record(
    point: Point,
    study: Study,
    run_dir: Path,
    config: Mapping[str, Any],
    *,
    error: str | None,
    wall_s: float | None,
) -> dict[str, Any]:
    """A point's record: its levels and config differences, the final kNN / linear top-1, the
    loss terms of its last logged step, the collapse statistics of its last epoch, its wall
    time (of the attempts that ended, summed) and status (``ok`` or ``failed`` with the error;
    the runner marks a point stopped by Ctrl-C or a preemption ``interrupted``)."""
    keys = [k.partition("=")[0].strip() for lv in point.levels for k in lv.overrides]
    differences = {key: config_value(config, key) for key in keys}
    if point.recipe != study.recipe:
        differences = {"recipe": point.recipe, **differences}
    run = RunDir(run_dir)
    epoch = run.last_epoch_record()
    evaluation = _read_json(run.metrics).get("evaluation", {}).get("pretrained", {})
    return {
        "point": point.index,
        "name": point.name,
        "seed": point.seed,
        "labels": dict(point.labels),
        "differences": differences,
        "status": "failed" if error else "ok",
        "error": error,
        "knn_top1": evaluation.get("knn_top1"),
        "linear_top1": evaluation.get("linear_top1"),
        "wall_s": wall_s,
        "epochs": epoch.get("epoch"),
        "loss": {"epoch_mean": epoch.get("loss"), **_last_loss_terms(run)},
        "collapse": {k: epoch[k] for k in COLLAPSE_KEYS if k in epoch},
    }


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return {}


def _last_loss_terms(run: RunDir) -> dict[str, Any]:
    """The loss and the method's terms (on_diag, off_diag, …) of the last step record."""
    return {k: v for k, v in run.last_record("train").items() if k not in _NOT_LOSS}


def save_record(study_dir: Path, record: Mapping[str, Any]) -> None:
    atomic_write_text(study_dir / RECORDS / f"{record['name']}.json", json.dumps(record) + "\n")


def load_record(study_dir: Path, point: Point) -> dict[str, Any] | None:
    record = _read_json(study_dir / RECORDS / f"{point.name}.json")
    return record or None


def write_results(study: Study, study_dir: Path, *, plot: bool = True) -> None:
    """``results.jsonl`` and ``results.md`` from the records of the points that ran (and
    ``results.png`` with ``plot``); the caller holds the study lock."""
    points = study.points()
    records = [r for p in points if (r := load_record(study_dir, p)) is not None]
    atomic_write_text(study_dir / RESULTS_JSONL, "".join(json.dumps(r) + "\n" for r in records))
    atomic_write_text(study_dir / RESULTS_MD, markdown(study, points, records))
    if plot and records:
        draw(study, points, records, study_dir / RESULTS_PNG)


def _percent(values: Sequence[float]) -> str:
    if not values:
        return "—"
    mean = 100 * statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.1f} %"
    return f"{mean:.1f} ± {100 * statistics.stdev(values):.1f} %"


def _groups(
    points: Sequence[Point], records: Sequence[Mapping[str, Any]]
) -> list[tuple[Point, list[Mapping[str, Any]]]]:
    """Each group of points (one level per axis, every seed) with its records, in grid order."""
    by_name = {r["name"]: r for r in records}
    groups: dict[tuple[str, ...], tuple[Point, list[Mapping[str, Any]]]] = {}
    for point in points:
        _, found = groups.setdefault(point.group(), (point, []))
        if point.name in by_name:
            found.append(by_name[point.name])
    return list(groups.values())


def markdown(study: Study, points: Sequence[Point], records: Sequence[Mapping[str, Any]]) -> str:
    """The results table: a row per group of points, mean ± standard deviation over seeds."""
    scale = f" ({study.scale})" if study.scale else ""
    lines = [f"# Study {study.name}{scale}", ""]
    if study.title:
        lines += [study.title, ""]
    seeds = ", ".join(map(str, study.seeds))
    if study.baseline_seeds:
        seeds += f" (the first row also {', '.join(map(str, study.baseline_seeds))})"
    lines += [f"- recipe: `{study.recipe}`; seeds: {seeds}"]
    if study.overrides:
        lines += [f"- every point: `{' '.join('--set ' + o for o in study.overrides)}`"]
    if study.expect:
        lines += [f"- the paper's finding: {study.expect}"]
    if study.notes:
        lines += [f"- notes: {study.notes}"]
    paper = bool(study.paper)
    header = [axis.name for axis in study.axes] + [m[1] for m in METRICS] + ["seeds", "time"]
    header += ["paper top-1"] if paper else []
    align = "|" + "---|" * len(study.axes) + "---:|" * (len(header) - len(study.axes))
    lines += ["", "| " + " | ".join(header) + " |", align]
    for first, found in _groups(points, records):
        ok = [r for r in found if r["status"] == "ok"]
        cells = [first.labels[axis.name] for axis in study.axes]
        cells += [_percent([r[key] for r in ok if r.get(key) is not None]) for key, _ in METRICS]
        failed = sum(r["status"] == "failed" for r in found)
        planned = sum(p.labels == first.labels for p in points)
        cells.append(f"{len(ok)}/{planned}" + (f" ({failed} failed)" if failed else ""))
        times = [r["wall_s"] for r in ok if r.get("wall_s")]
        cells.append(f"{statistics.fmean(times) / 60:.1f} min" if times else "—")
        if paper:
            number = study.paper_number(first.labels)
            cells.append("—" if number is None else f"{number:.1f} %")
        lines.append("| " + " | ".join(cells) + " |")
    failures = [r for r in records if r["status"] == "failed"]
    if failures:
        lines += ["", "Failed points:", ""]
        lines += [f"- `{r['name']}`: {r['error']}" for r in failures]
    if study.source:
        lines += ["", f"Paper numbers: {study.source}."]
    return "\n".join(lines) + "\n"


def _x_axis(study: Study) -> int | None:
    """The axis drawn along x: the study's ``plot.x``, else the first with numeric levels."""
    names = [axis.name for axis in study.axes]
    if study.plot.get("x") in names:
        return names.index(study.plot["x"])
    numeric = [i for i, a in enumerate(study.axes) if all(lv.x is not None for lv in a.levels)]
    return numeric[0] if numeric else None


def _log_scale(study: Study, xs: Sequence[float]) -> bool:
    if "log_x" in study.plot:
        return bool(study.plot["log_x"])
    return bool(xs) and min(xs) > 0 and max(xs) / min(xs) >= 10


def draw(
    study: Study, points: Sequence[Point], records: Sequence[Mapping[str, Any]], path: Path
) -> None:
    """Linear (solid) and kNN (dashed) top-1 against the x axis, a line per combination of the
    other axes' levels; without a numeric axis, the levels of the first axis side by side."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # headless: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        console(f"no {path.name}: drawing it needs matplotlib (pip install matplotlib)")
        return
    x_axis = _x_axis(study)
    axis = x_axis if x_axis is not None else 0
    positions = {
        lv.label: (lv.x if x_axis is not None else i)
        for i, lv in enumerate(study.axes[axis].levels)
    }
    lines: dict[tuple[str, ...], dict[str, dict[float, list[float]]]] = {}
    for first, found in _groups(points, records):
        key = tuple(lb for i, lb in enumerate(first.group()) if i != axis)
        x = positions[first.group()[axis]]
        for metric, _ in METRICS:
            values = [r[metric] for r in found if r["status"] == "ok" and r.get(metric) is not None]
            if values and x is not None:
                lines.setdefault(key, {}).setdefault(metric, {})[x] = values
    figure, ax = plt.subplots(figsize=(7, 4.5))
    for index, (key, by_metric) in enumerate(lines.items()):  # grid order
        colour = f"C{index % 10}"
        styles = ("-o", "--x") if x_axis is not None else ("o", "x")  # categories: no lines
        for metric, style in zip(("linear_top1", "knn_top1"), styles, strict=True):
            series = sorted(by_metric.get(metric, {}).items())
            if not series:
                continue
            xs = [x for x, _ in series]
            means = [100 * statistics.fmean(v) for _, v in series]
            spread = [100 * statistics.stdev(v) if len(v) > 1 else 0.0 for _, v in series]
            label = f"{' · '.join(key) or study.name} ({'linear' if metric[0] == 'l' else 'kNN'})"
            ax.errorbar(xs, means, yerr=spread, fmt=style, color=colour, label=label, capsize=3)
    if x_axis is None:
        ax.set_xticks(list(range(len(positions))), list(positions), rotation=20, ha="right")
    else:
        ticks = {x: label for label, x in positions.items() if x is not None}
        if _log_scale(study, list(ticks)):
            ax.set_xscale("log")
            ax.minorticks_off()  # only the grid's own levels get a label
        ax.set_xticks(list(ticks), list(ticks.values()))
    ax.set_xlabel(study.axes[axis].name)
    ax.set_ylabel("top-1 accuracy (%)")
    recipe = "" if study.recipe == study.name else f": {study.recipe}"
    ax.set_title(f"{study.name}{f' ({study.scale})' if study.scale else ''}{recipe}")
    ax.grid(alpha=0.3)
    if lines:
        ax.legend(fontsize=7)
    figure.tight_layout()
    atomic_write(path, lambda file: figure.savefig(file, format="png", dpi=120))
    plt.close(figure)
