"""The report's tables: final results from ``metrics.json`` (one table per run, side by side) and
the config keys that differ between runs.

Every number cell carries ``data-key``, the JSON path of its value in ``metrics.json`` (a JSON
list of keys), so a reader (or a test) can find where it came from.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from barlow.report.runs import RunRecord

EVALUATION = "evaluation"  # metrics.json: {"evaluation": {encoder: {"knn_top1", "linear_top1"}}}
COLUMNS = (("knn_top1", "kNN top-1"), ("linear_top1", "linear top-1"))


def is_accuracy(key: str) -> bool:
    """Keys holding a fraction shown as a percentage."""
    return key.endswith(("top1", "top5", "_acc", "accuracy")) or key in ("acc", "agreement")


def format_value(key: str, value: Any) -> str:
    """Accuracies in [0, 1] as percentages with 2 decimals, other floats to 4 significant
    digits, integers whole."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if not math.isfinite(value):
        return str(value)
    if is_accuracy(key) and 0.0 <= value <= 1.0:
        return f"{100 * value:.2f} %"
    return f"{value:.4g}"


def _cell(path: Sequence[str], value: Any) -> str:
    numeric = isinstance(value, int | float) and not isinstance(value, bool)
    key = html.escape(json.dumps(list(path)), quote=True)
    attribute = f' data-key="{key}"' if numeric else ""
    return f"<td{attribute}>{html.escape(format_value(path[-1], value))}</td>"


def _leaves(value: Any, path: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], Any]]:
    if isinstance(value, dict):
        for key, inner in value.items():
            yield from _leaves(inner, (*path, str(key)))
    elif not isinstance(value, list):
        yield path, value


def _evaluation_table(metrics: dict[str, Any]) -> str:
    rows = metrics.get(EVALUATION)
    if not isinstance(rows, dict) or not rows:
        return ""
    head = "".join(f"<th>{label}</th>" for _, label in COLUMNS)
    body = ""
    for encoder, values in rows.items():
        if not isinstance(values, dict):
            continue
        cells = "".join(
            _cell((EVALUATION, encoder, key), values[key]) if key in values else "<td>–</td>"
            for key, _ in COLUMNS
        )
        body += f"<tr><td>{html.escape(encoder)}</td>{cells}</tr>"
    return (
        '<table class="results"><caption>test split</caption>'
        f"<tr><th>encoder</th>{head}</tr>{body}</table>"
    )


def _other_tables(metrics: dict[str, Any]) -> str:
    """Every other entry (``barlow knn`` / ``linear`` results, transfer, the last epoch) as
    key-value rows."""
    out = ""
    for name, entry in metrics.items():
        if name == EVALUATION:
            continue
        leaves = list(_leaves(entry, (name,)))
        if not leaves:
            continue
        rows = "".join(
            f"<tr><td>{html.escape('.'.join(path[1:]) or name)}</td>{_cell(path, value)}</tr>"
            for path, value in leaves
        )
        out += f'<table class="results"><caption>{html.escape(name)}</caption>{rows}</table>'
    return out


def results_tables(runs: Sequence[RunRecord]) -> str:
    """Per run, its ``metrics.json`` tables; runs side by side (wrapping on narrow screens)."""
    blocks = []
    for run in runs:
        if not run.metrics:
            content = (
                '<p class="note">no metrics.json (the run has not finished, or ran without '
                "its final evaluation: <code>barlow knn RUN/checkpoint.pt</code> adds one)</p>"
            )
        else:
            content = _evaluation_table(run.metrics) + _other_tables(run.metrics)
        blocks.append(
            f'<div class="table-wrap run-results" data-run="{html.escape(run.name, quote=True)}">'
            f"<h3>{html.escape(run.name)}</h3>{content}</div>"
        )
    return f'<div class="tables">{"".join(blocks)}</div>'


def _flatten(config: dict[str, Any]) -> dict[str, Any]:
    return {".".join(path): value for path, value in _leaves(config, ())}


def config_differences(runs: Sequence[RunRecord]) -> str:
    """The config keys whose values differ between the runs, one column per run."""
    flat = [_flatten(run.config) for run in runs]
    keys = sorted({k for f in flat for k in f})
    differing = [k for k in keys if len({json.dumps(f.get(k)) for f in flat}) > 1]
    if not differing:
        return "<p>The runs' configs are identical.</p>"
    head = "".join(f"<th>{html.escape(run.name)}</th>" for run in runs)
    rows = "".join(
        f"<tr><td>{html.escape(k)}</td>"
        + "".join(f"<td>{html.escape(json.dumps(f.get(k)))}</td>" for f in flat)
        + "</tr>"
        for k in differing
    )
    return (
        '<div class="table-wrap"><table><caption>what differs</caption>'
        f"<tr><th>key</th>{head}</tr>{rows}</table></div>"
    )
