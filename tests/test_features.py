import math

import pytest
import torch

from randattn.features import (
    default_num_features,
    draw_projection,
    draw_projection_qr_biased,
    feature_projection,
    relu_features,
    round_to_bfloat16,
    scale_inputs,
    scaled_projection,
    softmax_logits,
)
from randattn.functional import exact_attention, rand_attention


def test_default_num_features():
    assert default_num_features(64) == math.ceil(64 * math.log(64))
    assert default_num_features(2) == 2
    with pytest.raises(ValueError, match="head_dim"):
        default_num_features(0)


def test_projection_shapes_and_reproducible():
    a = draw_projection(100, 16, generator=torch.Generator().manual_seed(3))
    b = draw_projection(100, 16, generator=torch.Generator().manual_seed(3))
    assert a.shape == (100, 16) and a.dtype == torch.float32
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="num_features"):
        draw_projection(0, 16)


def test_orthogonal_blocks_are_orthogonal():
    w = draw_projection(48, 16, generator=torch.Generator().manual_seed(0)).double()
    for block in w.split(16):
        unit = block / block.norm(dim=1, keepdim=True)
        torch.testing.assert_close(unit @ unit.T, torch.eye(16, dtype=torch.float64), atol=1e-5, rtol=0)


def _feature_means(draw, dim=4, draws=40000):
    """Mean over independent blocks of exp(w_i . x - |x|^2/2) for each row index i of a block, at a fixed x."""
    x = torch.tensor([0.9, -0.4, 0.3, 0.7], dtype=torch.float64)[:dim]
    w = draw(dim * draws, dim, generator=torch.Generator().manual_seed(1234)).double()
    return torch.exp(w @ x - 0.5 * x.dot(x)).reshape(draws, dim).mean(0)


def test_haar_features_unbiased_and_plain_qr_biased():
    haar = _feature_means(draw_projection)
    plain = _feature_means(draw_projection_qr_biased)
    # Haar: every row is N(0, I), so each feature has mean exactly 1 (std of the mean ~0.012 here).
    assert (haar - 1).abs().max() < 0.06, haar
    # plain QR: LAPACK's sign convention biases the rows; some feature is clearly off.
    assert (plain - 1).abs().max() > 0.15, plain


def test_feature_maps_estimate_kernel(gen):
    """The softmax features' mean product estimates exp(x . y) within 6 standard deviations of the
    mean of m independent features, ``exp(x . y) sqrt((exp(|x + y|^2) - 1) / m)`` (orthogonal blocks
    only lower it). Norms of 0.6 keep |x + y|^2 <= 1.44, where the mean of 20000 terms is close to
    normal (with random norms a rare pair has a heavy-tailed, skewed estimate)."""
    x, y = (torch.nn.functional.normalize(torch.randn(n, 8, generator=gen), dim=-1) * 0.6 for n in (5, 7))
    w = draw_projection(20000, 8, generator=gen)
    fx, fy = torch.exp(softmax_logits(x, w)), torch.exp(softmax_logits(y, w))
    est = fx @ fy.T / w.shape[0]
    exact = torch.exp(x @ y.T)
    sd = exact * ((torch.cdist(-x, y) ** 2).exp() - 1).div(w.shape[0]).sqrt()  # |x - (-y)| = |x + y|
    assert ((est - exact).abs() <= 6 * sd).all(), ((est - exact).abs() / sd).max()
    r = relu_features(scale_inputs(x), w)
    assert (r > 0).all() and r.shape == (5, 20000)


def test_error_keeps_falling_at_large_m():
    """Exact Haar draws: the error keeps falling with m (no plateau)."""
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(1, 1, 64, 8, generator=gen) * 0.8
    k = torch.randn(1, 1, 64, 8, generator=gen) * 0.8
    v = torch.randn(1, 1, 64, 8, generator=gen)
    exact = exact_attention(q.double(), k.double(), v.double())
    errs = []
    for m in (256, 2048, 16384):
        e = [
            (rand_attention(q.double(), k.double(), v.double(), draw_projection(m, 8, generator=gen)) - exact).norm()
            / exact.norm()
            for _ in range(6)
        ]
        errs.append(torch.stack(e).mean().item())
    assert errs[0] > errs[1] > errs[2], errs
    assert errs[2] < errs[0] / 3, errs


def test_round_to_bfloat16_is_round_to_nearest_even():
    """The integer rounding of ``feature_projection`` equals the cast's, ties and carries included."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(4096, generator=gen) * torch.logspace(-20, 20, 4096)
    bits = x.view(torch.int32)
    ties = ((bits & -65536) | 0x8000).view(torch.float32)  # exactly half-way: both neighbours' parity
    carry = ((bits & -65536) | 0xFFFF).view(torch.float32)  # rounds up into the next binade sometimes
    edges = torch.tensor([0.0, -0.0, 1.0, -1.0, 3.3895314e38, 1e-40, -1e-40])
    for t in (x, ties, carry, edges):
        assert torch.equal(round_to_bfloat16(t), t.to(torch.bfloat16).float())


def test_feature_projection_is_the_rounded_scaled_projection():
    w = draw_projection(40, 16, generator=torch.Generator().manual_seed(2))
    f = feature_projection(w)
    assert f.dtype == torch.float64 and f.shape == w.shape
    scaled = f * 16**-0.25
    torch.testing.assert_close(scaled, (w * 16**-0.25).to(torch.bfloat16).double(), rtol=1e-15, atol=0)
    assert ((f - w.double()).abs() <= 2.0**-8 * w.double().abs()).all()
    assert torch.equal(feature_projection(f.float()), f)  # rounding twice changes nothing
    assert torch.equal(scaled_projection(w).double(), scaled)  # what the kernels read: W d^{-1/4} in bf16
