"""Autograd around the Triton kernels outside ``torch.compile``.

Under ``torch.compile`` the kernels run as the ``randattn::*`` custom ops (fake implementations,
registered autograd). Called eagerly, the same kernels go through the ``autograd.Function`` classes
below instead, which skip the custom-op dispatch (about 0.1 ms of host time per forward and
backward, which matters at short sequences where the GPU work is a fraction of that).

An op is a module of kernels with two functions (see :mod:`randattn.ops.noncausal.triton`):

- ``forward_saving(q, k, v, projection, kernel_fn, key_bias) -> (out, saved)``;
- ``backward_from(dout, q, k, v, projection, kernel_fn, key_bias, saved, grads=None) -> (dq, dk, dv)``,
  writing into the three views ``grads`` when given.
"""

from __future__ import annotations

import torch

__all__ = ["KernelAttention", "PackedSelfAttention", "split_packed"]


def split_packed(qkv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Views ``q, k, v`` ``(N, H, L, d)`` of a packed in-projection ``(N, L, 3 E)`` (no copy)."""
    n, length, three_e = qkv.shape
    head_dim = three_e // (3 * num_heads)
    parts = qkv.unflatten(-1, (3, num_heads, head_dim)).permute(2, 0, 3, 1, 4)
    return parts[0], parts[1], parts[2]


class KernelAttention(torch.autograd.Function):
    """``op``'s kernels on separate ``q, k, v`` ``(N, H, L|S, d)``; returns ``(N, H, L, d_v)``."""

    @staticmethod
    def forward(ctx, op, q, k, v, projection, kernel_fn, key_bias):
        out, saved = op.forward_saving(q, k, v, projection, kernel_fn, key_bias)
        ctx.op, ctx.kernel_fn = op, kernel_fn
        ctx.save_for_backward(q, k, v, projection, key_bias, *saved)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, projection, key_bias, *saved = ctx.saved_tensors
        dq, dk, dv = ctx.op.backward_from(dout, q, k, v, projection, ctx.kernel_fn, key_bias, saved)
        return None, dq, dk, dv, None, None, None


class PackedSelfAttention(torch.autograd.Function):
    """``op``'s kernels on a packed in-projection ``qkv`` ``(N, L, 3 E)``; returns ``(N, H, L, d)``.

    The kernels read ``q, k, v`` as strided views of ``qkv`` and write their gradients straight into
    one ``(N, L, 3 E)`` tensor, so self-attention needs one in-projection matmul forward and backward
    and no concatenation of the three gradients.
    """

    @staticmethod
    def forward(ctx, op, qkv, num_heads, projection, kernel_fn, key_bias, views=None):
        # views: split_packed(qkv, num_heads) when the caller has them already (a tuple: not tracked)
        q, k, v = views if views is not None else split_packed(qkv, num_heads)
        out, saved = op.forward_saving(q, k, v, projection, kernel_fn, key_bias)
        ctx.op, ctx.kernel_fn, ctx.num_heads = op, kernel_fn, num_heads
        ctx.save_for_backward(qkv, projection, key_bias, *saved)
        return out

    @staticmethod
    def backward(ctx, dout):
        qkv, projection, key_bias, *saved = ctx.saved_tensors
        dqkv = torch.empty(qkv.shape, device=qkv.device, dtype=qkv.dtype)
        q, k, v = split_packed(qkv, ctx.num_heads)
        grads = split_packed(dqkv, ctx.num_heads)
        ctx.op.backward_from(dout, q, k, v, projection, ctx.kernel_fn, key_bias, saved, grads)
        return None, dqkv, None, None, None, None, None
