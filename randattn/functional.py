"""Functional interface: :func:`rand_attention` (validation and backend choice) and exact attention."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .ops.causal.reference import causal_attention as _causal_reference
from .ops.causal.reference import windowed_causal_attention as _windowed_reference
from .ops.eager import split_packed
from .ops.noncausal.reference import noncausal_attention as _noncausal_reference

__all__ = [
    "KERNEL_FNS",
    "BACKENDS",
    "KERNEL_MAX_WINDOW",
    "rand_attention",
    "packed_self_attention",
    "projected_self_attention",
    "exact_attention",
    "key_padding_bias",
    "triton_available",
]

#: Supported kernels.
KERNEL_FNS = ("softmax", "relu")
#: Supported backends.
BACKENDS = ("auto", "reference", "triton")
#: Largest head dimension (of queries/keys and of values) the Triton kernels take: 256 for non-causal
#: bfloat16 inputs, else 128 (float16 runs the float32 kernels, whose tiles of 256 do not fit in shared
#: memory; the causal gradient kernel at 256 gave wrong results on an H100 with Triton 3.6).
KERNEL_MAX_HEAD_DIM = 128
KERNEL_MAX_HEAD_DIM_BF16 = 256
#: Largest number of random features the Triton kernels take.
KERNEL_MAX_FEATURES = 512


def triton_available() -> bool:
    """Whether the Triton kernels can be imported."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def check_kernel_fn(kernel_fn: str) -> None:
    """Raise ``ValueError`` naming ``kernel_fn`` unless it is one of :data:`KERNEL_FNS`."""
    if kernel_fn not in KERNEL_FNS:
        raise ValueError(f"kernel_fn must be one of {KERNEL_FNS}, got {kernel_fn!r}")


