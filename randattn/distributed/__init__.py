"""Scaling out over ``torch.distributed``: context parallelism, seeded feature redraws, communication cost.

Public names:

- :func:`context_parallel_attention`, :func:`context_parallel_self_attention`: one sequence sharded
  over the ranks of a process group, communicating only ``(m, d)`` states.
- :func:`exclusive_prefix_state`: the causal state of the ranks before this one.
- :func:`redraw_all`: redraw every layer's projection from ``(base_seed, step)``, identically on
  every rank without communication.
- :func:`communication_bytes`, :func:`ring_attention_bytes`, :func:`communication_table`: bytes
  communicated per layer, against ring attention.
- :func:`all_reduce_sum`, :func:`all_gather`: differentiable collectives.
- :func:`load_weak_scaling`, :func:`weak_scaling_rows`: recorded multi-GPU results.
"""

from .collectives import all_gather, all_reduce_max, all_reduce_sum
from .communication import communication_bytes, communication_table, format_bytes, ring_attention_bytes
from .context_parallel import context_parallel_attention, context_parallel_self_attention, exclusive_prefix_state
from .redraw import redraw_all, redraw_seed
from .weak_scaling import load_weak_scaling, weak_scaling_rows

__all__ = [
    "all_gather",
    "all_reduce_max",
    "all_reduce_sum",
    "communication_bytes",
    "communication_table",
    "context_parallel_attention",
    "context_parallel_self_attention",
    "exclusive_prefix_state",
    "format_bytes",
    "load_weak_scaling",
    "redraw_all",
    "redraw_seed",
    "ring_attention_bytes",
    "weak_scaling_rows",
]
