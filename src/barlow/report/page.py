"""``barlow report RUN [RUN ...] --out FILE.html``: the page, assembled from the run directories.

One self-contained HTML file: every figure an inline ``data:`` PNG, the style sheet inline, no
script and no external reference, so it opens offline from disk. Sections: training curves
(every loss term the method logs, the learning rate, online accuracies, monitors), the
cross-correlation matrix and spectra (``insight/`` files), training views, a 2-D map and nearest
neighbours of the test representations, the final results, the configuration and command line.
Several runs share one page: curves overlaid, tables side by side.
"""

from __future__ import annotations

import html
import json
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from barlow import __version__
from barlow.logbook import console
from barlow.report import figures
from barlow.report.figures import RUN_COLOURS, Series
from barlow.report.runs import RunRecord, display_names, expand_inputs, load_run
from barlow.report.tables import config_differences, results_tables
from barlow.report.views import check_output_file
from barlow.rundir import atomic_write_text

# Keys of step records that are not quantities of the method: bookkeeping, and the learning
# rate (its own panel, last).
STEP_BOOKKEEPING = {"kind", "step", "epoch", "lr", "images_per_s", "skipped_nonfinite"}
ACCURACY_KEYS = ("knn_top1", "online_linear_top1", "online_linear_train_top1")
RANKME_KEYS = ("rankme_embedding", "rankme_representation")
EPOCH_BOOKKEEPING = {
    "kind",
    "step",
    "epoch",
    "images_per_s",
    "peak_memory_mib",
    "threads",
    "crop_size",
    "corrupt_skipped",
    "corrupt_skipped_total",
}
TITLES = {
    "loss": "loss (total)",
    "lr": "learning rate",
    "knn_top1": "online kNN top-1 (test)",
    "online_linear_top1": "online linear top-1 (test)",
    "online_linear_train_top1": "online linear top-1 (train)",
    "rankme_embedding": "RankMe of z (embedding)",
    "rankme_representation": "RankMe of h (representation)",
}
INSIGHT_HOWTO = (
    "Pretraining writes them into <code>RUN/insight/epoch-EEEE.safetensors</code> (the "
    "cross-correlation matrix C, its diagonal and off-diagonal values, the covariance spectra, "
    "RankMe) when <code>eval.insight</code> is true, at epoch 0, every "
    "<code>eval.online_knn_every</code> epochs and at the last. Run the pretraining again with "
    "<code>--set eval.insight=true</code> to get them."
)


@dataclass(frozen=True)
class ReportResult:
    """What ``build_report`` wrote."""

    path: Path
    runs: int
    size_bytes: int
    seconds: float


def build_report(
    inputs: Sequence[str | Path],
    out: str | Path,
    *,
    embedding_map: bool = True,
    view_images: int = 6,
    progress: bool = True,
) -> ReportResult:
    """Read the runs (study directories expand to their runs), draw every section, write ``out``
    atomically. Bad inputs and a bad ``out`` fail before any slow work."""
    start = time.perf_counter()
    path = check_output_file(out, suffix=".html")
    if not inputs:
        raise ValueError("give at least one run directory")
    run_paths = expand_inputs(inputs)
    runs = [load_run(p, n) for p, n in zip(run_paths, display_names(run_paths), strict=True)]
    say = console if progress else (lambda line: None)
    sections = [
        ("curves", "Training curves", _curves_section(runs)),
        ("insight", "Cross-correlation and spectra", _insight_section(runs)),
        ("views", "Training views", _views_section(runs, view_images, say)),
        ("map", "Representations", _map_section(runs, embedding_map, progress, say)),
        ("results", "Final results", results_tables(runs)),
        ("config", "Configuration", _config_section(runs)),
    ]
    text = _page(runs, sections)
    atomic_write_text(path, text)
    size = len(text.encode("utf-8"))
    return ReportResult(path, len(runs), size, time.perf_counter() - start)


def _page(runs: Sequence[RunRecord], sections: Sequence[tuple[str, str, str]]) -> str:
    title = "barlow report: " + ", ".join(r.name for r in runs)
    nav = " ".join(f'<a href="#{anchor}">{html.escape(name)}</a>' for anchor, name, _ in sections)
    rows = "".join(
        f"<tr><td>{_swatch(i)}{html.escape(r.name)}</td><td><code>{html.escape(str(r.path))}"
        f"</code></td><td>{html.escape(_describe(r))}</td></tr>"
        for i, r in enumerate(runs)
    )
    body = "".join(
        f'<section id="{anchor}"><h2>{html.escape(name)}</h2>{content}</section>'
        for anchor, name, content in sections
    )
    made = time.strftime("%Y-%m-%d %H:%M")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><nav>{nav}</nav>"
        f'<div class="table-wrap"><table class="runs"><tr><th>run</th><th>directory</th>'
        f"<th>what</th></tr>{rows}</table></div>{body}"
        f"<footer>made by barlow {html.escape(__version__)} on {made}</footer>"
        "</body></html>\n"
    )


