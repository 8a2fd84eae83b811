"""Recurrent decoding: causal random-feature attention one token (or one chunk) at a time.

Causal random-feature attention is a recurrence. Per batch element and head it carries

- ``kv_sum``  ``S = sum_j phit_k[j] e^{c_j - c} v_j``   ``(m, d_v)``,
- ``key_sum`` ``z = sum_j phit_k[j] e^{c_j - c}``       ``(m,)``,
- ``stabiliser`` ``c``, the running maximum of the kept keys' logits (plus mask bias) seen so far,

where ``phit_k[j] = exp(s_k[j] - c_j)`` are the stabilised key features of
:func:`randattn.ops.feature_maps.causal_key_features`. A new query ``i`` reads
``out_i = phi_q[i] S e^{c - c_i} / (phi_q[i] . z e^{c - c_i})`` plus the part of the keys of its own
chunk, so the cost per token is ``O(m d)`` whatever the position, and the outputs are those of the
parallel causal forward at every position.

The same state algebra (:func:`block_state`, :func:`merge_states`) combines the states of blocks of
a sequence held by different devices; see :mod:`randattn.distributed`.

A layer with a local window (``local_window = w``) weighs each query's ``w`` latest keys exactly: its
:class:`WindowedDecodingState` holds the state of every key at least ``w - 1`` positions back and the
keys, values and features of the ``w - 1`` latest positions, which a new query weighs pair by pair
(:func:`randattn.ops.causal.reference.window_scores`). The cost per token is ``O((w + m) d)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple, cast

import torch

from .features import compute_dtype, relu_features, scale_inputs, softmax_logits
from .functional import check_kernel_fn, check_local_window, rand_attention
from .ops.causal.reference import _carry, _from_state, window_scores
from .ops.feature_maps import STABILISER_FLOOR, query_features, safe_divide, softmax_query_features

if TYPE_CHECKING:
    from .charlm import CausalTransformer
    from .modules import RandMultiHeadAttention

__all__ = [
    "CHUNK_SIZE",
    "DecodingState",
    "WindowedDecodingState",
    "block_state",
    "empty_state",
    "empty_window_state",
    "window_state",
    "generate",
    "init_model_states",
    "init_state",
    "merge_states",
    "model_step",
    "rand_attention_step",
    "step",
]

#: Positions per chunk of :func:`rand_attention_step`: bounds its ``(T, T)`` intra-chunk scores.
CHUNK_SIZE = 128


class DecodingState(NamedTuple):
    """Carried state of causal random-feature attention (one layer).

    Fields: ``kv_sum (N, H, m, d_v)``, ``key_sum (N, H, m)``, ``stabiliser (N, H)`` and ``position``
    (see each field). The tensors are float32 (float64 for float64 layers, or the dtype given to
    :func:`init_state`) whatever the model dtype. A ``NamedTuple`` of tensors, so it can be returned
    from ``torch.compile``-d functions and moved with
    ``DecodingState(*(t.to(device) for t in state[:3]), state.position)``.
    """

    kv_sum: torch.Tensor
    key_sum: torch.Tensor
    stabiliser: torch.Tensor
    position: int


DecodingState.kv_sum.__doc__ = "``(N, H, m, d_v)`` sum of key features times values, at the scale ``stabiliser``."
DecodingState.key_sum.__doc__ = "``(N, H, m)`` sum of key features, at the scale ``stabiliser``."
DecodingState.stabiliser.__doc__ = (
    "``(N, H)`` running maximum ``c`` of the key logits so far (``-inf`` before the first key for the "
    "softmax kernel; ``0`` for the relu kernel)."
)
DecodingState.position.__doc__ = "Number of positions consumed so far (``int``)."


def empty_state(
    batch_size: int,
    num_heads: int,
    num_features: int,
    value_dim: int,
    *,
    kernel_fn: str = "softmax",
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> DecodingState:
    """The state before any token: zero sums and an empty stabiliser.

    Args:
        batch_size, num_heads, num_features, value_dim: ``N``, ``H``, ``m``, ``d_v``.
        kernel_fn: ``"softmax"`` (stabiliser ``-inf``) or ``"relu"`` (stabiliser ``0``).
        device, dtype: of the state tensors (float32 by default).

    Returns:
        :class:`DecodingState` with ``kv_sum (N, H, m, d_v)``, ``key_sum (N, H, m)``,
        ``stabiliser (N, H)`` and ``position == 0``.
    """
    check_kernel_fn(kernel_fn)
    for name, value in (
        ("batch_size", batch_size),
        ("num_heads", num_heads),
        ("num_features", num_features),
        ("value_dim", value_dim),
    ):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating dtype, got {dtype}")
    fill = float("-inf") if kernel_fn == "softmax" else 0.0
    return DecodingState(
        torch.zeros(batch_size, num_heads, num_features, value_dim, device=device, dtype=dtype),
        torch.zeros(batch_size, num_heads, num_features, device=device, dtype=dtype),
        torch.full((batch_size, num_heads), fill, device=device, dtype=dtype),
        0,
    )


class WindowedDecodingState(NamedTuple):
    """Carried state of causal softmax attention with a local window of ``window`` keys (one layer).

    ``older`` summarises every key that no later query weighs exactly (at least ``window - 1``
    positions before the next one); the other fields hold the ``P <= window - 1`` latest positions,
    which later queries weigh pair by pair. Float32 (or the dtype given to :func:`empty_window_state`).
    """

    older: DecodingState
    keys: torch.Tensor
    values: torch.Tensor
    features: torch.Tensor
    scales: torch.Tensor
    bias: torch.Tensor
    window: int

    @property
    def position(self) -> int:
        """Number of positions consumed so far (``int``)."""
        return self.older.position + self.keys.shape[-2]


WindowedDecodingState.older.__doc__ = ":class:`DecodingState` of the keys before the latest ``P`` positions."
WindowedDecodingState.keys.__doc__ = "``(N, H, P, d)`` keys of the latest positions (as projected)."
WindowedDecodingState.values.__doc__ = "``(N, H, P, d_v)`` their values."
WindowedDecodingState.features.__doc__ = "``(N, H, P, m)`` their stabilised features ``exp(s_k[j] + b_j - c_j)``."
WindowedDecodingState.scales.__doc__ = "``(N, H, P)`` the running maximum ``c_j`` at each of them."
WindowedDecodingState.bias.__doc__ = "``(N, P)`` their additive key bias (``-inf``: dropped)."
WindowedDecodingState.window.__doc__ = "Keys weighed exactly per query, the query's own included (``int >= 1``)."


def empty_window_state(
    batch_size: int,
    num_heads: int,
    num_features: int,
    head_dim: int,
    value_dim: int,
    window: int,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> WindowedDecodingState:
    """The state before any token of a softmax layer with a local window.

    Args:
        batch_size, num_heads, num_features, head_dim, value_dim: ``N``, ``H``, ``m``, ``d``, ``d_v``.
        window: the layer's ``local_window`` (``int >= 1``).
        device, dtype: of the state tensors (float32 by default).

    Returns:
        :class:`WindowedDecodingState` with an empty :func:`empty_state` and no latest positions.
    """
    check_local_window(window, True, "softmax", "reference")
    older = empty_state(batch_size, num_heads, num_features, value_dim, device=device, dtype=dtype)
    n, h = batch_size, num_heads
    return WindowedDecodingState(
        older,
        torch.zeros(n, h, 0, head_dim, device=device, dtype=dtype),
        torch.zeros(n, h, 0, value_dim, device=device, dtype=dtype),
        torch.zeros(n, h, 0, num_features, device=device, dtype=dtype),
        torch.zeros(n, h, 0, device=device, dtype=dtype),
        torch.zeros(n, 0, device=device, dtype=dtype),
        window,
    )


def _decay(c_from: torch.Tensor, c_to: torch.Tensor) -> torch.Tensor:
    """``exp(c_from - c_to)`` with an empty ``c_from == -inf`` giving 0 (``c_to >= c_from``)."""
    return torch.where(c_from == float("-inf"), torch.zeros_like(c_from), torch.exp(c_from - c_to))


def _key_logits(k: torch.Tensor, projection: torch.Tensor, kernel_fn: str):
    """Key features before stabilising: softmax logits ``s_k`` or relu features, ``(N, H, T, m)``."""
    y = scale_inputs(k)
    if kernel_fn == "relu":
        return relu_features(y, projection)
    return softmax_logits(y, projection)


def _check_state(state: DecodingState, n: int, h: int, m: int, dv: int) -> None:
    if not isinstance(state, DecodingState):
        raise TypeError(f"state must be a DecodingState, got {type(state).__name__}")
    expected = ((n, h, m, dv), (n, h, m), (n, h))
    for name, t, shape in zip(("kv_sum", "key_sum", "stabiliser"), state[:3], expected):
        if tuple(t.shape) != shape:
            raise ValueError(f"state.{name} must have shape {shape}, got {tuple(t.shape)}")


def rand_attention_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    projection: torch.Tensor,
    state: DecodingState | WindowedDecodingState,
    *,
    kernel_fn: str = "softmax",
    key_bias: torch.Tensor | None = None,
    chunk_size: int = CHUNK_SIZE,
) -> tuple[torch.Tensor, Any]:
    """Causal random-feature attention of ``T`` new positions that follow ``state``.

    Position ``i`` of the new block attends to every key already summarised in ``state`` and to the
    new keys at positions ``<= i``, exactly as :func:`randattn.functional.rand_attention` with
    ``causal=True`` over the whole sequence (with ``local_window=state.window`` for a
    :class:`WindowedDecodingState`).

    Args:
        q, k: ``(N, H, T, d)``; v: ``(N, H, T, d_v)`` (the projected, head-split new positions).
        projection: ``(m, d)``.
        state: :class:`DecodingState` (or :class:`WindowedDecodingState`, softmax only) of the
            positions before the block.
        kernel_fn: ``"softmax"`` or ``"relu"``.
        key_bias: ``(N, T)`` float additive key bias (``-inf`` drops a key) or ``None``.
        chunk_size: the block is processed in chunks of this many positions (bounds the
            ``(chunk, chunk)`` intra-chunk scores; changes rounding only).

    Returns:
        ``(out, new_state)``: ``out (N, H, T, d_v)`` in ``q.dtype`` and the state after the block, of
        the type of ``state`` (``position`` advanced by ``T``). Differentiable with respect to ``q``,
        ``k``, ``v`` and the state's sums.
    """
    check_kernel_fn(kernel_fn)
    if q.dim() != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"q, k must be (N, H, T, d) and v (N, H, T, d_v) of one (N, H, T); got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if projection.dim() != 2 or projection.shape[1] != q.shape[-1]:
        raise ValueError(f"projection must have shape (m, {q.shape[-1]}), got {tuple(projection.shape)}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    n, h, length, _ = q.shape
    if isinstance(state, WindowedDecodingState):
        if kernel_fn != "softmax":
            raise ValueError(f"kernel_fn: a WindowedDecodingState needs 'softmax', got {kernel_fn!r}")
        return _window_step(q, k, v, projection.float(), state, key_bias, chunk_size)
    _check_state(state, n, h, projection.shape[0], v.shape[-1])
    projection = projection.float()
    dtype = state.kv_sum.dtype
    phi_q = query_features(q, projection, kernel_fn).to(dtype)
    logits = _key_logits(k, projection, kernel_fn).to(dtype)
    vf = v.to(dtype)
    bias = 0.0 if key_bias is None else key_bias.to(dtype)[:, None, :, None]
    kv_sum, key_sum, c_state = state.kv_sum, state.key_sum.unsqueeze(-1), state.stabiliser.unsqueeze(-1)
    if kernel_fn == "softmax":
        # running max over positions <= j, continuing from the state's stabiliser
        # kept keys only set the scale (logit plus bias; STABILISER_FLOOR before the first kept key)
        biased = logits + bias
        row_max = biased.amax(-1).detach().clamp_min(STABILISER_FLOOR)
        c = torch.cummax(torch.maximum(row_max, c_state), dim=-1).values  # (N, H, T)
        phi_k = torch.exp(biased - c.unsqueeze(-1))
    else:
        c = logits.new_zeros(logits.shape[:-1])
        phi_k = logits if key_bias is None else logits * torch.exp(key_bias.to(dtype)[:, None, :, None])
    outs = []
    for start in range(0, length, chunk_size):
        stop = min(start + chunk_size, length)
        pq, pk, vc, cc = (
            phi_q[..., start:stop, :],
            phi_k[..., start:stop, :],
            vf[..., start:stop, :],
            c[..., start:stop],
        )
        # the keys of the state, rescaled to each query's stabiliser (exponent <= 0; exp(-inf) = 0 for an
        # empty state, as every c here is finite)
        to_query = torch.exp(c_state - cc).unsqueeze(-1)  # (N, H, C, 1)
        num = (pq @ kv_sum) * to_query
        den = (pq @ key_sum) * to_query
        c_new = cc[..., -1:]
        if stop - start == 1:  # one position: its own key only, no mask, no rescaling within the chunk
            scores = (pq * pk).sum(-1, keepdim=True)
            num = num + scores * vc
            den = den + scores
            pk_state, decay = pk, to_query
        else:
            keep = torch.ones(stop - start, stop - start, dtype=torch.bool, device=pq.device).tril()
            rel = torch.where(keep, cc.unsqueeze(-2) - cc.unsqueeze(-1), float("-inf"))
            scores = (pq @ pk.transpose(-2, -1)) * torch.exp(rel)
            num = num + scores @ vc
            den = den + scores.sum(-1, keepdim=True)
            pk_state = pk * torch.exp(cc - c_new).unsqueeze(-1)
            decay = torch.exp(c_state - c_new).unsqueeze(-1)
        outs.append(num / torch.where(den == 0, torch.ones_like(den), den))
        # carry the state to the scale of the chunk's last position
        kv_sum = kv_sum * decay + pk_state.transpose(-2, -1) @ vc
        key_sum = key_sum * decay + pk_state.sum(-2).unsqueeze(-1)
        c_state = c_new
    out = (torch.cat(outs, dim=-2) if len(outs) > 1 else outs[0]) if outs else vf.new_zeros(vf.shape)
    new_state = DecodingState(kv_sum, key_sum.squeeze(-1), c_state.squeeze(-1), state.position + length)
    return out.to(q.dtype), new_state


def _check_window_state(state: WindowedDecodingState, n: int, h: int, m: int, d: int, dv: int) -> None:
    _check_state(state.older, n, h, m, dv)
    latest = state.keys.shape[-2]
    expected = ((n, h, latest, d), (n, h, latest, dv), (n, h, latest, m), (n, h, latest), (n, latest))
    for name, shape in zip(("keys", "values", "features", "scales", "bias"), expected):
        if tuple(getattr(state, name).shape) != shape:
            raise ValueError(f"state.{name} must have shape {shape}, got {tuple(getattr(state, name).shape)}")
    if latest >= state.window:
        raise ValueError(
            f"state holds {latest} latest positions; a window of {state.window} keeps at most {state.window - 1}"
        )


def _new_keys(before: torch.Tensor, k, projection, key_bias):
    """New keys ``k`` ``(N, H, T, d)``: their bias ``(N, T)``, stabilised features ``(N, H, T, m)``
    and running maxima ``(N, H, T)``, which continue from the running maximum ``before`` ``(N, H, 1)``
    of the positions before them, in the dtype of ``before``."""
    dtype = before.dtype
    n, _, length, _ = k.shape
    bias = torch.zeros(n, length, dtype=dtype, device=k.device) if key_bias is None else key_bias.to(dtype)
    biased = softmax_logits(scale_inputs(k).to(dtype), projection.to(dtype)) + bias[:, None, :, None]
    row_max = biased.amax(-1).detach().clamp_min(STABILISER_FLOOR)
    c = torch.cummax(torch.maximum(row_max, before), dim=-1).values
    return bias, torch.exp(biased - c.unsqueeze(-1)), c


def window_state(
    older: DecodingState,
    k: torch.Tensor,
    v: torch.Tensor,
    projection: torch.Tensor,
    window: int,
    *,
    key_bias: torch.Tensor | None = None,
) -> WindowedDecodingState:
    """The windowed state of the keys summarised in ``older`` followed by the latest keys ``k``, ``v``.

    Args:
        older: :class:`DecodingState` (softmax) of every earlier key, e.g. from :func:`block_state`.
        k: ``(N, H, P, d)``; v: ``(N, H, P, d_v)`` with ``P <= window - 1``: the keys that later
            queries weigh exactly.
        projection: ``(m, d)``.
        window: the layer's ``local_window``.
        key_bias: ``(N, P)`` float additive key bias or ``None``.

    Returns:
        :class:`WindowedDecodingState` at position ``older.position + P``.
    """
    check_local_window(window, True, "softmax", "reference")
    if k.shape[-2] >= window:
        raise ValueError(f"k: a window of {window} keeps at most {window - 1} latest positions, got {k.shape[-2]}")
    dtype = older.kv_sum.dtype
    bias, features, scales = _new_keys(older.stabiliser.unsqueeze(-1), k, projection.float(), key_bias)
    return WindowedDecodingState(older, k.to(dtype), v.to(dtype), features, scales, bias, window)


def _window_step(q, k, v, projection, state: WindowedDecodingState, key_bias, chunk_size):
    """:func:`rand_attention_step` with a local window: the new positions in chunks of at least
    ``window`` queries, each weighing the latest positions and its own pair by pair
    (:func:`~randattn.ops.causal.reference.window_scores`) and the older keys through the state; keys
    move into the state once no later query weighs them exactly."""
    n, h, length, d = q.shape
    window, older = state.window, state.older
    _check_window_state(state, n, h, projection.shape[0], d, v.shape[-1])
    dtype = older.kv_sum.dtype
    phi_q, a = (t.to(dtype) for t in softmax_query_features(q, projection))
    x = scale_inputs(q).to(dtype)
    # the running maximum continues from the latest position's (the older keys' before any latest one)
    before = state.scales[..., -1:] if state.keys.shape[-2] else older.stabiliser.unsqueeze(-1)
    bias_new, phi_new, c_new = _new_keys(before, k, projection, key_bias)
    # the latest positions and the new ones, in order ("ext"); ext index = latest + new index
    latest = state.keys.shape[-2]
    y = scale_inputs(torch.cat([state.keys, k.to(dtype)], dim=-2))
    vals = torch.cat([state.values, v.to(dtype)], dim=-2)
    phi_k = torch.cat([state.features, phi_new], dim=-2)
    c = torch.cat([state.scales, c_new], dim=-1)
    bias = torch.cat([state.bias, bias_new], dim=-1)
    kv_sum, key_sum, c_state = older.kv_sum, older.key_sum.unsqueeze(-1), older.stabiliser.unsqueeze(-1)
    folded = 0

    def fold(upto):
        """Carry the ext positions ``folded .. upto`` into the state."""
        nonlocal kv_sum, key_sum, c_state, folded
        if upto > folded:
            part = slice(folded, upto)
            kv_sum, key_sum, c_state = _carry(
                kv_sum, key_sum, c_state, phi_k[..., part, :], vals[..., part, :], c[..., part]
            )
            folded = upto

    size = max(chunk_size, window)
    outs = []
    for start in range(0, length, size):
        stop = min(start + size, length)
        # keys at least `window` before the chunk's first query are only ever estimated
        fold(max(0, latest + start - (window - 1)))
        rows, cols = slice(start, stop), slice(folded, latest + stop)
        cc = c_new[..., rows]
        num, den = _from_state(phi_q[..., rows, :], cc, kv_sum, key_sum, c_state)
        positions = torch.arange(latest + start, latest + stop, device=q.device)
        gap = positions[:, None] - torch.arange(folded, latest + stop, device=q.device)[None, :]
        scores = window_scores(
            x[..., rows, :],
            y[..., cols, :],
            phi_q[..., rows, :],
            phi_k[..., cols, :],
            a[..., rows],
            cc,
            c[..., cols],
            bias[:, None, cols],
            gap,
            window,
        )
        num = num + scores @ vals[..., cols, :]
        den = den + scores.sum(-1, keepdim=True)
        outs.append(safe_divide(num, den))
    fold(max(0, latest + length - (window - 1)))
    keep = slice(folded, latest + length)
    new_older = DecodingState(kv_sum, key_sum.squeeze(-1), c_state.squeeze(-1), older.position + folded)
    keys = torch.cat([state.keys, k.to(dtype)], dim=-2)[..., keep, :]
    new_state = WindowedDecodingState(
        new_older, keys, vals[..., keep, :], phi_k[..., keep, :], c[..., keep], bias[:, keep], window
    )
    out = torch.cat(outs, dim=-2) if outs else vals.new_zeros(n, h, 0, v.shape[-1])
    return out.to(q.dtype), new_state


def block_state(
    k: torch.Tensor,
    v: torch.Tensor,
    projection: torch.Tensor,
    *,
    kernel_fn: str = "softmax",
    key_bias: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> DecodingState:
    """The state summarising a block of keys on its own (as if it started the sequence).

    Cheaper than :func:`rand_attention_step` when only the state is needed: one ``(m, d_v)`` product
    per head, stabilised by the block's maximum logit.

    Args:
        k: ``(N, H, T, d)``; v: ``(N, H, T, d_v)``; projection: ``(m, d)``.
        kernel_fn: ``"softmax"`` or ``"relu"``.
        key_bias: ``(N, T)`` float additive key bias or ``None``.
        dtype: dtype of the state (default: float32, float64 for float64 keys).

    Returns:
        :class:`DecodingState` with ``position == T``; equal (up to rounding) to the state returned by
        :func:`rand_attention_step` from :func:`empty_state` on the same keys.
    """
    check_kernel_fn(kernel_fn)
    dtype = compute_dtype(k.dtype) if dtype is None else dtype
    logits = _key_logits(k, projection.float(), kernel_fn).to(dtype)
    bias = 0.0 if key_bias is None else key_bias.to(dtype)[:, None, :, None]
    if kernel_fn == "softmax":
        if logits.shape[-2] == 0:
            c = logits.new_full(logits.shape[:2], float("-inf"))
            phi_k = logits
        else:
            biased = logits + bias
            c = biased.detach().amax(dim=(-2, -1)).clamp_min(STABILISER_FLOOR)
            phi_k = torch.exp(biased - c[..., None, None])
    else:
        c = logits.new_zeros(logits.shape[:2])
        phi_k = logits if key_bias is None else logits * torch.exp(key_bias.to(dtype)[:, None, :, None])
    return DecodingState(phi_k.transpose(-2, -1) @ v.to(dtype), phi_k.sum(-2), c, k.shape[-2])


def merge_states(first: DecodingState, second: DecodingState) -> DecodingState:
    """State of the concatenation of two consecutive blocks (``first`` before ``second``).

    Rescales both to the larger stabiliser; associative, so any prefix of a sequence of block states
    can be folded in any grouping.

    Args:
        first, second: :class:`DecodingState` of the same ``(N, H, m, d_v)``.

    Returns:
        :class:`DecodingState` with ``position = first.position + second.position``.
    """
    c = torch.maximum(first.stabiliser, second.stabiliser)
    a = _decay(first.stabiliser, c)
    b = _decay(second.stabiliser, c)
    return DecodingState(
        first.kv_sum * a[..., None, None] + second.kv_sum * b[..., None, None],
        first.key_sum * a[..., None] + second.key_sum * b[..., None],
        c,
        first.position + second.position,
    )


# ------------------------------------------------------------------------------------- module level
def check_decodable(layer: RandMultiHeadAttention) -> None:
    """Raise unless ``layer`` is a causal self-attention :class:`~randattn.RandMultiHeadAttention`.

    Raises:
        TypeError: ``layer`` is not a ``RandMultiHeadAttention``.
        ValueError: the layer is not causal, or has ``add_bias_kv`` / ``add_zero_attn`` (extra keys at the
            end of the sequence have no place in a causal recurrence), or different key/value dims.
    """
    from .modules import RandMultiHeadAttention

    if not isinstance(layer, RandMultiHeadAttention):
        raise TypeError(f"layer must be a RandMultiHeadAttention, got {type(layer).__name__}")
    if not layer.causal:
        raise ValueError(
            "layer: recurrent decoding needs a causal layer (built with causal=True); "
            "a non-causal layer lets every position see later tokens"
        )
    if layer.bias_k is not None or layer.add_zero_attn:
        raise ValueError("layer: recurrent decoding does not support add_bias_kv or add_zero_attn")
    if not layer._qkv_same_embed_dim:
        raise ValueError("layer: recurrent decoding is self-attention; kdim and vdim must equal embed_dim")


def init_state(
    layer: RandMultiHeadAttention,
    batch_size: int,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> DecodingState | WindowedDecodingState:
    """Empty decoding state of a causal :class:`~randattn.RandMultiHeadAttention`.

    Args:
        layer: causal layer without ``add_bias_kv`` / ``add_zero_attn``.
        batch_size: ``N``.
        device: defaults to the device of the layer's projection.
        dtype: of the state; defaults to float32 (also for half-precision layers), float64 for a float64 layer.

    Returns:
        :class:`DecodingState` with ``kv_sum (N, H, m, d)``, ``key_sum (N, H, m)``, ``stabiliser (N, H)``;
        for a layer with a ``local_window``, a :class:`WindowedDecodingState` around one.
    """
    check_decodable(layer)
    device = cast(torch.Tensor, layer.projection).device if device is None else device
    dtype = compute_dtype(layer.out_proj.weight.dtype) if dtype is None else dtype
    if layer.local_window is not None:
        return empty_window_state(
            batch_size,
            layer.num_heads,
            layer.num_random_features,
            layer.head_dim,
            layer.head_dim,
            layer.local_window,
            device=device,
            dtype=dtype,
        )
    return empty_state(
        batch_size,
        layer.num_heads,
        layer.num_random_features,
        layer.head_dim,
        kernel_fn=layer.kernel_fn,
        device=device,
        dtype=dtype,
    )


def step(layer: RandMultiHeadAttention, x: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
    """Run causal self-attention of ``layer`` on the next token(s) ``x``, continuing from ``state``.

    Feeding a sequence through ``step`` in pieces of any sizes gives the same outputs as
    ``layer(seq, seq, seq, need_weights=False)[0]`` on the whole sequence at once.

    Args:
        layer: causal :class:`~randattn.RandMultiHeadAttention` (see :func:`check_decodable`).
        x: ``(N, T, E)`` if ``layer.batch_first`` else ``(T, N, E)``: one token (``T = 1``) or a chunk.
        state: from :func:`init_state` or a previous :func:`step` (a :class:`DecodingState`, or a
            :class:`WindowedDecodingState` for a layer with a ``local_window``).

    Returns:
        ``(out, new_state)`` with ``out`` in the layout and dtype of ``x``. Dropout is applied as in
        ``forward`` when the layer is in training mode.
    """
    check_decodable(layer)
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be 3-D, (N, T, E) with batch_first else (T, N, E); got {shape}")
    if x.shape[-1] != layer.embed_dim:
        raise ValueError(f"x must have last dimension embed_dim={layer.embed_dim}, got shape {tuple(x.shape)}")
    if not layer.batch_first:
        x = x.transpose(0, 1)
    q, k, v = layer._self_attention_heads(x)
    projection = cast(torch.Tensor, layer.projection)
    if state.position == 0 and q.shape[2] > 1:
        # A prompt on an empty state: the parallel causal forward (the fused kernels on a GPU) gives the
        # outputs, and the block's state has the stabiliser of its last position, the block maximum.
        window = state.window if isinstance(state, WindowedDecodingState) else None
        older = state if window is None else state.older
        _check_state(older, q.shape[0], q.shape[1], projection.shape[0], v.shape[-1])
        out = rand_attention(
            q, k, v, projection, kernel_fn=layer.kernel_fn, causal=True, backend=layer.backend, local_window=window
        )
        if window is None:
            state = block_state(k, v, projection, kernel_fn=layer.kernel_fn, dtype=older.kv_sum.dtype)
        else:  # the keys before the latest window - 1 summarised at once, those kept beside them
            split = max(0, q.shape[2] - (window - 1))
            older = block_state(k[..., :split, :], v[..., :split, :], projection, dtype=older.kv_sum.dtype)
            state = window_state(older, k[..., split:, :], v[..., split:, :], projection, window)
    else:
        out, state = rand_attention_step(q, k, v, projection, state, kernel_fn=layer.kernel_fn)
    out = layer.out_proj(out.transpose(1, 2).flatten(2))
    if not layer.batch_first:
        out = out.transpose(0, 1)
    return out, state


# --------------------------------------------------------------------- language models of randattn.charlm
def init_model_states(model: CausalTransformer, batch_size: int) -> list[Any]:
    """One empty :class:`DecodingState` per attention layer of a :class:`randattn.charlm.CausalTransformer`.

    Args:
        model: a character model with random-feature attention (``attention.kind`` ``"softmax"`` or ``"relu"``).
        batch_size: ``N``.
    """
    return [init_state(cast("RandMultiHeadAttention", layer), batch_size) for layer in model.attention_layers()]


def model_step(model: CausalTransformer, tokens: torch.Tensor, states: list[Any]) -> tuple[torch.Tensor, list[Any]]:
    """Next-token logits of a :class:`randattn.charlm.CausalTransformer` for new tokens, recurrently.

    Runs the model's blocks on ``tokens`` only, continuing from ``states`` (one per layer), so the cost
    per token does not grow with the number of tokens already consumed.

    Args:
        model: character model with random-feature attention.
        tokens: ``(N, T)`` int64 ids of the next ``T`` positions.
        states: from :func:`init_model_states` or a previous call.

    Returns:
        ``(logits (N, T, vocab), new_states)``; ``logits`` equal ``model(all_tokens)[:, -T:]``.

    Raises:
        ValueError: the positions would pass the model's learned context ``model.context``.
    """
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be (N, T), got shape {tuple(tokens.shape)}")
    start = states[0].position
    if start + tokens.shape[1] > model.context:
        raise ValueError(
            f"tokens: positions up to {start + tokens.shape[1]} pass the model's context {model.context} "
            "(its learned position embedding has no entry beyond it)"
        )
    pos = torch.arange(start, start + tokens.shape[1], device=tokens.device)
    x = model.tok(tokens) + model.pos(pos)
    new_states = []
    for block_module, state in zip(model.blocks, states):
        block: Any = block_module
        a, state = step(block.attn, block.ln1(x), state)
        new_states.append(state)
        x = x + block.drop(a)
        x = x + block.drop(block.mlp(block.ln2(x)))
    return model.ln_f(x) @ model.tok.weight.T, new_states


@torch.no_grad()
def generate(
    model: CausalTransformer,
    prompt: torch.Tensor,
    num_tokens: int,
    *,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Sample ``num_tokens`` ids after ``prompt`` from a character model, one token per :func:`model_step`.

    The prompt is consumed in one chunk, then every new token costs one recurrent step.

    Args:
        model: :class:`randattn.charlm.CausalTransformer` with random-feature attention.
        prompt: ``(N, P)`` int64 ids (``P >= 1``).
        num_tokens: how many ids to sample.
        temperature: softmax temperature (``0`` picks the most likely id).
        generator: for the sampling.

    Returns:
        ``(N, num_tokens)`` int64 sampled ids.
    """
    if prompt.dim() != 2 or prompt.shape[1] < 1:
        raise ValueError(f"prompt must be (N, P) with P >= 1, got shape {tuple(prompt.shape)}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    model.eval()
    states = init_model_states(model, prompt.shape[0])
    logits, states = model_step(model, prompt, states)
    out = []
    for i in range(num_tokens):
        last = logits[:, -1].float()
        if temperature == 0:
            ids = last.argmax(-1, keepdim=True)
        else:
            probs = torch.softmax(last / temperature, dim=-1)
            ids = torch.multinomial(probs.cpu(), 1, generator=generator).to(prompt.device)
        out.append(ids)
        if i + 1 < num_tokens:
            logits, states = model_step(model, ids, states)
    return torch.cat(out, dim=1) if out else prompt.new_zeros(prompt.shape[0], 0)
