"""Compile the Triton kernels of a grid ahead of a sweep, in parallel worker processes.

Each distinct (embed_dim, num_heads, num_features, kernel) of a grid compiles its own kernels (head
dim and number of features are compile-time constants). Compiling them one after another inside a
sweep costs minutes; worker processes fill Triton's on-disk cache in parallel, and the sweep then
loads every kernel from the cache. Timings are unaffected: the sweep warms up each point anyway.
"""

from __future__ import annotations

import multiprocessing
import time

import torch

from .grid import RAND, SPEC_GRID, Grid, Point
from .timing import compute_context


def kernel_configurations(grid: Grid) -> list[Point]:
    """One shortest-sequence point of ``RandMultiHeadAttention`` per distinct compiled configuration."""
    shortest = min(grid.seq_lens)
    seen = {(p.embed_dim, p.num_heads, p.num_features, p.kernel): p for p in grid.points() if p.model == RAND}
    return [Point(RAND, e, h, shortest, k, m) for (e, h, m, k) in sorted(seen, key=str)]


def _warm(args: tuple[Point, str, int]) -> str:
    from .sweep import build_model

    point, dtype, batch = args
    device = torch.device("cuda")
    model = build_model(point, device)
    x = torch.randn(batch, point.seq_len, point.embed_dim, device=device, requires_grad=True)
    try:
        with compute_context("cuda", dtype):
            out, _ = model(x, x, x, need_weights=False)
        out.float().sum().backward()
        torch.cuda.synchronize()
    except Exception as exc:  # reported, never fatal: the sweep records its own failures
        return f"{point.key}: {type(exc).__name__}: {exc}"
    return ""


def prewarm(grid: Grid = SPEC_GRID, processes: int = 8) -> list[str]:
    """Compile every kernel configuration of ``grid`` on the current GPU; returns error messages.

    Does nothing without CUDA.
    """
    if not torch.cuda.is_available():
        return []
    jobs = [(p, grid.dtype, grid.batch_size) for p in kernel_configurations(grid)]
    start = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        errors = [e for e in pool.map(_warm, jobs, chunksize=1) if e]
    print(
        f"prewarmed {len(jobs)} kernel configurations in {time.perf_counter() - start:.0f} s with {processes} processes"
    )
    return errors
