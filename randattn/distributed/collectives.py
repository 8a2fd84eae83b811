"""Differentiable collectives: forward communication with the transposed communication in backward.

``torch.distributed`` collectives do not record autograd history. These wrappers do, so states
combined across ranks carry gradients back to the ranks that produced them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["all_gather", "all_reduce_sum", "all_reduce_max"]


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        out = tensor.contiguous().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        # d(sum_r x_r)/dx_s = I on every rank, and every rank's loss depends on the sum: the gradient
        # of x_s is the sum over ranks of their output gradients.
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        world = dist.get_world_size(group)
        parts = [torch.empty_like(tensor, memory_format=torch.contiguous_format) for _ in range(world)]
        dist.all_gather(parts, tensor.contiguous(), group=group)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        # The transpose of an all-gather is a reduce-scatter: slot r of every rank's gradient is summed
        # on rank r. Backends without reduce-scatter (gloo) all-reduce the stack and keep their slot.
        group = ctx.group
        rank = dist.get_rank(group)
        grad = grad.contiguous()
        if dist.get_backend(group) == dist.Backend.NCCL:
            out = torch.empty_like(grad[0])
            dist.reduce_scatter_tensor(out, grad, op=dist.ReduceOp.SUM, group=group)
            return out, None
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=group)
        return grad[rank].clone(), None


def all_reduce_sum(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Sum of ``tensor`` over the ranks of ``group``, differentiable (backward all-reduces the gradient).

    Shapes: ``(...) -> (...)``, the same on every rank.
    """
    return _AllReduceSum.apply(tensor, group)


def all_gather(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Stack of ``tensor`` from every rank of ``group`` in rank order, differentiable.

    Shapes: ``(...) -> (P, ...)`` for ``P`` ranks; every rank must pass the same shape. Backward sums the
    gradient of slot ``r`` over all ranks onto rank ``r`` (a reduce-scatter).
    """
    return _AllGather.apply(tensor, group)


def all_reduce_max(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Elementwise maximum over the ranks of ``group`` of a detached tensor (no gradient).

    Shapes: ``(...) -> (...)``. Used for stabilisers, which cancel and need no gradient.
    """
    out = tensor.detach().contiguous().clone()
    dist.all_reduce(out, op=dist.ReduceOp.MAX, group=group)
    return out
