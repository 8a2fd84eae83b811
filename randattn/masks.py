"""Input layouts and masks of the ``nn.MultiheadAttention`` contract, checked once at the module edge."""

from __future__ import annotations

import torch

from .functional import key_padding_bias


def batch_first_inputs(query, key, value, key_padding_mask, batch_first, embed_dim, kdim, vdim):
    """Validate the inputs, bring them to ``(N, L, E)`` and turn the key padding mask into a key bias.

    Returns:
        ``(query, key, value, key_bias, unbatched)`` with the tensors ``(N, L|S, E)`` and the additive
        float key bias ``(N, S)`` (``-inf`` for ignored keys, see
        :func:`randattn.functional.key_padding_bias`) or ``None``.
    """
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.is_nested:
            raise ValueError(
                f"{name} is a nested tensor, which random-feature attention does not take; build "
                "nn.TransformerEncoder with enable_nested_tensor=False or convert it with randattn.convert_mha"
            )
        if t.dim() not in (2, 3):
            raise ValueError(f"{name} must be 2-D (unbatched) or 3-D (batched), got shape {tuple(t.shape)}")
        if t.device != query.device:
            raise ValueError(
                f"query, key and value must be on one device; {name} is on {t.device}, query on {query.device}"
            )
    if not (query.dim() == key.dim() == value.dim()):
        raise ValueError(f"query, key and value must have the same rank, got {query.dim()}, {key.dim()}, {value.dim()}")
    for name, t, dim in (("query", query, embed_dim), ("key", key, kdim), ("value", value, vdim)):
        if t.shape[-1] != dim:
            raise ValueError(f"{name} must have last dimension {dim}, got shape {tuple(t.shape)}")
    unbatched = query.dim() == 2
    if unbatched:
        query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
        if key_padding_mask is not None:
            if key_padding_mask.dim() != 1:
                raise ValueError(
                    f"key_padding_mask must be 1-D (S) for unbatched inputs, got shape {tuple(key_padding_mask.shape)}"
                )
            key_padding_mask = key_padding_mask.unsqueeze(0)
    elif not batch_first:
        query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
    if key.shape[0] != query.shape[0] or value.shape[0] != query.shape[0]:
        raise ValueError(
            f"query, key and value must have the same batch size, got {query.shape[0]}, {key.shape[0]}, {value.shape[0]}"
        )
    if key.shape[1] != value.shape[1]:
        raise ValueError(f"key and value must have the same sequence length, got {key.shape[1]} and {value.shape[1]}")
    if key_padding_mask is not None and key_padding_mask.device != query.device:
        raise ValueError(f"key_padding_mask is on {key_padding_mask.device}, query on {query.device}")
    key_bias = key_padding_bias(key_padding_mask, key.shape[0], key.shape[1])
    return query, key, value, key_bias, unbatched


def is_causal_mask(attn_mask: torch.Tensor, length: int) -> bool:
    """Whether ``attn_mask`` ``(L, L)`` (or ``(N*H, L, L)`` of identical slices) is the standard causal mask."""
    if attn_mask.shape[-2:] != (length, length) or attn_mask.dim() not in (2, 3):
        return False
    future = torch.ones(length, length, dtype=torch.bool, device=attn_mask.device).triu(1)
    if attn_mask.dtype == torch.bool:
        return bool((attn_mask == future).all())
    if not attn_mask.is_floating_point():
        return False
    blocked = attn_mask == float("-inf")
    return bool((blocked == future).all() and (attn_mask.masked_fill(future, 0) == 0).all())


def resolve_causal(
    causal: bool, is_causal: bool, attn_mask: torch.Tensor | None, length: int, source_length: int
) -> bool:
    """Decide causality from the layer flag, the ``is_causal`` hint and ``attn_mask``.

    Raises:
        ValueError: ``attn_mask`` is not the standard causal mask, or causal attention with ``L != S``.
    """
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            raise TypeError(f"attn_mask must be a tensor or None, got {type(attn_mask).__name__}")
        if not is_causal_mask(attn_mask, length) or length != source_length:
            raise ValueError(
                "attn_mask: random-feature attention can only apply the standard causal mask (True / -inf "
                f"strictly above the diagonal, shape ({length}, {length})); got a mask of shape "
                f"{tuple(attn_mask.shape)} and dtype {attn_mask.dtype} that is not. Use key_padding_mask "
                "to drop keys, or exact attention for other masks."
            )
        return True
    causal = causal or is_causal
    if causal and length != source_length:
        raise ValueError(f"causal attention needs query and key of the same length, got L={length}, S={source_length}")
    return causal


def pad_key_bias(key_bias: torch.Tensor | None) -> torch.Tensor | None:
    """Append one kept key (bias 0) to a ``(N, S)`` key bias (for ``add_bias_kv`` / ``add_zero_attn``)."""
    if key_bias is None:
        return None
    return torch.nn.functional.pad(key_bias, (0, 1))
