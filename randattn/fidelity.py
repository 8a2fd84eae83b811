"""How far random-feature attention is from exact softmax attention with the same inputs.

Two error measures, both against :func:`randattn.functional.exact_attention`:

* the relative Frobenius error of the outputs, ``||out - out_exact||_F / ||out_exact||_F``
  (:func:`relative_frobenius_error`);
* the total-variation distance between the rows of the implicit attention matrix and the rows of
  the exact softmax matrix, ``1/2 sum_j |A_ij - Â_ij|`` averaged over the rows
  (:func:`attention_rows_total_variation`). It does not depend on the values, lies in ``[0, 1]``
  and is ``1`` only when the two rows put their weight on disjoint keys.

The implicit attention rows of random-feature attention are obtained by attending over identity
values: with ``v = I`` the output row ``i`` is the row ``i`` of the normalised matrix
``phi(q) phi(k)^T`` (:func:`attention_rows`).

Errors depend on the random projection, so :func:`approximation_error` and
:func:`layer_approximation_error` repeat the measurement over several seeds and report the mean
and the standard deviation (:class:`ErrorStats`). Three kinds of draws are compared
(:data:`DRAWS`): ``"orthogonal"`` (exact Haar-orthogonal blocks, the library default), ``"iid"``
(independent Gaussian rows) and ``"qr"`` (orthogonal blocks taken from a plain QR factorisation
without fixing the signs of ``diag(R)``, which biases the estimator; :func:`feature_bias` measures
that bias).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, cast

import torch
from torch import nn

from .features import draw_projection, draw_projection_qr_biased
from .functional import check_backend, check_kernel_fn, exact_attention, rand_attention

__all__ = [
    "DRAWS",
    "ErrorStats",
    "BiasEstimate",
    "draw_features",
    "relative_frobenius_error",
    "attention_rows_total_variation",
    "attention_rows",
    "attention_entropy",
    "synthetic_qkv",
    "approximation_error",
    "layer_approximation_error",
    "feature_bias",
    "kernel_estimate_error",
    "error_sweep",
    "smallest_num_features",
]

#: Kinds of random projections compared by the fidelity tools.
DRAWS = ("orthogonal", "iid", "qr")


def _check_draw(draw: str) -> None:
    if draw not in DRAWS:
        raise ValueError(f"draw must be one of {DRAWS}, got {draw!r}")


def draw_features(
    num_features: int,
    dim: int,
    draw: str = "orthogonal",
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Draw an ``(m, d)`` float32 projection of the given kind.

    Args:
        num_features: ``m``.
        dim: head dimension ``d``.
        draw: ``"orthogonal"`` (Haar blocks), ``"iid"`` (Gaussian rows) or ``"qr"`` (plain-QR blocks,
            biased; for comparison only).
        generator: CPU generator the draw comes from.
        device: where the projection is placed.

    Returns:
        ``(m, d)`` float32 tensor.
    """
    _check_draw(draw)
    if draw == "qr":
        return draw_projection_qr_biased(num_features, dim, generator=generator, device=device)
    return draw_projection(num_features, dim, orthogonal=draw == "orthogonal", generator=generator, device=device)


