"""Random projections and the feature maps built on them.

The projection ``W`` of shape ``(m, d)`` is shared by queries and keys of every head of a layer.
Orthogonal draws stack blocks of exactly Haar-distributed orthogonal ``d x d`` matrices whose rows are
rescaled to chi(d)-distributed norms, so each row is marginally a standard Gaussian vector and every
feature is an unbiased estimator of the kernel.

The feature maps use the projection rounded once (:func:`feature_projection`): ``W d^{-1/4}`` to the
nearest bfloat16 numbers. Every path (reference, kernels, decoding) uses the same rounded values, so
the feature logits ``q (W d^{-1/4})^T`` of bfloat16 queries and keys are products of two bfloat16
operands, exact on tensor cores in one pass.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "RELU_EPS",
    "SOFTMAX_QUERY_FLOOR",
    "compute_dtype",
    "default_num_features",
    "draw_projection",
    "draw_projection_qr_biased",
    "feature_projection",
    "relu_features",
    "round_to_bfloat16",
    "scaled_projection",
    "softmax_logits",
    "scale_inputs",
]

#: Added to every ReLU feature so that the denominator never vanishes for unmasked keys.
RELU_EPS = 1e-3

#: Added to every softmax query feature (after scaling the query's largest feature to 1). The key
#: features are scaled so that the largest visible one is 1, so every denominator is at least this:
#: without it, a query whose features and the keys' features peak at different random features gets
#: a denominator that underflows (``exp`` of a large negative number), and the gradient of
#: ``num / den`` (which divides by ``den ** 2``) overflows to inf and then NaN; below ``den ~ 1e-19``
#: that happens in float32. The floor is kept far below the features' scale because it also adds
#: ``1e-10 * sum_m phi_k[j]`` to every attention weight (a bias towards keys with large features).
SOFTMAX_QUERY_FLOOR = 1e-10


def default_num_features(head_dim: int) -> int:
    """Default number of random features ``m = ceil(d ln d)`` for head dimension ``d`` (at least ``d``)."""
    if head_dim < 1:
        raise ValueError(f"head_dim must be >= 1, got {head_dim}")
    return max(head_dim, math.ceil(head_dim * math.log(head_dim))) if head_dim > 1 else 1


def _positive_diagonal_signs(r: torch.Tensor) -> torch.Tensor:
    """Signs that make ``diag(R)`` positive.

    LAPACK leaves the signs of ``diag(R)`` to its Householder convention, which biases ``Q``. Flipping
    the columns of ``Q`` so that ``diag(R) > 0`` gives the unique QR factorisation, whose ``Q`` is
    exactly Haar-distributed for a Gaussian input.
    """
    signs = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
    return torch.where(signs == 0, torch.ones_like(signs), signs)


def _check_sizes(num_features: int, dim: int) -> None:
    if not isinstance(num_features, int) or num_features < 1:
        raise ValueError(f"num_features must be a positive int, got {num_features!r}")
    if not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be a positive int, got {dim!r}")


def _draw(num_features, dim, orthogonal, generator, device, fix_signs):
    _check_sizes(num_features, dim)
    if not orthogonal:
        w = torch.randn(num_features, dim, generator=generator, dtype=torch.float64)
        return w.to(device=device, dtype=torch.float32)
    gauss = torch.randn(math.ceil(num_features / dim), dim, dim, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gauss)  # batched: one independent block per leading index
    if fix_signs:
        q = q * _positive_diagonal_signs(r).unsqueeze(-2)
    w = q.transpose(-2, -1).reshape(-1, dim)[:num_features]  # rows of each block are orthonormal
    # chi(d) row norms: the norm of an independent standard Gaussian vector per row.
    norms = torch.randn(num_features, dim, generator=generator, dtype=torch.float64).norm(dim=1)
    return (w * norms.unsqueeze(1)).to(device=device, dtype=torch.float32)


def draw_projection(
    num_features: int,
    dim: int,
    *,
    orthogonal: bool = True,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Draw a random projection for random-feature attention.

    Args:
        num_features: number of random features ``m``.
        dim: head dimension ``d``.
        orthogonal: stack ``ceil(m/d)`` independent Haar-orthogonal blocks with chi(d) row norms
            (lower variance); ``False`` draws iid standard Gaussian rows.
        generator: CPU ``torch.Generator`` to draw from (the global generator when ``None``).
        device: where the result is placed (the draw itself always happens on the CPU in float64,
            so the same generator state gives the same matrix on every device).

    Returns:
        ``(m, d)`` float32 tensor whose rows are each marginally ``N(0, I_d)``.
    """
    return _draw(num_features, dim, orthogonal, generator, device, fix_signs=True)