def check_backend(backend: str) -> None:
    """Raise ``ValueError`` naming ``backend`` unless it is one of :data:`BACKENDS`."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


#: Largest ``local_window`` the Triton kernels take (their chunk of positions,
#: :data:`randattn.ops.causal.triton.CHUNK`); ``backend="auto"`` runs larger windows on the reference path.
KERNEL_MAX_WINDOW = 64


def check_local_window(local_window: int | None, causal: bool, kernel_fn: str, backend: str) -> None:
    """Raise ``ValueError`` naming ``local_window`` unless it is ``None`` or an ``int >= 1`` with
    ``causal=True``, ``kernel_fn="softmax"`` and a backend that computes it (``backend="triton"``:
    at most :data:`KERNEL_MAX_WINDOW`)."""
    if local_window is None:
        return
    if isinstance(local_window, bool) or not isinstance(local_window, int) or local_window < 1:
        raise ValueError(f"local_window must be None or an int >= 1, got {local_window!r}")
    if not causal:
        raise ValueError("local_window needs causal=True (exact weights for the latest keys of each query)")
    if kernel_fn != "softmax":
        raise ValueError(f"local_window needs kernel_fn='softmax' (its exact weights are softmax's), got {kernel_fn!r}")
    if backend == "triton" and not _kernels_take(local_window):
        raise ValueError(
            f"backend='triton' takes local_window up to {KERNEL_MAX_WINDOW}, got {local_window} "
            "(backend='auto' or 'reference' computes larger windows on the reference path)"
        )


def _kernels_take(local_window: int | None) -> bool:
    """Whether the Triton kernels compute this ``local_window`` (none, or at most :data:`KERNEL_MAX_WINDOW`)."""
    return local_window is None or local_window <= KERNEL_MAX_WINDOW


def key_padding_bias(key_padding_mask: torch.Tensor | None, batch: int, length: int) -> torch.Tensor | None:
    """Convert a key padding mask to an additive float32 key bias ``(N, S)``.

    Args:
        key_padding_mask: ``(N, S)`` bool (``True`` = ignore the key) or floating (added to the
            attention logits, i.e. the key's features are multiplied by ``exp(mask)``), or ``None``.
        batch, length: the expected ``N`` and ``S``.

    Returns:
        ``(N, S)`` float32 with ``-inf`` for ignored keys, or ``None``.
    """
    if key_padding_mask is None:
        return None
    if key_padding_mask.dtype != torch.bool and not key_padding_mask.is_floating_point():
        raise TypeError(f"key_padding_mask must be a bool or floating tensor, got dtype {key_padding_mask.dtype}")
    if tuple(key_padding_mask.shape) != (batch, length):
        raise ValueError(
            f"key_padding_mask must have shape (N, S) = {(batch, length)}, got {tuple(key_padding_mask.shape)}"
        )
    if key_padding_mask.dtype == torch.bool:
        zero = torch.zeros((), dtype=torch.float32, device=key_padding_mask.device)
        return torch.where(key_padding_mask, float("-inf"), zero)
    return key_padding_mask.to(torch.float64 if key_padding_mask.dtype == torch.float64 else torch.float32)


def kernel_max_head_dim(dtype: torch.dtype, causal: bool = False) -> int:
    """Largest head dimension the Triton kernels take for inputs of ``dtype`` (256 for non-causal
    bfloat16, else 128)."""
    return KERNEL_MAX_HEAD_DIM_BF16 if dtype == torch.bfloat16 and not causal else KERNEL_MAX_HEAD_DIM


#: Input dtypes the Triton kernels take (float16 runs the float32 kernels).
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _kernel_sizes_supported(dtype: torch.dtype, d: int, dv: int, m: int, causal: bool) -> bool:
    return dtype in KERNEL_DTYPES and max(d, dv) <= kernel_max_head_dim(dtype, causal) and m <= KERNEL_MAX_FEATURES


def _kernel_module(causal: bool):
    """The module of Triton kernels of the causal or the non-causal op (imported on first use)."""
    if causal:
        from .ops.causal import triton as kernels
    else:
        from .ops.noncausal import triton as kernels  # type: ignore[no-redef]
    return kernels


def _use_triton(q: torch.Tensor, v: torch.Tensor, projection: torch.Tensor, backend: str, causal: bool) -> bool:
    return _use_triton_for(q.device, q.dtype, q.shape[-1], v.shape[-1], projection.shape[0], backend, causal)


def _use_triton_for(
    device: torch.device, dtype: torch.dtype, d: int, dv: int, m: int, backend: str, causal: bool
) -> bool:
    """Whether attention of these sizes runs on the kernels (``backend="triton"``: or a clear error)."""
    if backend == "reference":
        return False
    if backend == "auto":
        return device.type == "cuda" and triton_available() and _kernel_sizes_supported(dtype, d, dv, m, causal)
    if dtype not in KERNEL_DTYPES:
        raise ValueError(f"backend='triton' takes float32, float16 or bfloat16 inputs, got {dtype}")
    if not _kernel_sizes_supported(dtype, d, dv, m, causal):
        raise ValueError(
            f"backend='triton' takes head dims up to {kernel_max_head_dim(dtype, causal)} for "
            f"{'causal' if causal else 'non-causal'} {dtype} inputs (256 for non-causal bfloat16, 128 otherwise) "
            f"and up to {KERNEL_MAX_FEATURES} "
            f"random features; got d={d}, d_v={dv}, m={m} "
            "(backend='auto' uses the reference path for these sizes)"
        )
    if not triton_available():
        raise RuntimeError("backend='triton' needs the triton package, which is not importable")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 to run the kernels on the CPU); "
            f"got tensors on {device}"
        )
    return True


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, projection: torch.Tensor, causal: bool) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape (N, H, L, d), got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got dtype {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"q, k, v and projection must be on one device; {name} is on {t.device}, q on {q.device}")
    if q.shape[:2] != k.shape[:2] or v.shape[:2] != q.shape[:2]:
        raise ValueError(f"q, k, v must agree in (N, H): got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must have the same head dim, got {q.shape[-1]} and {k.shape[-1]}")
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(f"k and v must have the same length S, got {k.shape[-2]} and {v.shape[-2]}")
    if causal and q.shape[-2] != k.shape[-2]:
        raise ValueError(f"causal attention needs L == S, got L={q.shape[-2]}, S={k.shape[-2]}")
    _check_projection(projection, q.shape[-1], q.device)


def _check_projection(projection: torch.Tensor, head_dim: int, device: torch.device) -> None:
    if projection.dim() != 2 or projection.shape[1] != head_dim:
        raise ValueError(f"projection must have shape (m, {head_dim}), got {tuple(projection.shape)}")
    if projection.device != device:
        raise ValueError(f"q, k, v and projection must be on one device; projection is on {projection.device}")


def rand_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    projection: torch.Tensor,
    *,
    kernel_fn: str = "softmax",
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    backend: str = "auto",
    local_window: int | None = None,
) -> torch.Tensor:
    r"""Random-feature attention on per-head tensors.

    Computes, for each batch element and head,

    .. math::
        \mathrm{out}_i = \frac{\sum_j \phi(q_i)^\top \phi(k_j)\, v_j}{\sum_j \phi(q_i)^\top \phi(k_j)}

    over all keys (``causal=False``) or over ``j <= i`` (``causal=True``), in ``O(L m d)`` time.
    ``phi`` is the FAVOR+ positive feature map (``kernel_fn="softmax"``, an unbiased estimate of
    ``exp(q.k / sqrt(d))``) or the ReLU feature map (``"relu"``); see the user guide.

    Args:
        q: queries ``(N, H, L, d)``.
        k: keys ``(N, H, S, d)``.
        v: values ``(N, H, S, d_v)``.
        projection: random projection ``(m, d)`` (cast to float32), e.g. from
            :func:`randattn.features.draw_projection`.
        kernel_fn: ``"softmax"`` or ``"relu"``.
        causal: attend only to keys at positions ``<= i`` (needs ``L == S``).
        key_padding_mask: ``(N, S)``; bool (``True`` ignores the key) or float (added to the logits).
        backend: ``"auto"`` (Triton kernels for CUDA tensors when Triton is installed and
            ``d, d_v <= 128`` (256 for non-causal bfloat16), ``m <= 512``; else the reference), ``"reference"`` (plain PyTorch, any device) or ``"triton"`` (the kernels;
            on CPU tensors only with ``TRITON_INTERPRET=1``).
        local_window: causal softmax only: query ``i`` weighs the keys ``i - local_window < j <= i``
            with the exact ``exp(q_i . k_j / sqrt(d))`` and the earlier keys with their feature
            estimate, under one denominator (``None``: every key by its estimate), in ``O(L (w + m) d)``
            time. The Triton kernels compute windows up to :data:`KERNEL_MAX_WINDOW` keys (their chunk),
            the reference path any window.

    Returns:
        ``(N, H, L, d_v)`` in ``q.dtype``. Queries whose keys are all masked get zeros.
    """
    check_kernel_fn(kernel_fn)
    check_backend(backend)
    check_local_window(local_window, causal, kernel_fn, backend)
    _check_qkv(q, k, v, projection, causal)
    key_bias = key_padding_bias(key_padding_mask, k.shape[0], k.shape[-2])
    projection = projection.float()
    if local_window is not None:
        if _kernels_take(local_window) and _use_triton(q, v, projection, backend, causal):
            return _kernel_module(True).causal_attention(q, k, v, projection, kernel_fn, key_bias, local_window)
        return _windowed_reference(q, k, v, projection, key_bias, local_window)
    if _use_triton(q, v, projection, backend, causal):
        kernels = _kernel_module(causal)
        run = kernels.causal_attention if causal else kernels.noncausal_attention
        return run(q, k, v, projection, kernel_fn, key_bias)
    op = _causal_reference if causal else _noncausal_reference
    return op(q, k, v, projection, kernel_fn, key_bias)


def packed_self_attention(
    qkv: torch.Tensor,
    num_heads: int,
    projection: torch.Tensor,
    *,
    kernel_fn: str = "softmax",
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    backend: str = "auto",
    local_window: int | None = None,
) -> torch.Tensor:
    """:func:`rand_attention` of self-attention given the packed in-projection ``qkv``.

    ``q, k, v`` are the three thirds of the last dimension of ``qkv``, each split into ``num_heads``
    heads (the layout of ``nn.MultiheadAttention``'s ``in_proj_weight``). With the Triton kernels
    (outside ``torch.compile``) the kernels read the thirds in place and write their gradients into
    one ``(N, L, 3 E)`` tensor: one in-projection matmul forward and backward, no copies.

    Args:
        qkv: ``(N, L, 3 E)``.
        num_heads: ``H``; ``E`` must be divisible by it.
        projection, kernel_fn, causal, key_padding_mask, backend, local_window: as for :func:`rand_attention`.

    Returns:
        ``(N, H, L, E / H)`` in ``qkv.dtype``.
    """
    if qkv.dim() != 3 or qkv.shape[-1] % (3 * num_heads):
        raise ValueError(
            f"qkv must have shape (N, L, 3 E) with E divisible by num_heads={num_heads}, got {tuple(qkv.shape)}"
        )
    check_kernel_fn(kernel_fn)
    check_backend(backend)
    check_local_window(local_window, causal, kernel_fn, backend)
    head_dim = qkv.shape[-1] // (3 * num_heads)
    if (
        torch.compiler.is_compiling()
        or projection.dim() != 2
        or not _kernels_take(local_window)
        or not _use_triton_for(qkv.device, qkv.dtype, head_dim, head_dim, projection.shape[0], backend, causal)
    ):
        q, k, v = split_packed(qkv, num_heads)
        return rand_attention(
            q,
            k,
            v,
            projection,
            kernel_fn=kernel_fn,
            causal=causal,
            key_padding_mask=key_padding_mask,
            backend=backend,
            local_window=local_window,
        )
    # q, k, v are views of one tensor: they agree in everything _check_qkv checks but the projection
    _check_projection(projection, head_dim, qkv.device)
    key_bias = key_padding_bias(key_padding_mask, qkv.shape[0], qkv.shape[1])
    from .ops import eager
    from .ops._triton_utils import kernel_dtype

    in_dtype, dtype = qkv.dtype, kernel_dtype(qkv.dtype)
    if dtype != in_dtype:
        qkv = qkv.to(dtype)
    if projection.dtype != torch.float32:
        projection = projection.float()
    op = _kernel_module(causal) if local_window is None else _kernel_module(True).windowed(local_window)
    out = eager.PackedSelfAttention.apply(op, qkv, num_heads, projection, kernel_fn, key_bias)
    return out if out.dtype == in_dtype else out.to(in_dtype)


def projected_self_attention(
    x: torch.Tensor,
    in_proj_weight: torch.Tensor,
    in_proj_bias: torch.Tensor | None,
    num_heads: int,
    projection: torch.Tensor,
    *,
    kernel_fn: str = "softmax",
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    backend: str = "auto",
    local_window: int | None = None,
) -> torch.Tensor:
    """In-projection and :func:`rand_attention` of self-attention: ``qkv = x W^T + b``, split as by
    :func:`packed_self_attention`.

    With the Triton kernels (eager mode), the in-projection is
    :class:`randattn.ops.eager.InProjection`, whose backward computes the bias gradient before the
    input and weight gradients (``nn.Linear``'s backward holds the input gradient, the weight
    gradient and a reduction workspace at once: the largest moment of a layer's backward). Under
    autocast the in-projection runs in the autocast dtype, as ``F.linear`` would. Elsewhere this is
    ``packed_self_attention(F.linear(x, W, b), ...)``.

    Args:
        x: ``(N, L, E)``.
        in_proj_weight: ``(3 E, E)``; in_proj_bias: ``(3 E,)`` or ``None``.
        num_heads: ``H``; ``E`` must be divisible by it.
        projection, kernel_fn, causal, key_padding_mask, backend, local_window: as for :func:`rand_attention`.

    Returns:
        ``(N, H, L, E / H)`` in the in-projection's dtype (the autocast dtype under autocast).
    """
    if x.dim() != 3:
        raise ValueError(f"x must have shape (N, L, E), got {tuple(x.shape)}")
    embed = x.shape[-1]
    if tuple(in_proj_weight.shape) != (3 * embed, embed):
        raise ValueError(
            f"in_proj_weight must have shape (3 E, E) = {(3 * embed, embed)}, got {tuple(in_proj_weight.shape)}"
        )
    if in_proj_bias is not None and tuple(in_proj_bias.shape) != (3 * embed,):
        raise ValueError(f"in_proj_bias must have shape (3 E,) = {(3 * embed,)}, got {tuple(in_proj_bias.shape)}")
    if embed % num_heads:
        raise ValueError(f"embed dim {embed} must be divisible by num_heads={num_heads}")
    check_kernel_fn(kernel_fn)
    check_backend(backend)
    device_type = x.device.type
    dtype = x.dtype
    if torch.is_autocast_enabled(device_type) and dtype in KERNEL_DTYPES:
        dtype = torch.get_autocast_dtype(device_type)
    head_dim = embed // num_heads
    if (
        torch.compiler.is_compiling()
        or projection.dim() != 2
        or projection.shape[-1] != head_dim
        or not _use_triton_for(x.device, dtype, head_dim, head_dim, projection.shape[0], backend, causal)
    ):
        qkv = F.linear(x, in_proj_weight, in_proj_bias)
    else:
        from .ops import eager

        qkv = eager.InProjection.apply(x, in_proj_weight, in_proj_bias, dtype)
    return packed_self_attention(
        qkv,
        num_heads,
        projection,
        kernel_fn=kernel_fn,
        causal=causal,
        key_padding_mask=key_padding_mask,
        backend=backend,
        local_window=local_window,
    )


def exact_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Exact softmax attention ``softmax(q k^T / sqrt(d)) v`` in the dtype of the inputs.

    Args:
        q: ``(N, H, L, d)``; k: ``(N, H, S, d)``; v: ``(N, H, S, d_v)``.
        causal: mask keys after each query (needs ``L == S``).
        key_padding_mask: ``(N, S)`` bool (``True`` ignores) or float additive.

    Returns:
        ``(N, H, L, d_v)``. Rows with every key masked are zero (not NaN).
    """
    _check_qkv(q, k, v, q.new_zeros(1, q.shape[-1]), causal)
    logits = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    bias = key_padding_bias(key_padding_mask, k.shape[0], k.shape[-2])
    if bias is not None:
        logits = logits + bias[:, None, None, :].to(logits.dtype)
    if causal:
        length = q.shape[-2]
        future = torch.ones(length, length, dtype=torch.bool, device=q.device).triu(1)
        logits = logits.masked_fill(future, float("-inf"))
    weights = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    return weights @ v
