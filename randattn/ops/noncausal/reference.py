"""Non-causal random-feature attention in plain PyTorch: the definition the kernels are tested against.

Memory is ``O(L m + m d)`` per head: the ``(L, S)`` attention matrix is never formed.
"""

from __future__ import annotations

import torch

from ..feature_maps import key_features, query_features, safe_divide


def noncausal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    projection: torch.Tensor,
    kernel_fn: str,
    key_bias: torch.Tensor | None,
) -> torch.Tensor:
    """Random-feature attention of every query over every key.

    Args:
        q: ``(N, H, L, d)``; k: ``(N, H, S, d)``; v: ``(N, H, S, d_v)``.
        projection: ``(m, d)`` float32.
        kernel_fn: ``"softmax"`` or ``"relu"``.
        key_bias: ``(N, S)`` float32 additive key bias or ``None``.

    Returns:
        ``(N, H, L, d_v)`` in ``q.dtype``; rows with every key masked are zero.
    """
    phi_q = query_features(q, projection, kernel_fn)
    phi_k = key_features(k, projection, kernel_fn, key_bias)
    state = phi_k.transpose(-2, -1) @ v.to(phi_q.dtype)  # (N, H, m, d_v)
    key_sum = phi_k.sum(-2)  # (N, H, m)
    num = phi_q @ state
    den = phi_q @ key_sum.unsqueeze(-1)  # (N, H, L, 1)
    return safe_divide(num, den).to(q.dtype)
