"""Feature redraws that agree on every rank without communication.

Data-parallel ranks hold replicas of each layer's projection buffer. Redrawing it from a private or
global generator lets the replicas drift apart (FSDP2 never synchronises buffers; DDP only with
``broadcast_buffers=True``, at the cost of a broadcast per forward). :func:`redraw_all` instead draws
every layer's projection from a seed derived from ``(base_seed, step, layer index)``: every rank that
calls it with the same arguments gets bit-identical projections.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

__all__ = ["redraw_all", "redraw_seed"]


def redraw_seed(base_seed: int, step: int, index: int) -> int:
    """Seed of layer number ``index`` at training step ``step`` (a well-mixed 63-bit integer).

    Args:
        base_seed, step, index: non-negative ints.
    """
    for name, value in (("base_seed", base_seed), ("step", step), ("index", index)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    state = np.random.SeedSequence([int(base_seed), int(step), int(index)]).generate_state(1, np.uint64)[0]
    return int(state) >> 1


def redraw_all(model: nn.Module, step: int, base_seed: int = 0) -> int:
    """Redraw the projection of every :class:`~randattn.RandMultiHeadAttention` in ``model``.

    Layer ``i`` (in ``model.modules()`` order, which is the same on every rank) draws from a CPU
    generator seeded with :func:`redraw_seed` ``(base_seed, step, i)``. Call it on every rank with the same
    ``step`` (e.g. every ``k`` optimiser steps) to keep the replicas identical with no communication;
    works under :class:`~torch.nn.parallel.DistributedDataParallel` and ``fully_shard`` (FSDP2), whose
    projection buffers are replicated, not sharded.

    Args:
        model: any module (a wrapped model is fine: the layers are found by type).
        step: training step (or redraw counter).
        base_seed: seed shared by all ranks.

    Returns:
        The number of layers redrawn.
    """
    from ..modules import RandMultiHeadAttention

    count = 0
    for module in model.modules():
        if isinstance(module, RandMultiHeadAttention):
            generator = torch.Generator().manual_seed(redraw_seed(base_seed, step, count))
            module.redraw_features(generator=generator)
            count += 1
    return count
