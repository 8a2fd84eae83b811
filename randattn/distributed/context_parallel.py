"""Context parallelism: one sequence sharded over the ranks of a process group.

Rank ``r`` of ``P`` holds the positions ``[L_0 + ... + L_{r-1}, ... + L_r)`` of every sequence of the
batch (consecutive blocks in rank order). Random-feature attention needs from the other ranks only
their per-head ``(m, d_v)`` states, never their keys and values:

- non-causal: each rank computes its partial ``S = phi_k^T v`` and ``z = sum phi_k`` under the global
  key stabiliser (an all-reduce MAX of ``(N, H)`` values), then all ranks all-reduce (sum) the states;
- causal: each rank summarises its block as a state (:func:`randattn.decoding.block_state`), the states
  are all-gathered, and rank ``r`` folds those of ranks ``< r`` into an exclusive prefix, rescaling by
  the running maximum (:func:`randattn.decoding.merge_states`); it then runs its own block as a
  recurrence that starts from that prefix (:func:`randattn.decoding.rand_attention_step`);
- causal with a local window of ``w`` keys: rank ``r``'s first queries also weigh the ``w - 1`` latest
  keys of rank ``r - 1`` exactly, so each rank also sends those keys and values and the state of its
  block without them; rank ``r`` starts from a :class:`~randattn.decoding.WindowedDecodingState`
  (every block holds at least ``w - 1`` positions).

The communicated volume per layer is ``O(N H m d_v)`` (times ``P`` for the all-gather), independent
of the sequence length; see :func:`randattn.distributed.communication_bytes`. Gradients flow back
through the same collectives (the transposed communication), so outputs and gradients equal those of
one process holding the whole sequence.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import torch
import torch.distributed as dist

from ..decoding import CHUNK_SIZE, DecodingState, block_state, merge_states, rand_attention_step, window_state
from ..features import compute_dtype, relu_features, scale_inputs, softmax_logits
from ..functional import _check_qkv, check_kernel_fn, check_local_window, key_padding_bias
from ..ops.feature_maps import STABILISER_FLOOR, query_features
from .collectives import all_gather, all_reduce_max, all_reduce_sum

if TYPE_CHECKING:
    from ..modules import RandMultiHeadAttention

__all__ = ["context_parallel_attention", "context_parallel_self_attention", "exclusive_prefix_state"]


def _noncausal(q, k, v, projection, kernel_fn, key_bias, group):
    phi_q = query_features(q, projection, kernel_fn)
    y = scale_inputs(k)
    bias = 0.0 if key_bias is None else key_bias[:, None, :, None]
    if kernel_fn == "relu":
        phi_k = relu_features(y, projection)
        if key_bias is not None:
            phi_k = phi_k * torch.exp(bias)
    else:
        s = softmax_logits(y, projection) + bias
        # global key stabiliser over the kept keys (N, H)
        c = all_reduce_max(s.detach().amax(dim=(-2, -1)).clamp_min(STABILISER_FLOOR), group)
        phi_k = torch.exp(s - c[..., None, None])
    vf = v.to(phi_k.dtype)
    # one collective for both sums: (N, H, m, d_v + 1)
    local = torch.cat([phi_k.transpose(-2, -1) @ vf, phi_k.sum(-2).unsqueeze(-1)], dim=-1)
    total = all_reduce_sum(local, group)
    num = phi_q @ total[..., :-1]
    den = phi_q @ total[..., -1:]
    return (num / torch.where(den == 0, torch.ones_like(den), den)).to(q.dtype)


def exclusive_prefix_state(local: DecodingState, group: dist.ProcessGroup | None = None) -> DecodingState:
    """State of all positions held by the ranks before this one (an exclusive prefix scan).

    Args:
        local: this rank's block state (:func:`randattn.decoding.block_state`), ``(N, H, m, d_v)`` sums.
        group: process group (default: the world).

    Returns:
        :class:`~randattn.decoding.DecodingState` of ranks ``0 .. r-1`` (empty on rank 0), differentiable
        with respect to every rank's sums. Communicates one all-gather of ``P * N * H * (m (d_v + 1) + 1)``
        values.
    """
    return _prefix(_gathered_states(local, group), dist.get_rank(group))


def _gathered_states(local: DecodingState, group) -> list[DecodingState]:
    """Every rank's state, in rank order (one all-gather of the sums, differentiable, and one of the
    stabilisers and positions)."""
    packed = torch.cat([local.kv_sum, local.key_sum.unsqueeze(-1)], dim=-1)
    sums = all_gather(packed, group)  # (P, N, H, m, d_v + 1)
    # stabilisers and lengths carry no gradient
    meta = torch.cat(
        [local.stabiliser.detach().double().flatten(), packed.new_tensor([local.position], dtype=torch.float64)]
    )
    metas = all_gather(meta, group).detach()
    n, h = local.stabiliser.shape
    return [
        DecodingState(
            sums[source, ..., :-1],
            sums[source, ..., -1],
            metas[source, :-1].view(n, h).to(local.stabiliser.dtype),
            int(metas[source, -1].item()),
        )
        for source in range(sums.shape[0])
    ]


def _prefix(states: list[DecodingState], upto: int) -> DecodingState:
    """The states of ranks ``0 .. upto - 1`` merged in order.

    The empty start is built from ``states[upto]`` (the last state for ``upto = P``), times zero, so
    that every rank's output depends on the gathered tensors: backward then runs the collective on
    every rank, rank 0 included, and none waits forever."""
    like = states[min(upto, len(states) - 1)]
    prefix = DecodingState(like.kv_sum * 0.0, like.key_sum * 0.0, torch.full_like(like.stabiliser, float("-inf")), 0)
    for part in states[:upto]:
        prefix = merge_states(prefix, part)
    return prefix


def _windowed(q, k, v, projection, key_bias, group, chunk_size, window):
    """Causal softmax attention with a local window: rank ``r`` starts from the states of ranks
    ``< r - 1``, that of rank ``r - 1`` without its ``window - 1`` latest keys, and those keys."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    length, latest = k.shape[-2], window - 1
    lengths = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(lengths, torch.tensor([length]), group=group)
    if min(int(t.item()) for t in lengths) < latest:
        raise ValueError(
            f"q: with local_window={window} every rank must hold at least {latest} positions; "
            f"the ranks hold {[int(t.item()) for t in lengths]}"
        )
    split = length - latest
    bias = torch.zeros(k.shape[0], length, device=k.device) if key_bias is None else key_bias
    full = _gathered_states(block_state(k, v, projection, key_bias=key_bias), group)
    heads = _gathered_states(
        block_state(k[..., :split, :], v[..., :split, :], projection, key_bias=bias[:, :split]), group
    )
    dtype = compute_dtype(k.dtype)
    tails = all_gather(torch.cat([k[..., split:, :], v[..., split:, :]], dim=-1).to(dtype), group)
    tail_bias = all_gather(bias[:, split:].to(dtype).contiguous(), group).detach()
    if rank == 0:
        # no earlier keys; the zero start depends on every gathered tensor (see _prefix)
        older = _prefix(full, 0)
        older = older._replace(kv_sum=older.kv_sum + (heads[0].kv_sum * 0.0) + (tails[0] * 0.0).sum())
        state = window_state(older, k[..., :0, :], v[..., :0, :], projection, window)
    else:
        older = merge_states(_prefix(full, rank - 1), heads[rank - 1])
        d = k.shape[-1]
        prev = tails[rank - 1]
        state = window_state(older, prev[..., :d], prev[..., d:], projection, window, key_bias=tail_bias[rank - 1])
    out, _ = rand_attention_step(q, k, v, projection, state, key_bias=key_bias, chunk_size=chunk_size)
    return out