def draw_projection_qr_biased(
    num_features: int,
    dim: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The plain-QR orthogonal draw (no sign correction), kept to measure its bias.

    Several implementations take ``Q`` from ``torch.linalg.qr`` of a Gaussian matrix as is. LAPACK's
    sign convention for ``diag(R)`` makes that ``Q`` non-Haar, so its rows are biased and the softmax
    estimator built on it is biased. Do not use it for attention; :func:`draw_projection` is exact.

    Returns:
        ``(m, d)`` float32 tensor.
    """
    return _draw(num_features, dim, True, generator, device, fix_signs=False)


def scale_inputs(x: torch.Tensor) -> torch.Tensor:
    """Upcast to float32 (float64 stays) and scale by ``d ** -0.25`` so that ``x . y = q . k / sqrt(d)``.

    Shapes: ``(..., d) -> (..., d)``.
    """
    return x.to(compute_dtype(x.dtype)) * (x.shape[-1] ** -0.25)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Features and states are computed in float32 for half inputs, in float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def feature_projection(projection: torch.Tensor) -> torch.Tensor:
    """The projection as the feature maps use it: ``W`` rounded so that ``W d^{-1/4}`` is exact in
    bfloat16, i.e. ``bf16(W d^{-1/4}) d^{1/4}`` (``W d^{-1/4}`` in float32, then to the nearest
    bfloat16 number).

    Eight significant bits per entry move each entry by at most 2^-8 of itself, far below the
    estimator's Monte Carlo error (order ``m^{-1/2}``); in return the feature logits of bfloat16
    inputs are exact products on tensor cores, in one pass instead of two or three.

    Shapes: ``(m, d) -> (m, d)`` float64 (so that ``scale_inputs(x) @ feature_projection(W).T`` is
    ``x @ bf16(W d^{-1/4}).T`` to float64 rounding).
    """
    return scaled_projection(projection).double() / projection.shape[-1] ** -0.25


def scaled_projection(projection: torch.Tensor) -> torch.Tensor:
    """``W' = bf16(W d^{-1/4})``: the projection scaled by ``d ** -0.25`` in float32 and rounded to the
    nearest bfloat16 numbers (:func:`feature_projection` times ``d ** -0.25``; what the kernels read).

    Shapes: ``(m, d) -> (m, d)`` float32.
    """
    return round_to_bfloat16(projection.float() * projection.shape[-1] ** -0.25)


def round_to_bfloat16(x: torch.Tensor) -> torch.Tensor:
    """Finite float32 values rounded to the nearest bfloat16 number (ties to even), as float32.

    Integer arithmetic on the bits, equal to ``x.to(torch.bfloat16).float()`` for finite values, so
    that compilers keep the rounding (``torch.compile`` may drop a cast down and up again).
    """
    bits = x.contiguous().view(torch.int32)
    bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & -65536
    return bits.view(torch.float32)


def softmax_logits(x: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """Exponents of the FAVOR+ positive features, ``x W^T - |x|^2 / 2`` (``W`` the
    :func:`feature_projection` of ``projection``).

    Args:
        x: scaled inputs ``(..., d)`` float32 (see :func:`scale_inputs`).
        projection: ``(m, d)`` float32.

    Returns:
        ``(..., m)``; ``exp`` of it, up to a stabilising constant, is the feature map whose inner
        products estimate ``exp(x . y)`` without bias.
    """
    return x @ feature_projection(projection).to(x.dtype).T - 0.5 * (x * x).sum(-1, keepdim=True)


def relu_features(x: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """ReLU random features ``relu(x W^T) / sqrt(m) + eps`` (``W`` the :func:`feature_projection`
    of ``projection``).

    Args:
        x: scaled inputs ``(..., d)`` float32.
        projection: ``(m, d)`` float32.

    Returns:
        ``(..., m)`` strictly positive features.
    """
    m = projection.shape[0]
    return torch.relu(x @ feature_projection(projection).to(x.dtype).T) * (m**-0.5) + RELU_EPS