def _describe(run: RunRecord) -> str:
    cfg = run.config
    method = cfg.get("method", {}).get("name", "?")
    backbone = cfg.get("model", {}).get("backbone", "?")
    dataset = cfg.get("data", {}).get("dataset", "?")
    done = run.epochs[-1].get("epoch", 0) if run.epochs else 0
    epochs = cfg.get("train", {}).get("epochs", "?")
    return f"{method}, {backbone} on {dataset}, {done}/{epochs} epochs"


def _swatch(index: int) -> str:
    colour = _CSS_COLOURS[index % len(_CSS_COLOURS)]
    return f'<span class="swatch" style="background:{colour}"></span>'


# matplotlib's tab10, the colours of C0…C9 in the figures
_CSS_COLOURS = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
    "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
]  # fmt: skip


def _img(uri: str, alt: str) -> str:
    return f'<figure><img src="{uri}" alt="{html.escape(alt)}"></figure>'


def _panels(panels: Sequence[tuple[str, Sequence[Series]]], xlabel: str) -> str:
    """Small figures that flow into as many columns as the screen holds."""
    return (
        '<div class="panels">'
        + "".join(
            _img(figures.curve_panel(title, series, xlabel), title) for title, series in panels
        )
        + "</div>"
    )


def _note(text: str) -> str:
    return f'<p class="note">{text}</p>'


def _series(runs: Sequence[RunRecord], records: str, key: str) -> list[Series]:
    found = []
    for i, run in enumerate(runs):
        rows = run.steps if records == "steps" else run.epochs
        x_key = "step" if records == "steps" else "epoch"
        points = [
            (float(r[x_key]), float(r[key]))
            for r in rows
            if isinstance(r.get(key), int | float) and not isinstance(r.get(key), bool)
        ]
        if points:
            xs, ys = zip(*points, strict=True)
            found.append(Series(run.name, RUN_COLOURS[i % len(RUN_COLOURS)], xs, ys))
    return found


def _keys(runs: Sequence[RunRecord], records: str, skip: set[str] | tuple[str, ...]) -> list[str]:
    """Numeric keys of the records in order of first appearance, ``skip`` left out."""
    keys: dict[str, None] = {}
    for run in runs:
        for record in run.steps if records == "steps" else run.epochs:
            for key, value in record.items():
                numeric = isinstance(value, int | float) and not isinstance(value, bool)
                if numeric and key not in skip:
                    keys.setdefault(key)
    return list(keys)


def _panel_block(heading: str, panels: Sequence[tuple[str, Sequence[Series]]], x: str) -> str:
    """A heading over the panels that have data; empty when none has."""
    kept = [(title, series) for title, series in panels if series]
    return f"<h3>{heading}</h3>" + _panels(kept, x) if kept else ""


def _curves_section(runs: Sequence[RunRecord]) -> str:
    step_keys = _keys(runs, "steps", STEP_BOOKKEEPING)
    step_keys = [*sorted(step_keys, key=lambda k: k != "loss"), "lr"]
    steps = [(TITLES.get(k, k), _series(runs, "steps", k)) for k in step_keys]
    accuracy = [(TITLES[k], _series(runs, "epochs", k)) for k in ACCURACY_KEYS]
    skip = EPOCH_BOOKKEEPING | set(ACCURACY_KEYS) | set(RANKME_KEYS)
    monitor_keys = [k for k in _keys(runs, "epochs", skip) if not k.endswith("_time_s")]
    monitors = [(k, _series(runs, "epochs", k)) for k in monitor_keys]
    return "".join(
        [
            _panel_block("Per step", steps, "step")
            or _note("No step records in metrics.jsonl yet."),
            _panel_block("Online evaluation per epoch", accuracy, "epoch")
            or _note("No online kNN or linear accuracy in the epoch records."),
            _panel_block("Monitors per epoch", monitors, "epoch"),
        ]
    )


def _insight_section(runs: Sequence[RunRecord]) -> str:
    rankme = [(TITLES[k], _series(runs, "epochs", k)) for k in RANKME_KEYS]
    parts = [_panel_block("RankMe per epoch", rankme, "epoch")]
    for run in runs:
        parts.append(f"<h3>{html.escape(run.name)}</h3>")
        insight = run.insight
        for problem in insight.unreadable:
            parts.append(_note(f"skipped an unreadable insight file: {html.escape(problem)}"))
        if not insight.epochs:
            parts.append(
                _note(
                    f"<b>Missing:</b> {html.escape(run.name)} has no insight files. "
                    + INSIGHT_HOWTO
                )
            )
            continue
        picks = insight.start_middle_end()
        epochs = ", ".join(str(p.epoch) for p in picks)
        parts.append(f"<p>C at epochs {epochs} (0: before training).</p>")
        parts.append(_img(figures.correlation_matrices(picks), f"C of {run.name}"))
        parts.append(_img(figures.correlation_histograms(picks), f"C values of {run.name}"))
        parts.append(_img(figures.spectra(insight.epochs), f"spectra of {run.name}"))
    return "".join(parts)