def _causal(q, k, v, projection, kernel_fn, key_bias, group, chunk_size):
    local = block_state(k, v, projection, kernel_fn=kernel_fn, key_bias=key_bias)
    prefix = exclusive_prefix_state(local, group)
    if kernel_fn == "relu":
        prefix = prefix._replace(stabiliser=torch.zeros_like(prefix.stabiliser))
    out, _ = rand_attention_step(
        q, k, v, projection, prefix, kernel_fn=kernel_fn, key_bias=key_bias, chunk_size=chunk_size
    )
    return out


def context_parallel_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    projection: torch.Tensor,
    *,
    kernel_fn: str = "softmax",
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    group: dist.ProcessGroup | None = None,
    chunk_size: int = CHUNK_SIZE,
    local_window: int | None = None,
) -> torch.Tensor:
    """Random-feature attention over a sequence sharded along its length across ``group``.

    Every rank calls it with its own consecutive block of the sequence (blocks in rank order; their
    lengths may differ). The result on each rank is that rank's block of
    ``rand_attention(q_full, k_full, v_full, projection, causal=causal)``, and backward gives each rank
    its block of the full gradients.

    Args:
        q, k: local blocks ``(N, H, L_r, d)``; v: ``(N, H, L_r, d_v)``. Self-attention layout: queries and
            keys share the positions.
        projection: ``(m, d)``, identical on every rank (see :func:`randattn.distributed.redraw_all`).
        kernel_fn: ``"softmax"`` or ``"relu"``.
        causal: each position attends to positions ``<=`` itself over the whole sharded sequence.
        key_padding_mask: local block ``(N, L_r)`` bool (``True`` ignores) or float additive, or ``None``.
        group: process group over which the sequence is sharded (default: the world).
        chunk_size: chunk of the causal local recurrence (rounding only).
        local_window: causal softmax only, as for :func:`randattn.functional.rand_attention`; every
            rank must then hold at least ``local_window - 1`` positions.

    Returns:
        ``(N, H, L_r, d_v)`` in ``q.dtype``.

    Communication per call (forward; backward the same again): non-causal one all-reduce MAX of
    ``N * H`` and one all-reduce SUM of ``N * H * m * (d_v + 1)`` float32; causal one all-gather of
    ``P * N * H * (m * (d_v + 1) + 1)`` float32. Nothing depends on ``L``. With a local window of
    ``w`` keys the causal case gathers a second set of states and ``P * N * H * (w - 1) * (d + d_v)``
    keys and values more.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("context_parallel_attention needs an initialised torch.distributed process group")
    check_kernel_fn(kernel_fn)
    check_local_window(local_window, causal, kernel_fn, "reference")
    _check_qkv(q, k, v, projection, causal=True)
    if q.shape[-2] == 0:
        raise ValueError("q: every rank must hold at least one position of the sequence")
    key_bias = key_padding_bias(key_padding_mask, k.shape[0], k.shape[-2])
    projection = projection.float()
    if local_window is not None:
        return _windowed(q, k, v, projection, key_bias, group, chunk_size, local_window)
    if causal:
        return _causal(q, k, v, projection, kernel_fn, key_bias, group, chunk_size)
    return _noncausal(q, k, v, projection, kernel_fn, key_bias, group)


def context_parallel_self_attention(
    layer: RandMultiHeadAttention,
    x: torch.Tensor,
    *,
    key_padding_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Self-attention of ``layer`` on this rank's block ``x`` of a sequence sharded across ``group``.

    Equivalent to this rank's block of ``layer(x_full, x_full, x_full, need_weights=False)[0]``; the
    parameters and projection of ``layer`` must be identical on every rank (as under DDP / FSDP2).

    Args:
        layer: a :class:`~randattn.RandMultiHeadAttention` with ``kdim == vdim == embed_dim`` and without
            ``add_bias_kv`` / ``add_zero_attn``.
        x: ``(N, L_r, E)`` if ``layer.batch_first`` else ``(L_r, N, E)``.
        key_padding_mask: this rank's ``(N, L_r)`` block of the mask, or ``None``.
        is_causal: attend causally (also when ``layer.causal``).
        group: process group over which the sequence is sharded (default: the world).

    Returns:
        ``(N, L_r, E)`` or ``(L_r, N, E)``, like ``x``. Dropout (training mode) is applied as in ``forward``.
    """
    from ..modules import RandMultiHeadAttention

    if not isinstance(layer, RandMultiHeadAttention):
        raise TypeError(f"layer must be a RandMultiHeadAttention, got {type(layer).__name__}")
    if layer.bias_k is not None or layer.add_zero_attn:
        raise ValueError("layer: context parallelism does not support add_bias_kv or add_zero_attn")
    if not layer._qkv_same_embed_dim:
        raise ValueError("layer: context-parallel self-attention needs kdim == vdim == embed_dim")
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != layer.embed_dim:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(
            f"x must be (N, L, {layer.embed_dim}) with batch_first else (L, N, {layer.embed_dim}); got {shape}"
        )
    if not layer.batch_first:
        x = x.transpose(0, 1)
    q, k, v = layer._self_attention_heads(x)
    out = context_parallel_attention(
        q,
        k,
        v,
        cast(torch.Tensor, layer.projection),
        kernel_fn=layer.kernel_fn,
        causal=layer.causal or is_causal,
        key_padding_mask=key_padding_mask,
        group=group,
        local_window=layer.local_window,
    )
    out = layer.out_proj(out.transpose(1, 2).flatten(2))
    return out if layer.batch_first else out.transpose(0, 1)
