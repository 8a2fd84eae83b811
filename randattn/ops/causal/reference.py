"""Causal random-feature attention in plain PyTorch as a chunked scan.

Each chunk of ``C`` positions adds a chunk-local quadratic part to the contribution of the carried
``(m, d_v)`` state of all earlier chunks; no ``(N, H, L, m, d)`` tensor is formed. The stabiliser of
position ``i`` is the running maximum over keys ``<= i``, so the output at ``i`` never depends on
later tokens, and equals the non-causal result on the prefix ``[0, i]``.
"""

from __future__ import annotations

import torch

from ...features import scale_inputs
from ..feature_maps import causal_key_features, query_features, safe_divide, softmax_query_features

#: Positions per chunk of the reference scan.
CHUNK_SIZE = 128


def estimated_scores(
    phi_q: torch.Tensor, phi_k: torch.Tensor, c_q: torch.Tensor, c_k: torch.Tensor, keep: torch.Tensor
) -> torch.Tensor:
    """``phi_q[i] . phi_k[j] exp(c_j - c_i)`` where ``keep`` ``(R, K)``, else 0: the estimated causal
    weights at each query's scale (features ``(N, H, R|K, m)``, key running maxima ``c_q`` ``(N, H, R)``
    at the queries and ``c_k`` ``(N, H, K)`` at the keys)."""
    rel = torch.where(keep, c_k.unsqueeze(-2) - c_q.unsqueeze(-1), float("-inf"))
    return (phi_q @ phi_k.transpose(-2, -1)) * torch.exp(rel)


def _from_state(pq, cc, state, key_sum, c_state):
    """Numerators and denominators of queries ``pq`` (running maxima ``cc``) from the carried state,
    rescaled from its scale ``c_state`` to each query's (exponent <= 0)."""
    to_query = torch.exp(c_state - cc).unsqueeze(-1)  # (N, H, C, 1)
    return (pq @ state) * to_query, (pq @ key_sum) * to_query


def _carry(state, key_sum, c_state, pk, vk, ck):
    """The state with keys ``pk`` (values ``vk``, running maxima ``ck``) added, at the scale of the
    last of them; returns ``(state, key_sum, c_state)``."""
    c_new = ck[..., -1:]
    to_state = torch.exp(ck - c_new).unsqueeze(-1)  # (N, H, C, 1)
    decay = torch.exp(c_state - c_new).unsqueeze(-1)
    state = state * decay + (pk * to_state).transpose(-2, -1) @ vk
    key_sum = key_sum * decay + (pk * to_state).sum(-2).unsqueeze(-1)
    return state, key_sum, c_new


def causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    projection: torch.Tensor,
    kernel_fn: str,
    key_bias: torch.Tensor | None,
    chunk_size: int = CHUNK_SIZE,
) -> torch.Tensor:
    """Random-feature attention of each query over the keys at its position and before.

    Args:
        q, k: ``(N, H, L, d)``; v: ``(N, H, L, d_v)``.
        projection: ``(m, d)`` float32.
        kernel_fn: ``"softmax"`` or ``"relu"``.
        key_bias: ``(N, L)`` float32 additive key bias or ``None``.
        chunk_size: positions per chunk (changes rounding only).

    Returns:
        ``(N, H, L, d_v)`` in ``q.dtype``.
    """
    phi_q = query_features(q, projection, kernel_fn)
    phi_k, c = causal_key_features(k, projection, kernel_fn, key_bias)
    vf = v.to(phi_q.dtype)
    n, h, length, m = phi_q.shape
    state = vf.new_zeros(n, h, m, vf.shape[-1])
    key_sum = vf.new_zeros(n, h, m, 1)
    c_state = c[..., :1]  # scale of the (still empty) state
    outs = []
    for start in range(0, length, chunk_size):
        stop = min(start + chunk_size, length)
        pq, pk, vc, cc = (
            phi_q[..., start:stop, :],
            phi_k[..., start:stop, :],
            vf[..., start:stop, :],
            c[..., start:stop],
        )
        size = stop - start
        # inter-chunk part, from the state
        num, den = _from_state(pq, cc, state, key_sum, c_state)
        # intra-chunk part: A[i, j] = phi_q[i] . phi_k[j] * exp(c_j - c_i) for j <= i
        keep = torch.ones(size, size, dtype=torch.bool, device=pq.device).tril()
        scores = estimated_scores(pq, pk, cc, cc, keep)
        num = num + scores @ vc
        den = den + scores.sum(-1, keepdim=True)
        outs.append(safe_divide(num, den))
        # carry the state to the scale of the chunk's last position
        state, key_sum, c_state = _carry(state, key_sum, c_state, pk, vc, cc)
    return torch.cat(outs, dim=-2).to(q.dtype)