def _run_config(run: RunRecord) -> Any:
    from barlow.config import from_dict

    return from_dict(run.config)


def _views_section(runs: Sequence[RunRecord], images: int, say: Callable[[str], None]) -> str:
    from barlow.report.tiles import png_bytes
    from barlow.report.views import views_grid

    parts = []
    for run in runs:
        say(f"report: training views of {run.name}")
        try:
            cfg = _run_config(run)
            grid = views_grid(cfg, images=images, seed=cfg.train.seed)
        except (FileNotFoundError, ValueError) as error:
            parts.append(_note(f"{html.escape(run.name)}: no views ({html.escape(str(error))})"))
            continue
        parts.append(
            f"<h3>{html.escape(run.name)}</h3><p>Recipe <code>{html.escape(grid.recipe)}</code> "
            f"on {html.escape(grid.dataset)}: each row an image and the {grid.views} views "
            "training draws of it (the same grid as <code>barlow views</code>).</p>"
        )
        parts.append(_img(figures.data_uri(png_bytes(grid.image)), f"views of {run.name}"))
    return "".join(parts)


def _map_section(
    runs: Sequence[RunRecord], wanted: bool, progress: bool, say: Callable[[str], None]
) -> str:
    from barlow.report.embedding_map import OTHER_CLASS, SAME_CLASS, embedding_map
    from barlow.report.tiles import png_bytes

    if not wanted:
        return _note("Skipped (<code>--no-embedding-map</code>).")
    parts = []
    for run in runs:
        say(f"report: representations of {run.name}")
        try:
            cfg = _run_config(run)
            found = embedding_map(run.path, cfg, seed=cfg.train.seed, progress=progress)
        except (FileNotFoundError, ValueError) as error:
            parts.append(_note(f"{html.escape(run.name)}: no map ({html.escape(str(error))})"))
            continue
        parts.append(
            f"<h3>{html.escape(run.name)}</h3><p>{found.method} of the backbone features of "
            f"{found.test_images} test images (weights: <code>{found.weights}</code>; "
            f"computed in {found.seconds:.0f} s).</p>"
        )
        parts.append(
            _img(
                figures.scatter_map(found.points, found.labels, found.classes, found.method),
                f"{found.method} of {run.name}",
            )
        )
        parts.append(
            f"<p>Nearest neighbours: each row a test image and its most cosine-similar images "
            f"among {found.bank_images} training images, framed "
            f'<span style="color:{SAME_CLASS}">green</span> where the class agrees and '
            f'<span style="color:{OTHER_CLASS}">red</span> where it differs.</p>'
        )
        parts.append(_img(figures.data_uri(png_bytes(found.neighbours)), "nearest neighbours"))
    return "".join(parts)


def _config_section(runs: Sequence[RunRecord]) -> str:
    parts = [config_differences(runs)] if len(runs) > 1 else []
    for run in runs:
        command = shlex.join(run.argv) if run.argv else "(not recorded)"
        parts.append(
            f"<h3>{html.escape(run.name)}</h3><p>Command line:</p>"
            f'<pre class="argv"><code>{html.escape(command)}</code></pre>'
            f"<details><summary>Resolved config (config.json)</summary>"
            f"<pre>{html.escape(json.dumps(run.config, indent=2))}</pre></details>"
        )
    return "".join(parts)


STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:0 auto;padding:0 12px 40px;
max-width:1200px;line-height:1.45;color:#1d1d1d;overflow-wrap:anywhere}
h1{font-size:1.5em}h2{border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:2em}
nav a{margin-right:12px}
figure{margin:8px 0}img{max-width:100%;height:auto;display:block}
pre{overflow-x:auto;background:#f6f8fa;padding:8px;font-size:12px;max-width:100%}
pre.argv{white-space:pre-wrap;word-break:break-all}
.note{background:#fff8e1;border-left:4px solid #f0b400;padding:8px 10px}
.panels{display:grid;grid-template-columns:repeat(auto-fill,minmax(min(100%,340px),1fr));gap:8px}
.panels figure{margin:0}
.tables{display:flex;flex-wrap:wrap;gap:20px;align-items:flex-start}
.table-wrap{overflow-x:auto;max-width:100%}
table{border-collapse:collapse;font-size:14px;margin:6px 0}
th,td{border-bottom:1px solid #ddd;padding:4px 8px;text-align:right;vertical-align:top}
th:first-child,td:first-child{text-align:left}
caption{font-weight:600;text-align:left;padding:4px 0}
.swatch{display:inline-block;width:10px;height:10px;margin-right:6px;border-radius:2px}
footer{margin-top:3em;color:#777;font-size:12px}
"""