def relative_frobenius_error(approx: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """Relative Frobenius error ``||approx - exact||_F / ||exact||_F`` over the whole tensors.

    Args:
        approx: any shape, e.g. ``(N, H, L, d_v)``.
        exact: the same shape.

    Returns:
        0-dim float64 tensor.
    """
    if approx.shape != exact.shape:
        raise ValueError(
            f"approx and exact must have the same shape, got {tuple(approx.shape)} and {tuple(exact.shape)}"
        )
    exact64 = exact.double()
    norm = exact64.norm()
    if norm == 0:
        raise ValueError("exact is all zeros; the relative error is undefined")
    return (approx.double() - exact64).norm() / norm


def attention_rows_total_variation(approx_rows: torch.Tensor, exact_rows: torch.Tensor) -> torch.Tensor:
    """Mean total-variation distance between attention rows, ``mean_i 1/2 sum_j |Â_ij - A_ij|``.

    Args:
        approx_rows: ``(..., L, S)`` rows summing to one (or zero for fully masked queries).
        exact_rows: the same shape.

    Returns:
        0-dim float64 tensor in ``[0, 1]`` for probability rows.
    """
    if approx_rows.shape != exact_rows.shape:
        raise ValueError(
            f"approx_rows and exact_rows must have the same shape, got {tuple(approx_rows.shape)} "
            f"and {tuple(exact_rows.shape)}"
        )
    return 0.5 * (approx_rows.double() - exact_rows.double()).abs().sum(-1).mean()


def attention_rows(
    q: torch.Tensor,
    k: torch.Tensor,
    projection: torch.Tensor | None = None,
    *,
    kernel_fn: str = "softmax",
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    backend: str = "reference",
    local_window: int | None = None,
) -> torch.Tensor:
    """The attention matrix, exact (``projection=None``) or implied by random-feature attention.

    Computed by attending over identity values, so it is exactly the matrix the attention function
    applies to its values. Memory is ``O(N H L S)``: meant for measurement at moderate lengths.

    Args:
        q: ``(N, H, L, d)``.
        k: ``(N, H, S, d)``.
        projection: ``(m, d)`` random projection, or ``None`` for exact softmax attention.
        kernel_fn: ``"softmax"`` or ``"relu"`` (ignored when ``projection`` is ``None``).
        causal: causal masking (``L == S``).
        key_padding_mask: ``(N, S)`` as in :func:`randattn.functional.rand_attention`.
        backend: passed to :func:`randattn.functional.rand_attention` (default: the plain-PyTorch
            reference, which defines the result and accepts any value width).
        local_window: passed to :func:`randattn.functional.rand_attention` (causal softmax rows with
            exact weights for each query's latest keys).

    Returns:
        ``(N, H, L, S)`` float32 rows.
    """
    n, h, s = k.shape[0], k.shape[1], k.shape[2]
    eye = torch.eye(s, device=k.device, dtype=torch.float32).expand(n, h, s, s)
    q, k = q.float(), k.float()
    if projection is None:
        return exact_attention(q, k, eye, causal=causal, key_padding_mask=key_padding_mask)
    return rand_attention(
        q,
        k,
        eye,
        projection,
        kernel_fn=kernel_fn,
        causal=causal,
        key_padding_mask=key_padding_mask,
        backend=backend,
        local_window=local_window,
    )


def attention_entropy(rows: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats) of attention rows ``(..., L, S)``: low for sharp attention, ``log S`` for uniform.

    Returns:
        0-dim float64 tensor.
    """
    p = rows.double()
    return -(torch.where(p > 0, p * p.clamp_min(1e-300).log(), torch.zeros_like(p))).sum(-1).mean()


def synthetic_qkv(
    batch: int,
    heads: int,
    length: int,
    dim: int,
    *,
    logit_std: float = 1.0,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gaussian queries, keys and values whose logits ``q.k / sqrt(d)`` have standard deviation ``logit_std``.

    Entries of ``q`` and ``k`` are ``N(0, logit_std)`` (variance ``logit_std``), so
    ``q.k / sqrt(d)`` has standard deviation ``logit_std``: the larger it is, the sharper the exact
    attention. Values are standard Gaussian.

    Returns:
        ``q, k, v``, each ``(batch, heads, length, dim)``.
    """
    if logit_std <= 0:
        raise ValueError(f"logit_std must be > 0, got {logit_std}")
    sigma = math.sqrt(logit_std)
    shape = (batch, heads, length, dim)
    q = torch.randn(shape, generator=generator) * sigma
    k = torch.randn(shape, generator=generator) * sigma
    v = torch.randn(shape, generator=generator)
    return q.to(dtype), k.to(dtype), v.to(dtype)


@dataclass(frozen=True)
class ErrorStats:
    """Errors of random-feature attention against exact attention over several projection seeds.

    Attributes:
        output_mean, output_std: mean and standard deviation (over seeds) of the relative Frobenius
            error of the outputs.
        rows_tv_mean, rows_tv_std: same for the mean total-variation distance of the attention rows
            (``nan`` when the rows were not measured).
        output_errors, rows_tv: the per-seed values.
        seeds: the seeds of the projections.
    """

    output_mean: float
    output_std: float
    rows_tv_mean: float
    rows_tv_std: float
    output_errors: tuple[float, ...]
    rows_tv: tuple[float, ...]
    seeds: tuple[int, ...]

    @classmethod
    def from_samples(cls, output_errors: Sequence[float], rows_tv: Sequence[float], seeds: Sequence[int]) -> ErrorStats:
        """Summarise per-seed samples (standard deviation with ``n - 1``; ``0`` for one seed)."""
        out = torch.tensor(list(output_errors), dtype=torch.float64)
        tv = torch.tensor(list(rows_tv) or [math.nan], dtype=torch.float64)
        return cls(
            output_mean=out.mean().item(),
            output_std=out.std().item() if out.numel() > 1 else 0.0,
            rows_tv_mean=tv.mean().item(),
            rows_tv_std=tv.std().item() if tv.numel() > 1 else 0.0,
            output_errors=tuple(float(x) for x in output_errors),
            rows_tv=tuple(float(x) for x in rows_tv),
            seeds=tuple(int(s) for s in seeds),
        )

    def as_dict(self) -> dict:
        """Plain-``dict`` form (JSON-serialisable)."""
        return asdict(self)


def _seed_list(seeds: int | Iterable[int]) -> list[int]:
    if isinstance(seeds, int):
        if seeds < 1:
            raise ValueError(f"seeds must be a positive count or a sequence of ints, got {seeds}")
        return list(range(seeds))
    out = [int(s) for s in seeds]
    if not out:
        raise ValueError("seeds must not be empty")
    return out


def approximation_error(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    num_features: int,
    kernel_fn: str = "softmax",
    draw: str = "orthogonal",
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    seeds: int | Iterable[int] = 8,
    rows: bool = True,
    backend: str = "reference",
) -> ErrorStats:
    """Error of :func:`~randattn.functional.rand_attention` against exact attention, over projection seeds.

    For each seed ``s`` a projection is drawn from ``torch.Generator().manual_seed(s)`` and shared
    by all batch elements and heads, as in :class:`randattn.RandMultiHeadAttention`.

    Args:
        q: ``(N, H, L, d)``; k: ``(N, H, S, d)``; v: ``(N, H, S, d_v)``.
        num_features: ``m``.
        kernel_fn: ``"softmax"`` or ``"relu"``.
        draw: ``"orthogonal"``, ``"iid"`` or ``"qr"`` (see :func:`draw_features`).
        causal: causal attention (``L == S``).
        key_padding_mask: ``(N, S)`` bool or float mask.
        seeds: number of seeds (``0 .. seeds-1``) or an explicit sequence.
        rows: also measure the total variation of the attention rows (``O(N H L S)`` memory).
        backend: passed to :func:`~randattn.functional.rand_attention` (default ``"reference"``).

    Returns:
        :class:`ErrorStats`.
    """
    check_kernel_fn(kernel_fn)
    _check_draw(draw)
    seed_list = _seed_list(seeds)
    with torch.no_grad():
        exact_out = exact_attention(q.float(), k.float(), v.float(), causal=causal, key_padding_mask=key_padding_mask)
        exact_rows = attention_rows(q, k, causal=causal, key_padding_mask=key_padding_mask) if rows else None
        out_errors, tvs = [], []
        for seed in seed_list:
            gen = torch.Generator().manual_seed(seed)
            proj = draw_features(num_features, q.shape[-1], draw, generator=gen, device=q.device)
            out = rand_attention(
                q, k, v, proj, kernel_fn=kernel_fn, causal=causal, key_padding_mask=key_padding_mask, backend=backend
            )
            out_errors.append(relative_frobenius_error(out, exact_out).item())
            if exact_rows is not None:
                approx_rows = attention_rows(
                    q, k, proj, kernel_fn=kernel_fn, causal=causal, key_padding_mask=key_padding_mask, backend=backend
                )
                tvs.append(attention_rows_total_variation(approx_rows, exact_rows).item())
    return ErrorStats.from_samples(out_errors, tvs, seed_list)


def _exact_twin(layer: Any) -> nn.MultiheadAttention:
    """An ``nn.MultiheadAttention`` holding the same weights as a ``RandMultiHeadAttention``."""
    mha = nn.MultiheadAttention(
        layer.embed_dim,
        layer.num_heads,
        dropout=0.0,
        bias=layer.in_proj_bias is not None,
        add_bias_kv=layer.bias_k is not None,
        add_zero_attn=layer.add_zero_attn,
        kdim=layer.kdim,
        vdim=layer.vdim,
        batch_first=layer.batch_first,
        device=layer.out_proj.weight.device,
        dtype=layer.out_proj.weight.dtype,
    )
    state = {name: t for name, t in layer.state_dict().items() if name != "projection"}
    mha.load_state_dict(state)
    return mha


def _head_queries_keys(
    mha: nn.MultiheadAttention, query: torch.Tensor, key: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per-head ``(N, H, L, d)`` queries and keys of a layer, or ``None`` when it adds bias_kv / zero_attn."""
    if mha.bias_k is not None or mha.add_zero_attn:
        return None
    e, h = mha.embed_dim, mha.num_heads
    if mha._qkv_same_embed_dim:
        w_q, w_k = mha.in_proj_weight[:e], mha.in_proj_weight[e : 2 * e]
    else:
        w_q, w_k = mha.q_proj_weight, mha.k_proj_weight
    b_q = b_k = None
    if mha.in_proj_bias is not None:
        b_q, b_k = mha.in_proj_bias[:e], mha.in_proj_bias[e : 2 * e]
    if not mha.batch_first:
        query, key = query.transpose(0, 1), key.transpose(0, 1)
    q = nn.functional.linear(query, w_q, b_q)
    k = nn.functional.linear(key, w_k, b_k)

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(t.shape[0], t.shape[1], h, e // h).transpose(1, 2)

    return split(q), split(k)


def layer_approximation_error(
    layer: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor | None = None,
    value: torch.Tensor | None = None,
    *,
    num_features: int | None = None,
    kernel_fn: str | None = None,
    draw: str = "orthogonal",
    causal: bool | None = None,
    key_padding_mask: torch.Tensor | None = None,
    seeds: int | Iterable[int] = 8,
    rows: bool = True,
    backend: str = "reference",
) -> ErrorStats:
    """Error of a random-feature attention layer against exact attention with the same weights.

    ``layer`` is either an ``nn.MultiheadAttention`` (the exact layer; a
    :class:`randattn.RandMultiHeadAttention` is built from it with ``from_mha``) or a
    :class:`randattn.RandMultiHeadAttention` (compared with an ``nn.MultiheadAttention`` holding
    its weights). For each seed the layer's projection is redrawn (``draw`` kind); the layer passed
    in is not modified. Dropout is disabled for the measurement.

    Args:
        layer: ``nn.MultiheadAttention`` or ``RandMultiHeadAttention``.
        query: ``(L, N, E)`` or ``(N, L, E)`` following the layer's ``batch_first``.
        key, value: same layout (default: ``query``, self-attention).
        num_features: ``m`` (default: the layer's own for a ``RandMultiHeadAttention``, else the
            library default for the head dimension).
        kernel_fn: ``"softmax"``/``"relu"`` (default: the layer's own, else ``"softmax"``).
        draw: ``"orthogonal"``, ``"iid"`` or ``"qr"``.
        causal: causal attention (default: the layer's own, else ``False``); the exact layer then
            gets the matching causal ``attn_mask``.
        key_padding_mask: ``(N, S)`` bool mask (``True`` ignores the key).
        seeds: number of seeds or a sequence of seeds.
        rows: also measure the attention rows' total variation (layers without ``bias_kv`` and
            ``zero_attn`` only; otherwise reported as ``nan``).
        backend: backend of the random-feature layer during the measurement (default
            ``"reference"``).

    Returns:
        :class:`ErrorStats` for the layer outputs (after ``out_proj``) and the attention rows.
    """
    from .modules import RandMultiHeadAttention

    _check_draw(draw)
    key = query if key is None else key
    value = key if value is None else value
    if isinstance(layer, RandMultiHeadAttention):
        rand_layer = copy.deepcopy(layer)
        if num_features is not None and num_features != rand_layer.num_random_features:
            raise ValueError(
                f"num_features={num_features} differs from the layer's num_random_features="
                f"{rand_layer.num_random_features}; build the layer with the m you want to measure"
            )
        if kernel_fn is not None and kernel_fn != rand_layer.kernel_fn:
            raise ValueError(f"kernel_fn={kernel_fn!r} differs from the layer's kernel_fn={rand_layer.kernel_fn!r}")
        if causal is not None and causal != rand_layer.causal:
            raise ValueError(f"causal={causal} differs from the layer's causal={rand_layer.causal}")
        exact_layer = _exact_twin(rand_layer)
    elif isinstance(layer, nn.MultiheadAttention):
        exact_layer = layer
        options: dict = {"causal": bool(causal), "kernel_fn": kernel_fn or "softmax"}
        if num_features is not None:
            options["num_random_features"] = num_features
        rand_layer = RandMultiHeadAttention.from_mha(layer, **options)
    else:
        raise TypeError(
            f"layer must be an nn.MultiheadAttention or a RandMultiHeadAttention, got {type(layer).__name__}"
        )
    check_kernel_fn(rand_layer.kernel_fn)
    check_backend(backend)
    rand_layer.backend = backend
    seed_list = _seed_list(seeds)
    was_training = exact_layer.training
    exact_layer.eval()
    rand_layer.eval()
    length = query.shape[1] if exact_layer.batch_first else query.shape[0]
    attn_mask = None
    if rand_layer.causal:
        attn_mask = torch.ones(length, length, dtype=torch.bool, device=query.device).triu(1)
    try:
        with torch.no_grad():
            exact_out, _ = exact_layer(
                query, key, value, key_padding_mask=key_padding_mask, attn_mask=attn_mask, need_weights=False
            )
            heads = _head_queries_keys(exact_layer, query, key) if rows else None
            exact_rows = None
            if heads is not None:
                exact_rows = attention_rows(*heads, causal=rand_layer.causal, key_padding_mask=key_padding_mask)
            out_errors, tvs = [], []
            for seed in seed_list:
                gen = torch.Generator().manual_seed(seed)
                proj = draw_features(
                    rand_layer.num_random_features, rand_layer.head_dim, draw, generator=gen, device=query.device
                )
                cast(torch.Tensor, rand_layer.projection).copy_(proj)
                out, _ = rand_layer(query, key, value, key_padding_mask=key_padding_mask, need_weights=False)
                out_errors.append(relative_frobenius_error(out, exact_out).item())
                if heads is not None and exact_rows is not None:
                    approx_rows = attention_rows(
                        *heads,
                        proj,
                        kernel_fn=rand_layer.kernel_fn,
                        causal=rand_layer.causal,
                        key_padding_mask=key_padding_mask,
                        backend=backend,
                        local_window=rand_layer.local_window,
                    )
                    tvs.append(attention_rows_total_variation(approx_rows, exact_rows).item())
    finally:
        exact_layer.train(was_training)
    return ErrorStats.from_samples(out_errors, tvs, seed_list)


@dataclass(frozen=True)
class BiasEstimate:
    """Monte-Carlo estimate of ``E[exp(w.x - |x|^2/2)]`` per feature index (``1`` for an unbiased draw).

    Attributes:
        per_feature: ``(m,)`` float64 means over the draws, one per row index of the projection.
        per_feature_stderr: ``(m,)`` standard errors of those means.
        mean: the mean over all features (what an ``m``-feature kernel estimate averages).
        stderr: its standard error (over draws).
        num_draws: how many projections were drawn.
    """

    per_feature: torch.Tensor
    per_feature_stderr: torch.Tensor
    mean: float
    stderr: float
    num_draws: int


def feature_bias(
    x: torch.Tensor,
    *,
    num_features: int,
    draw: str = "orthogonal",
    num_draws: int = 2000,
    generator: torch.Generator | None = None,
) -> BiasEstimate:
    """Estimate the per-feature expectation ``E_W[exp(w_r . x - |x|^2/2)]`` for each row ``r`` of ``W``.

    For a projection whose rows are marginally ``N(0, I)`` every expectation is exactly ``1`` (the
    softmax feature map is then unbiased). Plain-QR draws (``draw="qr"``) are not: LAPACK's
    Householder QR makes ``diag(R)`` carry the opposite sign of the pivot, so row ``r`` of each block
    has a negative ``r``-th coordinate more often than not (always for ``r = 0``), and the
    expectation is below ``1`` for inputs with positive coordinates.

    Args:
        x: ``(d,)`` scaled input (the ``x = q d^{-1/4}`` of the feature map).
        num_features: ``m`` rows per projection.
        draw: ``"orthogonal"``, ``"iid"`` or ``"qr"``.
        num_draws: number of independent projections.
        generator: CPU generator the draws come from.

    Returns:
        :class:`BiasEstimate`.
    """
    _check_draw(draw)
    if x.dim() != 1:
        raise ValueError(f"x must have shape (d,), got {tuple(x.shape)}")
    if num_draws < 2:
        raise ValueError(f"num_draws must be >= 2, got {num_draws}")
    x64 = x.double().cpu()
    values = torch.empty(num_draws, num_features, dtype=torch.float64)
    for i in range(num_draws):
        w = draw_features(num_features, x64.shape[0], draw, generator=generator).double()
        values[i] = torch.exp(w @ x64 - 0.5 * x64.dot(x64))
    per_draw_mean = values.mean(1)
    return BiasEstimate(
        per_feature=values.mean(0),
        per_feature_stderr=values.std(0) / math.sqrt(num_draws),
        mean=per_draw_mean.mean().item(),
        stderr=(per_draw_mean.std() / math.sqrt(num_draws)).item(),
        num_draws=num_draws,
    )


def kernel_estimate_error(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    num_features: int,
    draw: str = "orthogonal",
    num_draws: int = 200,
    generator: torch.Generator | None = None,
) -> dict:
    """Bias and spread of the ``m``-feature estimate of the softmax kernel ``exp(x . y)``.

    The estimate is ``mean_r exp(w_r.x - |x|^2/2) exp(w_r.y - |y|^2/2)`` over the ``m`` rows of one
    projection; it is repeated over ``num_draws`` projections. Unbiased draws have a relative RMSE
    falling like ``1/sqrt(m)``; a biased draw's RMSE stops at its bias however large ``m`` is.

    Args:
        x, y: ``(d,)`` scaled inputs.
        num_features: ``m``.
        draw: ``"orthogonal"``, ``"iid"`` or ``"qr"``.
        num_draws: independent projections.
        generator: CPU generator the draws come from.

    Returns:
        ``{"rel_bias": E[K_hat]/K - 1, "rel_rmse": sqrt(E[(K_hat - K)^2]) / K, "rel_bias_stderr"}``.
    """
    _check_draw(draw)
    if x.dim() != 1 or y.shape != x.shape:
        raise ValueError(f"x and y must both have shape (d,), got {tuple(x.shape)} and {tuple(y.shape)}")
    if num_draws < 2:
        raise ValueError(f"num_draws must be >= 2, got {num_draws}")
    x64, y64 = x.double().cpu(), y.double().cpu()
    exact = torch.exp(x64.dot(y64))
    ratios = torch.empty(num_draws, dtype=torch.float64)
    for i in range(num_draws):
        w = draw_features(num_features, x64.shape[0], draw, generator=generator).double()
        estimate = (torch.exp(w @ x64 - 0.5 * x64.dot(x64)) * torch.exp(w @ y64 - 0.5 * y64.dot(y64))).mean()
        ratios[i] = estimate / exact
    return {
        "rel_bias": (ratios.mean() - 1).item(),
        "rel_rmse": ((ratios - 1) ** 2).mean().sqrt().item(),
        "rel_bias_stderr": (ratios.std() / math.sqrt(num_draws)).item(),
    }


def error_sweep(
    *,
    num_features: Sequence[int],
    lengths: Sequence[int] = (256,),
    logit_stds: Sequence[float] = (0.25,),
    kernels: Sequence[str] = ("softmax",),
    draws: Sequence[str] = ("orthogonal",),
    dim: int = 64,
    heads: int = 4,
    causal: bool = False,
    seeds: int = 8,
    input_seed: int = 0,
    rows: bool = True,
) -> list[dict]:
    """Measure :func:`approximation_error` on :func:`synthetic_qkv` inputs over a grid of settings.

    One input set is drawn per ``(length, logit_std)`` (generator seeded ``input_seed``) and reused
    for every kernel, draw and ``m``.

    Returns:
        One row per setting: ``{"length", "logit_std", "kernel_fn", "draw", "num_features",
        "exact_entropy", **ErrorStats.as_dict()}``.
    """
    out = []
    for length in lengths:
        for logit_std in logit_stds:
            gen = torch.Generator().manual_seed(input_seed)
            q, k, v = synthetic_qkv(1, heads, length, dim, logit_std=logit_std, generator=gen)
            entropy = attention_entropy(attention_rows(q, k, causal=causal)).item()
            for kernel_fn in kernels:
                for draw in draws:
                    for m in num_features:
                        stats = approximation_error(
                            q,
                            k,
                            v,
                            num_features=m,
                            kernel_fn=kernel_fn,
                            draw=draw,
                            causal=causal,
                            seeds=seeds,
                            rows=rows,
                        )
                        out.append(
                            {
                                "length": length,
                                "logit_std": logit_std,
                                "kernel_fn": kernel_fn,
                                "draw": draw,
                                "num_features": m,
                                "exact_entropy": entropy,
                                **stats.as_dict(),
                            }
                        )
    return out


def smallest_num_features(rows: Iterable[dict], target: float, *, metric: str = "rows_tv_mean") -> int | None:
    """Smallest ``num_features`` among ``rows`` (e.g. from :func:`error_sweep`, one setting) whose
    ``metric`` is at most ``target``; ``None`` when no ``m`` reaches it."""
    reached = [r["num_features"] for r in rows if r[metric] <= target]
    return min(reached) if reached else None
