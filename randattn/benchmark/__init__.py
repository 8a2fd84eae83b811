"""Benchmark of :class:`randattn.RandMultiHeadAttention` against ``nn.MultiheadAttention``.

Sweeps a grid of configurations, measures forward/backward time and peak GPU memory, stores the
results point by point in a resumable JSON file, and draws the figures of the benchmark page.
Command line: ``python -m randattn.benchmark sweep|plot``.
"""

from .grid import (
    QUICK_GRID,
    SPEC_GRID,
    FigureSpec,
    Grid,
    Point,
    caption,
    figure_number,
    figures,
)
from .plot import plot_figure, save_figure, write_figures
from .store import Results, ResultStore, load_results
from .summary import crossover, crossover_table, plot_overview, ratio
from .sweep import build_model, record_or_load, run_sweep
from .timing import Budget, measure

__all__ = [
    "Budget",
    "FigureSpec",
    "Grid",
    "Point",
    "QUICK_GRID",
    "Results",
    "ResultStore",
    "SPEC_GRID",
    "build_model",
    "caption",
    "crossover",
    "crossover_table",
    "figure_number",
    "figures",
    "load_results",
    "measure",
    "plot_figure",
    "plot_overview",
    "ratio",
    "record_or_load",
    "run_sweep",
    "save_figure",
    "write_figures",
]
