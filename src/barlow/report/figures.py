"""The report's figures: matplotlib (``Figure`` objects, Agg, no pyplot state) rendered to PNG and
inlined as ``data:`` URIs."""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from barlow.report.insight import InsightEpoch

PANEL_W, PANEL_H = 3.6, 2.6  # inches per small panel
COLUMNS = 3
DPI = 100
RUN_COLOURS = [f"C{i}" for i in range(10)]


@dataclass(frozen=True)
class Series:
    """One run's curve in a panel."""

    label: str
    colour: str
    x: Sequence[float]
    y: Sequence[float]


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def figure_uri(fig: Figure) -> str:
    """The figure as a PNG ``data:`` URI."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    return data_uri(buffer.getvalue())


def _grid(panels: int, columns: int = COLUMNS) -> tuple[Figure, list[Axes]]:
    columns = max(1, min(columns, panels))
    rows = math.ceil(panels / columns)
    fig = Figure(figsize=(PANEL_W * columns, PANEL_H * rows), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False).ravel().tolist()
    for ax in axes[panels:]:
        ax.set_visible(False)
    return fig, axes[:panels]


def curve_panel(title: str, series: Sequence[Series], xlabel: str) -> str:
    """One small panel (its own PNG, so panels wrap on narrow screens); runs overlaid, legend =
    run name. A positive quantity spanning more than two decades gets a log axis."""
    fig = Figure(figsize=(PANEL_W, PANEL_H), layout="constrained")
    ax = fig.subplots()
    values = [v for s in series for v in s.y if math.isfinite(v)]
    for s in series:
        marker = "." if len(s.x) < 30 else None
        ax.plot(s.x, s.y, color=s.colour, label=s.label, lw=1.3, marker=marker)
    if values and min(values) > 0 and max(values) / min(values) > 100:
        ax.set_yscale("log")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=7)
    return figure_uri(fig)


def correlation_matrices(picks: Sequence[InsightEpoch]) -> str:
    """C at start, middle and end: its top-left block (row 1) and pooled whole (row 2)."""
    names = ["cross_correlation_block"]
    if any(_shape(p, names[0]) != _shape(p, "cross_correlation_pooled") for p in picks):
        names.append("cross_correlation_pooled")  # D > 64: the whole C, pooled, as well
    fig = Figure(figsize=(PANEL_W * len(picks), len(names) * PANEL_H + 0.6), layout="constrained")
    axes = fig.subplots(len(names), len(picks), squeeze=False)
    image = None
    for j, item in enumerate(picks):
        for i, name in enumerate(names):
            ax, matrix = axes[i, j], item.get(name)
            ax.set_xticks([])
            ax.set_yticks([])
            if matrix is None:
                ax.set_title(f"epoch {item.epoch}: no {name}", fontsize=9)
                continue
            image = ax.imshow(matrix, cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
            what = "pooled" if name.endswith("pooled") else "block"
            ax.set_title(
                f"epoch {item.epoch}, {what} {matrix.shape[0]}×{matrix.shape[1]}", fontsize=9
            )
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.6, label="C_ij")
    return figure_uri(fig)


def _shape(item: InsightEpoch, name: str) -> tuple[int, ...] | None:
    found = item.get(name)
    return None if found is None else tuple(found.shape)


def correlation_histograms(picks: Sequence[InsightEpoch]) -> str:
    """Distributions of C's diagonal (should go to 1) and off-diagonal values (to 0)."""
    fig, (diag_ax, off_ax) = _grid(2, 2)
    colours = _epoch_colours(len(picks))
    for item, colour in zip(picks, colours, strict=True):
        diagonal = item.get("diagonal")
        if diagonal is not None and diagonal.size:
            diag, diag_edges = np.histogram(np.clip(diagonal, -1, 1), bins=50, range=(-1.0, 1.0))
            diag_ax.stairs(diag / diag.sum(), diag_edges, color=colour, label=f"epoch {item.epoch}")
        counts, edges = item.get("off_diagonal_histogram"), item.get("histogram_edges")
        if counts is not None and edges is not None and counts.sum() > 0:
            off_ax.stairs(counts / counts.sum(), edges, color=colour, label=f"epoch {item.epoch}")
    diag_ax.set_title("diagonal C_ii", fontsize=10)
    off_ax.set_title("off-diagonal C_ij (i ≠ j)", fontsize=10)
    off_ax.set_yscale("log")
    for ax in (diag_ax, off_ax):
        ax.set_xlabel("value", fontsize=8)
        ax.set_ylabel("fraction", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    return figure_uri(fig)


def spectra(epochs: Sequence[InsightEpoch]) -> str:
    """Eigenvalues (descending, log-log) of the embedding and representation covariances, one
    line per epoch from light (start) to dark (end)."""
    fig, axes = _grid(2, 2)
    colours = _epoch_colours(len(epochs))
    for ax, name, title in zip(
        axes,
        ("embedding_eigenvalues", "representation_eigenvalues"),
        ("embedding z (projector output)", "representation h (backbone output)"),
        strict=True,
    ):
        for item, colour in zip(epochs, colours, strict=True):
            values = item.get(name)
            if values is None or not values.size:
                continue
            values = np.clip(values, 1e-12, None)
            ax.plot(
                np.arange(1, len(values) + 1),
                values,
                color=colour,
                lw=1.0,
                label=f"epoch {item.epoch}",
            )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("index", fontsize=8)
        ax.set_ylabel("eigenvalue", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if 0 < len(epochs) <= 8:
            ax.legend(fontsize=7)
    return figure_uri(fig)


def _epoch_colours(count: int) -> list[tuple[float, float, float, float]]:
    from matplotlib import colormaps

    cmap = colormaps["viridis_r"]
    return [cmap(0.15 + 0.85 * i / max(count - 1, 1)) for i in range(count)]


def scatter_map(points: np.ndarray, labels: np.ndarray, classes: Sequence[str], method: str) -> str:
    """The 2-D map, one colour per class, legend with the class names."""
    fig = Figure(figsize=(7.5, 6.0), layout="constrained")
    ax = fig.subplots()
    palette = "tab10" if len(classes) <= 10 else "tab20"
    from matplotlib import colormaps

    cmap = colormaps[palette]
    for c, name in enumerate(classes):
        chosen = labels == c
        if chosen.any():
            ax.scatter(
                points[chosen, 0], points[chosen, 1], s=5, color=cmap(c % cmap.N), label=name
            )
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"{method} of the test representations ({len(points)} images)", fontsize=10)
    if len(classes) <= 40:
        ax.legend(fontsize=7, markerscale=3, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return figure_uri(fig)
