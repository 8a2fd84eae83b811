"""Sweep a benchmark grid: build each model, measure it, store each point as soon as it is done."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .grid import MHA, SPEC_GRID, Grid, Point
from .store import Results, ResultStore, load_results, sweep_setup
from .timing import DEFAULT_BUDGET, Budget, empty_record, measure

#: Seed of the weights: both models of one (embed_dim, num_heads) share their weights.
SEED = 0

ModelFactory = Callable[[Point, torch.device], nn.Module]


def build_model(point: Point, device: torch.device, backend: str = "auto") -> nn.Module:
    """The module of a point: ``nn.MultiheadAttention`` or ``RandMultiHeadAttention`` with its weights.

    Both are ``batch_first`` with fp32 parameters; ``RandMultiHeadAttention`` is built by
    :meth:`~randattn.RandMultiHeadAttention.from_mha` from the same seeded ``nn.MultiheadAttention``.
    """
    from randattn import RandMultiHeadAttention

    torch.manual_seed(SEED)
    mha = nn.MultiheadAttention(point.embed_dim, point.num_heads, batch_first=True, device=device)
    if point.model == MHA:
        return mha
    return RandMultiHeadAttention.from_mha(
        mha, num_random_features=point.num_features, kernel_fn=point.kernel, backend=backend, seed=SEED
    )


def measure_point(
    point: Point, grid: Grid, device: torch.device, budget: Budget, factory: ModelFactory = build_model
) -> dict:
    """Build the model and input ``(batch, L, E)`` of a point and measure it (OOM is a failure)."""
    try:
        model = factory(point, device)
        x = torch.randn(grid.batch_size, point.seq_len, point.embed_dim, device=device, requires_grad=True)
    except torch.OutOfMemoryError:
        out_of_memory = True
    else:
        out_of_memory = False
    if out_of_memory:  # outside the except block, so the failed allocation's frames are freed first
        torch.cuda.empty_cache()
        return empty_record("out of memory (setup)")
    return measure(model, x, dtype=grid.dtype, budget=budget)


def run_sweep(
    path: str | os.PathLike,
    grid: Grid = SPEC_GRID,
    *,
    device: str | torch.device | None = None,
    budget: Budget = DEFAULT_BUDGET,
    factory: ModelFactory = build_model,
    progress: bool = True,
) -> Results:
    """Measure every point of ``grid`` and store it in the results file ``path``.

    Resumes: points already in ``path`` from a sweep with the same setup (grid, budget, device,
    versions, library source) are not measured again; a file from another setup is replaced.

    Args:
        path: results JSON file (created with its folder).
        grid: the configurations (default: the benchmark page's grid).
        device: where to run (default: CUDA if available, else CPU).
        budget: warm-up and repeat counts.
        factory: builds the module of a point (default :func:`build_model`).
        progress: show a progress bar.

    Returns:
        the complete results.
    """
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    store = ResultStore(path, sweep_setup(grid, device, dataclasses.asdict(budget)))
    points = list(grid.points())
    todo = [p for p in points if not store.done(p)]
    store.finish(complete=not todo)
    with tqdm(
        total=len(points),
        initial=len(points) - len(todo),
        disable=not progress,
        desc="attention benchmark",
        unit="point",
        mininterval=2.0,
    ) as bar:
        for point in todo:
            bar.set_postfix_str(point.key, refresh=False)
            start = time.perf_counter()
            metrics = measure_point(point, grid, device, budget, factory)
            store.add(point, {**metrics, "seconds": round(time.perf_counter() - start, 3)})
            bar.update()
    store.finish(complete=True)
    return store.results


def records_here() -> bool:
    """Whether :func:`record_or_load` measures here: on CUDA, unless ``RANDATTN_BENCHMARK_RECORD``
    is ``0`` (``1`` forces a measurement)."""
    env = os.environ.get("RANDATTN_BENCHMARK_RECORD", "")
    return torch.cuda.is_available() if env == "" else env == "1"


def record_or_load(
    path: str | os.PathLike, grid: Grid = SPEC_GRID, *, record: bool | None = None, progress: bool = True
) -> Results:
    """Results of the benchmark page: measured on a GPU, else read from the recorded file.

    With ``record`` ``None`` (default) the sweep runs when :func:`records_here`. The sweep resumes and
    reuses what ``path`` holds from the same setup, so the examples of the gallery share one sweep.
    """
    if record is None:
        record = records_here()
    if record:
        return run_sweep(path, grid, progress=progress)
    if not Path(path).exists():
        raise FileNotFoundError(
            f"no recorded benchmark results at {path}; run the sweep on a GPU (python -m randattn.benchmark sweep)"
        )
    return load_results(path)