def window_scores(
    x: torch.Tensor,
    y: torch.Tensor,
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    a: torch.Tensor,
    c_q: torch.Tensor,
    c_k: torch.Tensor,
    bias: torch.Tensor | None,
    gap: torch.Tensor,
    window: int,
) -> torch.Tensor:
    """Unnormalised causal weights of queries against keys at each query's scale ``m exp(-a_i - c_i)``:
    ``exp(x_i . y_j + b_j)`` where ``0 <= gap < window``, the FAVOR+ estimate
    ``phi_q[i] . phi_k[j] exp(c_j - c_i)`` where ``gap >= window``, 0 where ``gap < 0``.

    Args:
        x ``(N, H, R, d)``, y ``(N, H, K, d)``: scaled queries and keys (:func:`~randattn.features.scale_inputs`).
        phi_q ``(N, H, R, m)``, phi_k ``(N, H, K, m)``: stabilised features (query row scale ``a``
            ``(N, H, R)``; key running maxima ``c_q`` ``(N, H, R)`` at the queries, ``c_k`` at the keys).
        bias: ``(N, 1, K)`` additive key bias or ``None``.
        gap: ``(R, K)`` query position minus key position.
    """
    estimated = estimated_scores(phi_q, phi_k, c_q, c_k, gap >= 0)
    logits = x @ y.transpose(-2, -1)
    if bias is not None:
        logits = logits + bias.unsqueeze(-2)
    logits = logits - (a + c_q).unsqueeze(-1)
    exact = phi_k.shape[-1] * torch.exp(torch.where((gap >= 0) & (gap < window), logits, float("-inf")))
    return torch.where(gap >= window, estimated, exact)


def window_features(
    q: torch.Tensor, k: torch.Tensor, projection: torch.Tensor, key_bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``x, y, phi_q, phi_k, a, c, bias`` of :func:`window_scores` for whole sequences (softmax kernel)."""
    x, y = scale_inputs(q), scale_inputs(k)
    phi_q, a = softmax_query_features(q, projection)
    phi_k, c = causal_key_features(k, projection, "softmax", key_bias)
    bias = None if key_bias is None else key_bias[:, None, :].to(x.dtype)
    return x, y, phi_q, phi_k, a, c, bias


def windowed_causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    projection: torch.Tensor,
    key_bias: torch.Tensor | None,
    window: int,
    chunk_size: int = CHUNK_SIZE,
) -> torch.Tensor:
    """Causal softmax attention, exact over the ``window`` latest keys, FAVOR+ over the earlier ones.

    Query ``i`` weighs key ``j`` with ``exp(q_i . k_j / sqrt(d))`` where ``i - window < j <= i`` and
    with the FAVOR+ estimate ``phi(q_i) . phi(k_j)`` of the same quantity where ``j <= i - window``;
    one denominator normalises both (:func:`window_scores`). The state of the keys before the
    previous chunk is carried as in :func:`causal_attention`; the previous chunk's and the own
    chunk's keys are weighed pair by pair, so chunks hold at least ``window`` positions.

    Args:
        q, k: ``(N, H, L, d)``; v: ``(N, H, L, d_v)``.
        projection: ``(m, d)`` float32.
        key_bias: ``(N, L)`` float32 additive key bias or ``None``.
        window: exact keys per query (``>= 1``).
        chunk_size: positions per chunk (raised to ``window``; changes rounding only).

    Returns:
        ``(N, H, L, d_v)`` in ``q.dtype``.
    """
    x, y, phi_q, phi_k, a, c, bias = window_features(q, k, projection, key_bias)
    vf = v.to(phi_q.dtype)
    n, h, length, m = phi_q.shape
    size = max(chunk_size, window)
    state = vf.new_zeros(n, h, m, vf.shape[-1])
    key_sum = vf.new_zeros(n, h, m, 1)
    c_state = c[..., :1]  # scale of the state of the keys before the previous chunk (still empty)
    outs = []
    for start in range(0, length, size):
        stop = min(start + size, length)
        lo = max(start - size, 0)  # the previous chunk's first position
        rows, cols = slice(start, stop), slice(lo, stop)
        pq, cc = phi_q[..., rows, :], c[..., rows]
        # keys before the previous chunk: the carried state
        num, den = _from_state(pq, cc, state, key_sum, c_state)
        # the previous and the own chunk, pair by pair
        gap = torch.arange(start, stop, device=q.device)[:, None] - torch.arange(lo, stop, device=q.device)[None, :]
        scores = window_scores(
            x[..., rows, :],
            y[..., cols, :],
            pq,
            phi_k[..., cols, :],
            a[..., rows],
            cc,
            c[..., cols],
            None if bias is None else bias[..., cols],
            gap,
            window,
        )
        num = num + scores @ vf[..., cols, :]
        den = den + scores.sum(-1, keepdim=True)
        outs.append(safe_divide(num, den))
        # the state takes the previous chunk: its keys are at least `window` before every later query
        if start > 0:
            prev = slice(lo, start)
            state, key_sum, c_state = _carry(
                state, key_sum, c_state, phi_k[..., prev, :], vf[..., prev, :], c[..., prev]
            )
    return torch.cat(outs, dim=-2).to(q.dtype)
