"""Figures of the attention benchmark: one per (embed_dim, kernel, metric), 3x3 panels each.

Rows are numbers of heads, columns numbers of random features, the x axis the sequence length
(log2), one line per model. A point that ran out of memory is drawn as a cross at the top of its
panel. Figures are PNG files on a white background whose ``Title`` text chunk is the caption.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, NullFormatter

from .grid import DTYPE_LABELS, METRIC_UNITS, MHA, MODEL_LABELS, RAND, FigureSpec, Point, figures
from .store import Results

#: Colour and marker of each model's line.
STYLES = {RAND: {"color": "#1f77b4", "marker": "o"}, MHA: {"color": "#d62728", "marker": "s"}}
FAILURE_MARKER = "X"
#: Size (inches) and resolution of a figure: about 1000 px wide, shown at 600 px on the page.
FIGSIZE = (10.0, 8.8)
DPI = 100
_STYLE: dict[str, Any] = {
    "font.size": 12,
    "axes.titlesize": 13,
    "axes.labelsize": 12,
    "xtick.labelsize": 11,
    "ytick.labelsize": 11,
    "legend.fontsize": 12,
    "figure.facecolor": "white",
    "axes.facecolor": "white",
    "savefig.facecolor": "white",
}


def length_label(n: int) -> str:
    """Tick label of a sequence length: ``512``, ``1K``, ``64K``."""
    return f"{n // 1024}K" if n >= 1024 else str(n)


def subtitle(results: Results) -> str:
    """Second title line of every figure: batch, dtype, mode and device of the recording."""
    grid = results.grid
    mode = "causal" if grid.causal else "non-causal"
    text = f"batch {grid.batch_size} · {DTYPE_LABELS[grid.dtype]} · {mode} · {results.metadata['device']}"
    return text if grid.label == "spec" else f"{text} · {grid.label} grid"


def series(results: Results, points: list[Point], metric: str) -> tuple[list, list, list]:
    """(lengths, values, failed lengths) of one line through ``points`` (one per length)."""
    lengths, values, failed = [], [], []
    for point in points:
        record = results.record(point)
        if record is None:
            continue
        if record[metric] is not None:
            lengths.append(point.seq_len)
            values.append(record[metric])
        elif record["failure"]:
            failed.append(point.seq_len)
    return lengths, values, failed


def plot_figure(results: Results, spec: FigureSpec) -> Figure:
    """Draw one figure (3x3 panels) of the results; the figure stays open."""
    grid = results.grid
    with plt.rc_context(_STYLE):  # type: ignore[arg-type]
        fig, axes = plt.subplots(
            len(grid.num_heads),
            len(grid.num_features),
            figsize=FIGSIZE,
            dpi=DPI,
            sharex=True,
            sharey=True,
            squeeze=False,
            layout="constrained",
        )
        every = 1 if len(grid.seq_lens) <= 5 else 2
        values_seen: list[float] = []
        for row, heads in enumerate(grid.num_heads):
            for col, m in enumerate(grid.num_features):
                ax = axes[row][col]
                lines = {
                    RAND: [Point(RAND, spec.embed_dim, heads, n, spec.kernel, m) for n in grid.seq_lens],
                    MHA: [Point(MHA, spec.embed_dim, heads, n) for n in grid.seq_lens],
                }
                for model, points in lines.items():
                    lengths, values, failed = series(results, points, spec.metric)
                    style = STYLES[model]
                    values_seen += values
                    ax.plot(lengths, values, color=style["color"], marker=style["marker"], markersize=5, linewidth=1.8)
                    if failed:  # crosses at the top of the panel, outside the y scale
                        ax.plot(
                            failed,
                            [0.93] * len(failed),
                            linestyle="none",
                            marker=FAILURE_MARKER,
                            markersize=10,
                            color=style["color"],
                            transform=ax.get_xaxis_transform(),
                            clip_on=False,
                        )
                ax.set_xscale("log", base=2)
                ax.set_xticks(grid.seq_lens)
                ax.set_xticklabels([length_label(n) if i % every == 0 else "" for i, n in enumerate(grid.seq_lens)])
                ax.minorticks_off()
                ax.grid(True, which="major", alpha=0.3)
                if row == 0:
                    ax.set_title(f"m = {m} features")
                if col == 0:
                    ax.set_ylabel(f"{heads} heads\n{METRIC_UNITS[spec.metric]}")
                if row == len(grid.num_heads) - 1:
                    ax.set_xlabel("sequence length")
        if values_seen:
            ax = axes[0][0]
            ax.set_yscale("log")
            low, high = min(values_seen), max(values_seen)
            ax.set_ylim(low / 1.5, high * 3.0)  # headroom for the out-of-memory crosses
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(NullFormatter())
        else:
            axes[0][0].set_yticks([])
            fig.text(
                0.5,
                0.5,
                f"{METRIC_UNITS[spec.metric]} not measured on {results.metadata['device']}",
                ha="center",
                va="center",
                fontsize=14,
                color="0.4",
                bbox={"facecolor": "white", "edgecolor": "0.7"},
            )
        handles = [
            Line2D([], [], color=STYLES[m]["color"], marker=STYLES[m]["marker"], label=MODEL_LABELS[m])
            for m in (RAND, MHA)
        ]
        handles.append(
            Line2D([], [], color="0.3", marker=FAILURE_MARKER, linestyle="none", markersize=9, label="out of memory")
        )
        fig.suptitle(f"{spec.caption}\n{subtitle(results)}", fontsize=14)
        fig.legend(handles=handles, loc="outside lower center", ncol=3, frameon=False)
    return fig


def save_figure(fig: Figure, path: str | os.PathLike, title: str) -> Path:
    """Save ``fig`` as PNG on white with the text chunk ``Title`` = ``title``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, facecolor="white", metadata={"Title": title})
    return path


def write_figures(
    results: Results,
    out_dir: str | os.PathLike,
    *,
    embed_dims: Sequence[int] | None = None,
    kernels: Sequence[str] | None = None,
    keep_open: bool = False,
) -> list[Path]:
    """Write the page's figures ``<out_dir>/<N>.png`` (all 32, or those of some embed_dims/kernels).

    With ``keep_open`` the figures stay open (for a gallery to show them), else they are closed.
    """
    paths = []
    for spec in figures(embed_dims, kernels):
        fig = plot_figure(results, spec)
        paths.append(save_figure(fig, Path(out_dir) / spec.filename, spec.caption))
        if not keep_open:
            plt.close(fig)
    return paths
