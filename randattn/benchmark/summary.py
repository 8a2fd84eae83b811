"""Comparisons drawn from benchmark results: speedup, memory ratio and crossover length."""

from __future__ import annotations

import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from .grid import KERNEL_LABELS, MHA, RAND, Point
from .plot import length_label
from .store import Results

#: Metrics of the overview: a training step's time, and its peak memory.
TIME = ("fwd_ms", "bwd_ms")
MEMORY = ("bwd_mib",)


def ratio(
    results: Results, embed_dim: int, num_heads: int, kernel: str, num_features: int, metrics: tuple[str, ...]
) -> tuple[list[int], list[float]]:
    """``nn.MultiheadAttention`` over ``RandMultiHeadAttention`` for the sum of ``metrics``, per length.

    A ratio above 1 means ``RandMultiHeadAttention`` is faster (times) or smaller (memory). Lengths
    where either model lacks a value (failure, not measured) are left out.
    """
    lengths, ratios = [], []
    for n in results.grid.seq_lens:
        mha_record = results.record(Point(MHA, embed_dim, num_heads, n))
        rand_record = results.record(Point(RAND, embed_dim, num_heads, n, kernel, num_features))
        if mha_record is None or rand_record is None:
            continue
        if all(r[q] is not None for r in (mha_record, rand_record) for q in metrics):
            mha, rand = (sum(r[q] for q in metrics) for r in (mha_record, rand_record))
            lengths.append(n)
            ratios.append(mha / rand)
    return lengths, ratios


def crossover(lengths: list[int], ratios: list[float]) -> int | None:
    """Smallest length from which the ratio stays above 1 for every longer length, or ``None``."""
    result = None
    for n, r in zip(reversed(lengths), reversed(ratios)):
        if r <= 1.0:
            break
        result = n
    return result


def plot_overview(results: Results, num_heads: int, num_features: int) -> Figure:
    """Speedup (forward + backward time) and backward peak-memory ratio vs length.

    One line per (embed_dim, kernel) at the given ``num_heads`` and ``num_features``.
    """
    grid = results.grid
    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(11, 4.6), dpi=100)
    panels = (
        (ax_time, TIME, "speedup: (fwd + bwd time) MHA / Rand"),
        (ax_mem, MEMORY, "backward peak-memory ratio MHA / Rand"),
    )
    for ax, metrics, title in panels:
        drawn = False
        for i, e in enumerate(grid.embed_dims):
            for kernel, style in zip(grid.kernels, ("--", "-")):
                lengths, ratios = ratio(results, e, num_heads, kernel, num_features, metrics)
                drawn |= bool(ratios)
                ax.plot(
                    lengths,
                    ratios,
                    style,
                    color=f"C{i}",
                    marker="o",
                    markersize=4,
                    label=f"E={e} {KERNEL_LABELS[kernel]}",
                )
        ax.set_xscale("log", base=2)
        ax.set_xticks(grid.seq_lens, [length_label(n) for n in grid.seq_lens])
        ax.minorticks_off()
        if drawn:
            ax.set_yscale("log")
            ax.axhline(1.0, color="0.3", linewidth=1)
        else:
            ax.set_xlim(grid.seq_lens[0], grid.seq_lens[-1])
            ax.set_yticks([])
            ax.text(
                0.5,
                0.5,
                f"not measured on {results.metadata['device']}",
                ha="center",
                transform=ax.transAxes,
                color="0.4",
            )
        ax.set_xlabel("sequence length")
        ax.set_title(title, fontsize=11)
        ax.grid(True, alpha=0.3)
    ax_time.legend(fontsize=8, ncol=2)
    fig.suptitle(f"{num_heads} heads, m = {num_features}; above 1: RandMultiHeadAttention wins", fontsize=12)
    fig.tight_layout()
    return fig


def crossover_table(results: Results, num_heads: int) -> str:
    """Text table of crossover lengths (time and memory) per (embed_dim, kernel) and ``m``.

    Each cell reads ``time/memory``: the lengths from which ``RandMultiHeadAttention`` is faster
    (forward + backward) and uses less backward peak memory; ``-`` where it never does.
    """
    grid = results.grid
    header = f"{'embed':>6} {'kernel':>8} " + " ".join(f"{'m=' + str(m):>15}" for m in grid.num_features)
    rows = [f"crossover lengths at {num_heads} heads (time/memory)", header]
    for e in grid.embed_dims:
        for kernel in grid.kernels:
            cells = []
            for m in grid.num_features:
                found = [crossover(*ratio(results, e, num_heads, kernel, m, metrics)) for metrics in (TIME, MEMORY)]
                cells.append("/".join("-" if n is None else str(n) for n in found))
            rows.append(f"{e:>6} {kernel:>8} " + " ".join(f"{c:>15}" for c in cells))
    return "\n".join(rows)
