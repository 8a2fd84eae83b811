"""The approximate attention matrix implied by random-feature attention (``O(L S)`` memory)."""

from __future__ import annotations

import torch

from .causal.reference import estimated_scores, window_features, window_scores
from .feature_maps import causal_key_features, key_features, query_features, safe_divide


def attention_weights(
    q: torch.Tensor,
    k: torch.Tensor,
    projection: torch.Tensor,
    kernel_fn: str,
    causal: bool,
    key_bias: torch.Tensor | None,
    local_window: int | None = None,
) -> torch.Tensor:
    """Normalised approximate attention weights ``(N, H, L, S)`` float32.

    Row ``i`` is ``phi(q_i) . phi(k_j) / sum_j' phi(q_i) . phi(k_j')`` with the same stabilisers and
    masking as the attention itself, so ``weights @ v`` equals the attention output; with
    ``local_window`` (causal softmax) the ``local_window`` latest keys of each row weigh exactly
    (:func:`~randattn.ops.causal.reference.window_scores`).
    """
    if local_window is not None:
        x, y, phi_q, phi_k, a, c, bias = window_features(q, k, projection, key_bias)
        positions = torch.arange(q.shape[-2], device=q.device)
        scores = window_scores(x, y, phi_q, phi_k, a, c, c, bias, positions[:, None] - positions, local_window)
        return safe_divide(scores, scores.sum(-1, keepdim=True))
    phi_q = query_features(q, projection, kernel_fn)
    if causal:
        phi_k, c = causal_key_features(k, projection, kernel_fn, key_bias)
        length = q.shape[-2]
        keep = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
        scores = estimated_scores(phi_q, phi_k, c, c, keep)
    else:
        scores = phi_q @ key_features(k, projection, kernel_fn, key_bias).transpose(-2, -1)
    return safe_divide(scores, scores.sum(-1, keepdim=True))
