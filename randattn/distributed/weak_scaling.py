"""Recorded weak-scaling results of ``scripts/bench_context_parallel.py``: loading and efficiency.

Each run of the script on ``P`` GPUs writes ``context_parallel_p{P}.json``; weak-scaling efficiency at
``P`` GPUs is ``t_1 / t_P`` for the same number of positions per GPU.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["load_weak_scaling", "weak_scaling_rows"]


def load_weak_scaling(folder: str | Path) -> list[dict]:
    """All ``context_parallel_p*.json`` records in ``folder``, sorted by world size (empty if none)."""
    folder = Path(folder)
    records = [json.loads(p.read_text()) for p in sorted(folder.glob("context_parallel_p*.json"))]
    return sorted(records, key=lambda r: r["world_size"])


def weak_scaling_rows(records: list[dict]) -> list[dict]:
    """One row per (world size, scheme) with the efficiency against the one-GPU record.

    Args:
        records: from :func:`load_weak_scaling`; the one with ``world_size == 1`` is the baseline.

    Returns:
        Dicts with ``world_size``, ``total_len``, ``causal``, ``fwd_bwd_ms``, ``comm_ms``,
        ``peak_memory_gib`` (or ``None``) and ``efficiency`` (``None`` without a one-GPU record).
    """
    base = {row["causal"]: row["fwd_bwd_ms"] for r in records if r["world_size"] == 1 for row in r["rows"]}
    out = []
    for record in records:
        for row in record["rows"]:
            ref = base.get(row["causal"])
            peak = row.get("peak_memory_bytes")
            out.append(
                {
                    "world_size": record["world_size"],
                    "total_len": record["config"]["total_len"],
                    "causal": row["causal"],
                    "fwd_bwd_ms": row["fwd_bwd_ms"],
                    "comm_ms": row["comm_ms"],
                    "peak_memory_gib": None if peak is None else peak / 2**30,
                    "efficiency": None if ref is None else ref / row["fwd_bwd_ms"],
                }
            )
    return out
