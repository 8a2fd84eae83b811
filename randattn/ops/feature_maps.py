"""Stabilised query and key feature maps shared by the reference ops (plain PyTorch).

Shapes: ``q (N, H, L, d)``, ``k (N, H, S, d)``, ``projection (m, d)`` float32,
``key_bias (N, S)`` float32 additive (``0`` keep, ``-inf`` drop) or ``None``.
All stabilisers are detached: they cancel exactly between numerator and denominator.
"""

from __future__ import annotations

import torch

from ..features import SOFTMAX_QUERY_FLOOR, relu_features, scale_inputs, softmax_logits

#: Key stabiliser where no key is kept yet (all biases ``-inf``): finite, so its exp factors are 0 or 1.
STABILISER_FLOOR = -1.0e30


def _bias(key_bias: torch.Tensor) -> torch.Tensor:
    return key_bias[:, None, :, None]


def query_features(q: torch.Tensor, projection: torch.Tensor, kernel_fn: str) -> torch.Tensor:
    """Query features ``(N, H, L, m)`` (float32; float64 for float64 inputs).

    Softmax rows are scaled so that their largest feature is 1, then get
    :data:`~randattn.features.SOFTMAX_QUERY_FLOOR` added (a floor under every denominator).
    """
    if kernel_fn == "relu":
        return relu_features(scale_inputs(q), projection)
    return softmax_query_features(q, projection)[0]


def softmax_query_features(q: torch.Tensor, projection: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The softmax query features of :func:`query_features` and their row scale ``a`` ``(N, H, L)``:
    ``phi = exp(s - a) + floor`` with ``a`` the row's largest exponent ``s`` (detached)."""
    s = softmax_logits(scale_inputs(q), projection)
    a = s.amax(-1, keepdim=True).detach()
    return torch.exp(s - a) + SOFTMAX_QUERY_FLOOR, a.squeeze(-1)


def key_features(
    k: torch.Tensor, projection: torch.Tensor, kernel_fn: str, key_bias: torch.Tensor | None
) -> torch.Tensor:
    """Key features ``(N, H, S, m)`` float32 with one stabiliser per ``(n, h)`` (non-causal)."""
    y = scale_inputs(k)
    if kernel_fn == "relu":
        phi = relu_features(y, projection)
        return phi if key_bias is None else phi * torch.exp(_bias(key_bias))
    s = softmax_logits(y, projection)
    if key_bias is not None:
        s = s + _bias(key_bias)
    # the scale counts kept keys only, so the largest kept feature is 1 (with no kept key: any finite scale)
    return torch.exp(s - s.amax(dim=(-2, -1), keepdim=True).detach().clamp_min(STABILISER_FLOOR))


def causal_key_features(
    k: torch.Tensor, projection: torch.Tensor, kernel_fn: str, key_bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Key features stabilised by a running maximum that never looks at later keys.

    Returns:
        ``phi (N, H, S, m)`` float32 with ``phi[j] = exp(s[j] - c[j] + b[j])`` and the stabiliser
        ``c (N, H, S)``, the running max over kept positions ``<= j`` of ``max_m s[j] + b[j]`` (zeros
        for relu; :data:`STABILISER_FLOOR` before the first kept key).
    """
    y = scale_inputs(k)
    if kernel_fn == "relu":
        phi = relu_features(y, projection)
        if key_bias is not None:
            phi = phi * torch.exp(_bias(key_bias))
        return phi, phi.new_zeros(phi.shape[:-1])
    s = softmax_logits(y, projection)
    if key_bias is not None:
        s = s + _bias(key_bias)
    c = torch.cummax(s.amax(-1).detach().clamp_min(STABILISER_FLOOR), dim=-1).values
    return torch.exp(s - c.unsqueeze(-1)), c


def safe_divide(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den`` with rows whose denominator is exactly zero (all keys masked) giving zero."""
    return num / torch.where(den == 0, torch.ones_like(den), den)
