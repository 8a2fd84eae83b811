"""Timing and peak-memory measurement of one attention module on one input.

Forward and backward are measured separately. Times are medians over repeated runs after warm-up
(CUDA events on a GPU, a wall clock on the CPU). Peak memory of a pass is the largest amount of GPU
memory allocated during it minus what was allocated just before the forward pass (module weights,
input and output gradient); the backward figure therefore includes what the forward pass saved for
it. Running out of GPU memory is recorded as a failure, never raised.
"""

from __future__ import annotations

import contextlib
import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

MIB = 2.0**20


@dataclass(frozen=True)
class Budget:
    """How many runs a measurement makes.

    ``warmup`` untimed forward+backward runs first; then each pass is repeated until its runs add
    up to ``target_ms`` or ``max_repeats`` runs were made, but at least ``min_repeats`` times.
    """

    warmup: int = 2
    min_repeats: int = 3
    max_repeats: int = 10
    target_ms: float = 100.0


#: Budget of the recorded (GPU) benchmark.
DEFAULT_BUDGET = Budget()
#: Budget of quick CPU runs.
QUICK_BUDGET = Budget(warmup=1, min_repeats=1, max_repeats=3, target_ms=5.0)


class _Clock:
    """Times a callable in ms: CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def time(self, fn: Callable[[], object]) -> tuple[float, object]:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            result = fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end), result
        t0 = time.perf_counter()
        result = fn()
        return (time.perf_counter() - t0) * 1e3, result


def _repeat(timed: Callable[[], float], budget: Budget) -> tuple[float, int]:
    """Median of ``timed()`` over a time-budgeted number of runs; returns (median ms, runs)."""
    samples: list[float] = []
    while len(samples) < budget.min_repeats or (len(samples) < budget.max_repeats and sum(samples) < budget.target_ms):
        samples.append(timed())
    return statistics.median(samples), len(samples)


def compute_context(device_type: str, dtype: str) -> contextlib.AbstractContextManager:
    """The context a benchmark pass runs in: bf16 autocast for ``"bfloat16"``, none for ``"float32"``."""
    return torch.autocast(device_type, dtype=torch.bfloat16) if dtype == "bfloat16" else contextlib.nullcontext()


def empty_record(failure: str | None = None) -> dict:
    """A record of :func:`measure` with nothing measured (and an optional failure message)."""
    return {
        "fwd_ms": None,
        "bwd_ms": None,
        "fwd_mib": None,
        "bwd_mib": None,
        "fwd_runs": 0,
        "bwd_runs": 0,
        "failure": failure,
    }


def measure(model: nn.Module, x: torch.Tensor, *, dtype: str = "bfloat16", budget: Budget = DEFAULT_BUDGET) -> dict:
    """Measure forward and backward of self-attention ``model(x, x, x, need_weights=False)``.

    Args:
        model: an attention module with the ``nn.MultiheadAttention`` call signature and
            ``batch_first=True``.
        x: input ``(N, L, E)`` on the model's device, ``requires_grad`` set.
        dtype: ``"bfloat16"`` runs under bf16 autocast, ``"float32"`` without autocast.
        budget: warm-up and repeat counts.

    Returns:
        dict with ``fwd_ms``, ``bwd_ms`` (medians), ``fwd_mib``, ``bwd_mib`` (peak memory above
        the memory resident before the forward pass; ``None`` off CUDA), ``fwd_runs``, ``bwd_runs``
        and ``failure`` (``None``, or a message when the GPU ran out of memory or the model raised,
        in which case the metrics not measured are ``None``).
    """
    result = empty_record()
    try:
        _measure_into(result, model, x, dtype, budget)
    except torch.OutOfMemoryError:
        stage = "backward" if result["fwd_ms"] is not None else "forward"
        result["failure"] = f"out of memory ({stage})"
    except Exception as exc:  # e.g. a kernel that does not fit the device: recorded, never fatal
        stage = "backward" if result["fwd_ms"] is not None else "forward"
        result["failure"] = f"error ({stage}): {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    finally:
        model.zero_grad(set_to_none=True)
        x.grad = None
    if result["failure"] and x.device.type == "cuda":  # give the next point a clean allocator
        gc.collect()
        torch.cuda.empty_cache()
    return result


def _measure_into(result: dict, model: nn.Module, x: torch.Tensor, dtype: str, budget: Budget) -> None:
    """Fill ``result``: all forward metrics first, then all backward metrics."""
    device = x.device
    cuda = device.type == "cuda"
    clock = _Clock(device)
    autocast = compute_context(device.type, dtype)

    def forward() -> torch.Tensor:
        with autocast:
            return model(x, x, x, need_weights=False)[0]

    def clear_grads() -> None:
        model.zero_grad(set_to_none=True)
        x.grad = None

    def peak_above(base: int) -> float:
        clock.sync()
        return (torch.cuda.max_memory_allocated(device) - base) / MIB

    # Forward: warm-up, peak memory, time.
    with torch.no_grad():
        grad = torch.randn_like(forward())
    for _ in range(budget.warmup):
        forward()
    clock.sync()
    if cuda:
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = forward()
        result["fwd_mib"] = peak_above(base)
        del out

    def timed_forward() -> float:
        ms, out = clock.time(forward)
        del out
        return ms

    fwd_ms, result["fwd_runs"] = _repeat(timed_forward, budget)
    result["fwd_ms"] = fwd_ms  # set last: marks the forward as fully measured

    # Backward: warm-up, peak memory (above what was resident before the forward), time.
    for _ in range(budget.warmup):
        clear_grads()
        forward().backward(grad)
    clear_grads()
    clock.sync()
    if cuda:
        base = torch.cuda.memory_allocated(device)
        out = forward()
        clock.sync()
        torch.cuda.reset_peak_memory_stats(device)
        out.backward(grad)
        bwd_mib = peak_above(base)
        del out
        clear_grads()

    def timed_backward() -> float:
        clear_grads()
        out = forward()
        clock.sync()
        ms, _ = clock.time(lambda: out.backward(grad))
        return ms

    result["bwd_ms"], result["bwd_runs"] = _repeat(timed_backward, budget)
    if cuda:
        result["bwd_mib"] = bwd_mib


def interleaved(
    models: dict[str, nn.Module],
    x: torch.Tensor,
    *,
    dtype: str = "bfloat16",
    rounds: int = 12,
    steps: int = 10,
    skip_rounds: int = 2,
) -> dict[str, dict[str, float]]:
    """Wall time of forward and backward of several models measured in turns, for short sequences.

    Where the host's time sets a layer's speed (short sequences), it drifts during a run and
    differs between runs by tens of percent; measured in turns, the models see the same drift, so
    their ratios hold. Each round runs ``steps`` forward+backward steps of every model in order;
    the first ``skip_rounds`` rounds warm up.

    Args:
        models: name -> module with the ``nn.MultiheadAttention`` call signature (``batch_first``).
        x: input ``(N, L, E)`` with ``requires_grad`` set.
        dtype: ``"bfloat16"`` (autocast) or ``"float32"``.
        rounds, steps, skip_rounds: as above (``rounds > skip_rounds``).

    Returns:
        name -> ``{"fwd_issue_us", "bwd_issue_us", "total_us"}``: medians over the timed steps of
        the host time to issue the forward and the backward, and of the wall time of both passes
        with the device synchronised after each.
    """
    if rounds <= skip_rounds or steps < 1:
        raise ValueError(f"need rounds > skip_rounds and steps >= 1, got {rounds}, {skip_rounds}, {steps}")
    clock = _Clock(x.device)
    autocast = compute_context(x.device.type, dtype)
    samples: dict[str, tuple[list[float], list[float], list[float]]] = {name: ([], [], []) for name in models}
    for r in range(rounds):
        for name, model in models.items():
            for _ in range(steps):
                model.zero_grad(set_to_none=True)
                x.grad = None
                clock.sync()
                t0 = time.perf_counter()
                with autocast:
                    out = model(x, x, x, need_weights=False)[0]
                t1 = time.perf_counter()
                clock.sync()
                t2 = time.perf_counter()
                out.backward(torch.ones_like(out))
                t3 = time.perf_counter()
                clock.sync()
                t4 = time.perf_counter()
                if r >= skip_rounds:
                    fwd, bwd, total = samples[name]
                    fwd.append((t1 - t0) * 1e6)
                    bwd.append((t3 - t2) * 1e6)
                    total.append((t4 - t0) * 1e6)
    for model in models.values():
        model.zero_grad(set_to_none=True)
    x.grad = None
    keys = ("fwd_issue_us", "bwd_issue_us", "total_us")
    return {name: dict(zip(keys, map(statistics.median, samples[name]))) for name in models}


def back_to_back(
    model: nn.Module,
    x: torch.Tensor,
    *,
    dtype: str = "bfloat16",
    steps: int = 20,
    rounds: int = 5,
    warmup: int = 3,
    graphs: bool = False,
) -> float:
    """Time per forward+backward step of ``steps`` steps issued back to back, as a training loop runs.

    The device is synchronised only around each group of steps, so the host issues the next step
    while the GPU runs the last one: the result is the larger of the two times per step. With
    ``graphs``, each step starts with ``torch.compiler.cudagraph_mark_step_begin()`` (for a model
    compiled with ``mode="reduce-overhead"``, whose replays need no host work per kernel). Gradients
    are reset to ``None`` every step, as ``optimizer.zero_grad()`` does.

    Args:
        model: module with the ``nn.MultiheadAttention`` call signature (``batch_first``).
        x: input ``(N, L, E)`` with ``requires_grad`` set.
        dtype: ``"bfloat16"`` (autocast) or ``"float32"``.
        steps, rounds, warmup: steps per timed group, timed groups, untimed warm-up steps.
        graphs: mark each step's beginning for CUDA graphs.

    Returns:
        Median over the rounds of the time per step, in ms.
    """
    if steps < 1 or rounds < 1 or warmup < 0:
        raise ValueError(f"need steps >= 1, rounds >= 1 and warmup >= 0, got {steps}, {rounds}, {warmup}")
    clock = _Clock(x.device)
    autocast = compute_context(x.device.type, dtype)
    grad: list[torch.Tensor] = []

    def step() -> None:
        model.zero_grad(set_to_none=True)
        x.grad = None
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with autocast:
            out = model(x, x, x, need_weights=False)[0]
        if not grad:
            grad.append(torch.randn(out.shape, device=out.device, dtype=out.dtype))
        out.backward(grad[0])

    def group() -> None:
        for _ in range(steps):
            step()

    for _ in range(warmup):
        step()
    samples = []
    for _ in range(rounds):
        clock.sync()
        ms, _ = clock.time(group)
        samples.append(ms / steps)
    model.zero_grad(set_to_none=True)
    x.grad = None
    return statistics.median(samples)
