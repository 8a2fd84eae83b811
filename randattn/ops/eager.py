"""Autograd around the Triton kernels outside ``torch.compile``.

Under ``torch.compile`` the kernels run as the ``randattn::*`` custom ops (fake implementations,
registered autograd). Called eagerly, the same kernels go through the ``autograd.Function`` classes
below instead, which skip the custom-op dispatch (about 0.1 ms of host time per forward and
backward, which matters at short sequences where the GPU work is a fraction of that).

An op is a module of kernels with two functions (see :mod:`randattn.ops.noncausal.triton`):

- ``forward_saving(q, k, v, projection, kernel_fn, key_bias, needs_grad) -> (out, saved)``, keeping
  nothing for a backward when ``needs_grad`` is false (inference);
- ``backward_from(dout, q, k, v, projection, kernel_fn, key_bias, saved, grads=None) -> (dq, dk, dv)``,
  writing into the three views ``grads`` when given.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["KernelAttention", "PackedSelfAttention", "InProjection", "column_sums", "split_packed", "packed_views"]


def split_packed(qkv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Views ``q, k, v`` ``(N, H, L, d)`` of a packed in-projection ``(N, L, 3 E)`` (no copy)."""
    n, length, three_e = qkv.shape
    head_dim = three_e // (3 * num_heads)
    parts = qkv.view(n, length, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4)
    return parts[0], parts[1], parts[2]


def packed_views(qkv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The views of :func:`split_packed` as three ``as_strided`` views (three tensor ops instead of
    five), for the kernels: not for autograd, whose backward of ``as_strided`` is generic and slow."""
    n, length, three_e = qkv.shape
    embed = three_e // 3
    head_dim = embed // num_heads
    s_n, s_l, s_e = qkv.stride()
    size, stride = (n, num_heads, length, head_dim), (s_n, head_dim * s_e, s_l, s_e)
    base = qkv.storage_offset()
    return (
        qkv.as_strided(size, stride, base),
        qkv.as_strided(size, stride, base + embed * s_e),
        qkv.as_strided(size, stride, base + 2 * embed * s_e),
    )


class KernelAttention(torch.autograd.Function):
    """``op``'s kernels on separate ``q, k, v`` ``(N, H, L|S, d)``; returns ``(N, H, L, d_v)``."""

    @staticmethod
    def forward(ctx, op, q, k, v, projection, kernel_fn, key_bias):
        needs_grad = any(ctx.needs_input_grad[1:4])
        out, saved = op.forward_saving(q, k, v, projection, kernel_fn, key_bias, needs_grad=needs_grad)
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
    def forward(ctx, op, qkv, num_heads, projection, kernel_fn, key_bias):
        q, k, v = packed_views(qkv, num_heads)
        needs_grad = ctx.needs_input_grad[1]
        out, saved = op.forward_saving(q, k, v, projection, kernel_fn, key_bias, needs_grad=needs_grad)
        ctx.op, ctx.kernel_fn, ctx.num_heads = op, kernel_fn, num_heads
        ctx.save_for_backward(qkv, projection, key_bias, *saved)
        return out

    @staticmethod
    def backward(ctx, dout):
        qkv, projection, key_bias, *saved = ctx.saved_tensors
        dqkv = torch.empty(qkv.shape, device=qkv.device, dtype=qkv.dtype)
        q, k, v = packed_views(qkv, ctx.num_heads)
        grads = packed_views(dqkv, ctx.num_heads)
        ctx.op.backward_from(dout, q, k, v, projection, ctx.kernel_fn, key_bias, saved, grads)
        return None, dqkv, None, None, None, None


def column_sums(t: torch.Tensor, group: int = 256) -> torch.Tensor:
    """Float32 sums of the columns of ``t`` ``(R, C)`` in two stages (groups of ``group`` rows, then
    the groups), so that no reduction over all ``R`` rows at once needs a large workspace."""
    rows, cols = t.shape
    full = rows - rows % group
    if not full:
        return t.sum(0, dtype=torch.float32)
    total = t[:full].view(full // group, group, cols).sum(1, dtype=torch.float32).sum(0)
    if full < rows:
        total += t[full:].sum(0, dtype=torch.float32)
    return total


class InProjection(torch.autograd.Function):
    """``x W^T + b`` in ``dtype`` (the autocast dtype under autocast), as ``F.linear`` computes it.

    The backward computes the bias gradient first (:func:`column_sums`), then the input and weight
    gradients; ``nn.Linear``'s backward holds the input gradient, the weight gradient and a reduction
    workspace (hundreds of MiB at long sequences) at once, the largest moment of an attention layer's
    backward. Gradients come back in the dtypes of ``x``, ``W`` and ``b``, as through autocast's casts.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, dtype):
        x_c, w_c = x.to(dtype), weight.to(dtype)
        b_c = None if bias is None else bias.to(dtype)
        device = x.device.type
        # operands already in the autocast dtype (or no autocast) need no autocast context
        casting = torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) != dtype
        with torch.autocast(device, enabled=False) if casting else contextlib.nullcontext():
            qkv = torch.nn.functional.linear(x_c, w_c, b_c)
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.save_for_backward(x_c, w_c)
        return qkv

    @staticmethod
    def backward(ctx, dqkv):
        x_c, w_c = ctx.saved_tensors
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        d2 = dqkv.flatten(0, -2)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[2]:
            grad_b = column_sums(d2).to(dqkv.dtype).to(b_dtype)
        if ctx.needs_input_grad[0]:
            grad_x = (d2 @ w_c).view(x_c.shape).to(x_dtype)
        if ctx.needs_input_grad[1]:
            grad_w = (d2.t() @ x_c.flatten(0, -2)).to(w_dtype)
        return grad_x, grad_w, grad_b, None
