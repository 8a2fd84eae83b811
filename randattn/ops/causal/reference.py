"""Causal random-feature attention in plain PyTorch as a chunked scan.

Each chunk of ``C`` positions adds a chunk-local quadratic part to the contribution of the carried
``(m, d_v)`` state of all earlier chunks; no ``(N, H, L, m, d)`` tensor is formed. The stabiliser of
position ``i`` is the running maximum over keys ``<= i``, so the output at ``i`` never depends on
later tokens, and equals the non-causal result on the prefix ``[0, i]``.
"""

from __future__ import annotations

import torch

from ..feature_maps import causal_key_features, query_features, safe_divide

#: Positions per chunk of the reference scan.
CHUNK_SIZE = 128


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
        # inter-chunk part, rescaled from the state's scale to each query's scale (exponent <= 0)
        to_query = torch.exp(c_state - cc).unsqueeze(-1)  # (N, H, C, 1)
        num = (pq @ state) * to_query
        den = (pq @ key_sum) * to_query
        # intra-chunk part: A[i, j] = phi_q[i] . phi_k[j] * exp(c_j - c_i) for j <= i
        keep = torch.ones(size, size, dtype=torch.bool, device=pq.device).tril()
        rel = torch.where(keep, cc.unsqueeze(-2) - cc.unsqueeze(-1), float("-inf"))
        scores = (pq @ pk.transpose(-2, -1)) * torch.exp(rel)
        num = num + scores @ vc
        den = den + scores.sum(-1, keepdim=True)
        outs.append(safe_divide(num, den))
        # carry the state to the scale of the chunk's last position
        c_new = cc[..., -1:]
        to_state = torch.exp(cc - c_new).unsqueeze(-1)  # (N, H, C, 1)
        decay = torch.exp(c_state - c_new).unsqueeze(-1)
        state = state * decay + (pk * to_state).transpose(-2, -1) @ vc
        key_sum = key_sum * decay + (pk * to_state).sum(-2).unsqueeze(-1)
        c_state = c_new
    return torch.cat(outs, dim=-2).to(q.dtype)
