"""Tests of randattn.fidelity: error measures against direct computations and their behaviour in m."""

import math

import pytest
import torch
from torch import nn

from randattn import RandMultiHeadAttention
from randattn.features import draw_projection, feature_projection
from randattn.fidelity import (
    DRAWS,
    ErrorStats,
    approximation_error,
    attention_entropy,
    attention_rows,
    attention_rows_total_variation,
    draw_features,
    error_sweep,
    feature_bias,
    kernel_estimate_error,
    layer_approximation_error,
    relative_frobenius_error,
    smallest_num_features,
    synthetic_qkv,
)
from randattn.functional import exact_attention, rand_attention


def _direct_rows(q, k, w, kernel_fn, causal):
    """Attention rows straight from the feature-map definitions (no stabilisers), float64."""
    d = q.shape[-1]
    x, y, w = q.double() * d**-0.25, k.double() * d**-0.25, feature_projection(w)
    if kernel_fn == "softmax":
        fq = torch.exp(x @ w.T - 0.5 * (x * x).sum(-1, keepdim=True))
        fk = torch.exp(y @ w.T - 0.5 * (y * y).sum(-1, keepdim=True))
    else:
        fq = torch.relu(x @ w.T) / math.sqrt(w.shape[0]) + 1e-3
        fk = torch.relu(y @ w.T) / math.sqrt(w.shape[0]) + 1e-3
    a = fq @ fk.transpose(-1, -2)
    if causal:
        a = a.tril()
    return a / a.sum(-1, keepdim=True)


def _small(seed=0, length=12, dim=8, logit_std=0.5):
    return synthetic_qkv(2, 3, length, dim, logit_std=logit_std, generator=torch.Generator().manual_seed(seed))


def test_relative_frobenius_error_matches_direct_formula():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 4, 5, generator=gen), torch.randn(3, 4, 5, generator=gen)
    a, b = a.double(), b.double()
    direct = math.sqrt(((a - b) ** 2).sum().item()) / math.sqrt((b**2).sum().item())
    assert relative_frobenius_error(a, b).item() == pytest.approx(direct, rel=1e-12)
    assert relative_frobenius_error(b, b).item() == 0.0
    with pytest.raises(ValueError, match="same shape"):
        relative_frobenius_error(a, b[:1])
    with pytest.raises(ValueError, match="exact is all zeros"):
        relative_frobenius_error(a, torch.zeros_like(a))


def test_total_variation_matches_direct_formula():
    p = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])
    r = torch.tensor([[0.0, 0.5, 0.5], [0.0, 0.0, 1.0]])
    # row 0: 1/2 (0.5 + 0 + 0.5) = 0.5; row 1: disjoint supports -> 1.
    assert attention_rows_total_variation(p, r).item() == pytest.approx(0.75)
    assert attention_rows_total_variation(p, p).item() == 0.0


@pytest.mark.parametrize("kernel_fn", ["softmax", "relu"])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_rows_match_feature_map_definition(kernel_fn, causal):
    q, k, _ = _small()
    w = draw_projection(16, q.shape[-1], generator=torch.Generator().manual_seed(3))
    rows = attention_rows(q, k, w, kernel_fn=kernel_fn, causal=causal)
    torch.testing.assert_close(rows.double(), _direct_rows(q, k, w, kernel_fn, causal), rtol=1e-4, atol=1e-6)
    exact = attention_rows(q, k, causal=causal)
    logits = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if causal:
        logits = logits.masked_fill(torch.ones(12, 12, dtype=torch.bool).triu(1), -math.inf)
    torch.testing.assert_close(exact.double(), torch.softmax(logits, -1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("draw", DRAWS)
def test_approximation_error_per_seed_matches_direct_computation(draw):
    q, k, v = _small()
    stats = approximation_error(q, k, v, num_features=16, draw=draw, causal=True, seeds=[5, 9])
    assert stats.seeds == (5, 9)
    for seed, out_err, tv in zip(stats.seeds, stats.output_errors, stats.rows_tv):
        w = draw_features(16, q.shape[-1], draw, generator=torch.Generator().manual_seed(seed))
        approx = rand_attention(q, k, v, w, causal=True)
        exact = exact_attention(q, k, v, causal=True)
        assert out_err == pytest.approx(((approx - exact).norm() / exact.norm()).item(), rel=1e-5)
        rows = _direct_rows(q, k, w, "softmax", True)
        exact_rows = attention_rows(q, k, causal=True).double()
        assert tv == pytest.approx(0.5 * (rows - exact_rows).abs().sum(-1).mean().item(), rel=1e-4)
    assert stats.output_mean == pytest.approx(sum(stats.output_errors) / 2)
    assert stats.output_std == pytest.approx(torch.tensor(stats.output_errors).std().item())


def test_error_stats_single_seed_and_no_rows():
    stats = ErrorStats.from_samples([0.25], [], [7])
    assert stats.output_mean == 0.25 and stats.output_std == 0.0
    assert math.isnan(stats.rows_tv_mean)
    assert stats.as_dict()["seeds"] == (7,)


@pytest.mark.parametrize("kernel_fn", ["softmax", "relu"])
def test_error_decreases_as_m_grows(kernel_fn):
    q, k, v = synthetic_qkv(1, 4, 64, 16, logit_std=0.25, generator=torch.Generator().manual_seed(1))
    errors = [approximation_error(q, k, v, num_features=m, kernel_fn=kernel_fn, seeds=8) for m in (4, 32, 256)]
    outputs = [e.output_mean for e in errors]
    tvs = [e.rows_tv_mean for e in errors]
    assert outputs[0] > outputs[1] > outputs[2], outputs
    assert tvs[0] > tvs[1] > tvs[2], tvs


def test_softmax_error_vanishes_for_large_m_but_relu_does_not():
    q, k, v = synthetic_qkv(1, 2, 32, 8, logit_std=0.25, generator=torch.Generator().manual_seed(2))
    soft = approximation_error(q, k, v, num_features=4096, seeds=2)
    relu = approximation_error(q, k, v, num_features=4096, kernel_fn="relu", seeds=2)
    assert soft.rows_tv_mean < 0.01
    assert relu.rows_tv_mean > 5 * soft.rows_tv_mean


@pytest.mark.parametrize("input_seed", [0, 1, 2])
def test_orthogonal_features_beat_iid_for_softmax(input_seed):
    q, k, v = synthetic_qkv(1, 4, 64, 32, logit_std=0.125, generator=torch.Generator().manual_seed(input_seed))
    orth = approximation_error(q, k, v, num_features=32, draw="orthogonal", seeds=range(16))
    iid = approximation_error(q, k, v, num_features=32, draw="iid", seeds=range(100, 116))
    assert orth.output_mean < iid.output_mean
    assert orth.rows_tv_mean < iid.rows_tv_mean


def test_haar_draws_are_unbiased_and_plain_qr_draws_are_biased():
    d = 8
    x = torch.full((d,), 1.0 / math.sqrt(d))  # |x| = 1 along the coordinate diagonal
    haar = feature_bias(
        x, num_features=d, draw="orthogonal", num_draws=4000, generator=torch.Generator().manual_seed(0)
    )
    iid = feature_bias(x, num_features=d, draw="iid", num_draws=4000, generator=torch.Generator().manual_seed(1))
    qr = feature_bias(x, num_features=d, draw="qr", num_draws=4000, generator=torch.Generator().manual_seed(2))
    # Unbiased: within 4 standard errors of 1 (stderr about 0.006 here); biased: far below 1.
    assert abs(haar.mean - 1) < 4 * haar.stderr
    assert abs(iid.mean - 1) < 4 * iid.stderr
    assert qr.mean < 1 - 10 * qr.stderr
    assert qr.mean < 0.95
    # The first row of each plain-QR block always has a negative first coordinate: the largest bias.
    assert qr.per_feature[0] < 1 - 20 * qr.per_feature_stderr[0]
    assert torch.all((haar.per_feature - 1).abs() < 5 * haar.per_feature_stderr)


def test_kernel_estimate_error_bias_plateau_for_plain_qr():
    d = 8
    x = torch.full((d,), 0.5 / math.sqrt(d))
    results = {
        draw: [
            kernel_estimate_error(
                x, x, num_features=m, draw=draw, num_draws=300, generator=torch.Generator().manual_seed(0)
            )
            for m in (8, 512)
        ]
        for draw in ("orthogonal", "qr")
    }
    haar_small, haar_large = results["orthogonal"]
    qr_small, qr_large = results["qr"]
    assert haar_large["rel_rmse"] < 0.25 * haar_small["rel_rmse"]
    assert abs(haar_large["rel_bias"]) < 0.01
    # The plain-QR estimate keeps its bias however many features it averages.
    assert qr_large["rel_bias"] < -0.05
    assert qr_large["rel_rmse"] > 3 * haar_large["rel_rmse"]


def test_attention_entropy_uniform_and_one_hot():
    uniform = torch.full((2, 5), 0.2)
    assert attention_entropy(uniform).item() == pytest.approx(math.log(5))
    assert attention_entropy(torch.eye(3)).item() == pytest.approx(0.0)


def test_synthetic_logit_scale():
    q, k, _ = synthetic_qkv(1, 1, 2048, 64, logit_std=2.0, generator=torch.Generator().manual_seed(0))
    logits = (q[0, 0] * k[0, 0]).sum(-1) / 8.0
    assert logits.std().item() == pytest.approx(2.0, rel=0.1)
    with pytest.raises(ValueError, match="logit_std"):
        synthetic_qkv(1, 1, 2, 2, logit_std=0.0)


@pytest.mark.parametrize("batch_first", [False, True])
def test_layer_error_of_mha_matches_functional_error(batch_first):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 2, batch_first=batch_first)
    x = torch.randn(10, 3, 16) if not batch_first else torch.randn(3, 10, 16)
    stats = layer_approximation_error(mha, x, num_features=8, causal=True, seeds=[1, 2])
    assert mha.training  # the layer's mode is restored
    # Same measurement through the functional API on the layer's per-head queries and keys.
    xb = x if batch_first else x.transpose(0, 1)
    w_q, w_k, w_v = mha.in_proj_weight.chunk(3)
    b_q, b_k, b_v = mha.in_proj_bias.chunk(3)

    def heads(t):
        return t.reshape(3, 10, 2, 8).transpose(1, 2)

    q, k, v = heads(xb @ w_q.T + b_q), heads(xb @ w_k.T + b_k), heads(xb @ w_v.T + b_v)
    fn_stats = approximation_error(q.detach(), k.detach(), v.detach(), num_features=8, causal=True, seeds=[1, 2])
    assert stats.rows_tv == pytest.approx(fn_stats.rows_tv, rel=1e-4)
    # Output error: recompute directly with out_proj applied.
    for seed, err in zip(stats.seeds, stats.output_errors):
        w = draw_projection(8, 8, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            approx = rand_attention(q, k, v, w, causal=True).transpose(1, 2).reshape(3, 10, 16)
            approx = mha.out_proj(approx)
            exact = mha.out_proj(exact_attention(q, k, v, causal=True).transpose(1, 2).reshape(3, 10, 16))
        assert err == pytest.approx(((approx - exact).norm() / exact.norm()).item(), rel=1e-4)


def test_layer_error_of_rand_layer_equals_error_of_its_exact_twin():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=True)
    x = torch.randn(2, 9, 16)
    rand = RandMultiHeadAttention.from_mha(mha, num_random_features=12, causal=True)
    before = rand.projection.clone()
    from_rand = layer_approximation_error(rand, x, seeds=3)
    from_mha = layer_approximation_error(mha, x, num_features=12, causal=True, seeds=3)
    assert torch.equal(rand.projection, before)  # the layer passed in is not modified
    assert from_rand.output_errors == pytest.approx(from_mha.output_errors, rel=1e-5)
    assert from_rand.rows_tv == pytest.approx(from_mha.rows_tv, rel=1e-5)
    with pytest.raises(ValueError, match="num_features"):
        layer_approximation_error(rand, x, num_features=5)


def test_layer_error_of_a_windowed_layer_measures_its_window():
    """A layer with a local_window covering the sequence is exact attention: its output error and its
    rows' total variation are both at rounding level (the rows are those of the windowed layer)."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=True)
    x = torch.randn(2, 9, 16)
    rand = RandMultiHeadAttention.from_mha(mha, num_random_features=12, causal=True, local_window=9)
    stats = layer_approximation_error(rand, x, seeds=2)
    assert max(stats.output_errors) < 1e-5 and max(stats.rows_tv) < 1e-5
    narrow = layer_approximation_error(RandMultiHeadAttention.from_mha(mha, num_random_features=12, causal=True,
                                                                       local_window=2), x, seeds=2)
    assert min(narrow.rows_tv) > 1e-3


def test_bad_arguments_are_named():
    q, k, v = _small()
    with pytest.raises(ValueError, match="draw"):
        approximation_error(q, k, v, num_features=4, draw="sobol")
    with pytest.raises(ValueError, match="kernel_fn"):
        approximation_error(q, k, v, num_features=4, kernel_fn="cosine")
    with pytest.raises(ValueError, match="seeds"):
        approximation_error(q, k, v, num_features=4, seeds=0)
    with pytest.raises(TypeError, match="layer"):
        layer_approximation_error(nn.Linear(4, 4), torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="x must have shape"):
        feature_bias(torch.zeros(2, 2), num_features=2)


def test_error_sweep_rows_and_smallest_num_features():
    rows = error_sweep(num_features=[4, 64], logit_stds=[0.125], kernels=["softmax", "relu"], dim=8, heads=1, seeds=2)
    assert [(r["kernel_fn"], r["num_features"]) for r in rows] == [
        ("softmax", 4),
        ("softmax", 64),
        ("relu", 4),
        ("relu", 64),
    ]
    soft = [r for r in rows if r["kernel_fn"] == "softmax"]
    assert soft[1]["rows_tv_mean"] < soft[0]["rows_tv_mean"]
    assert 0 < soft[0]["exact_entropy"] <= math.log(256) + 1e-9
    assert smallest_num_features(soft, soft[1]["rows_tv_mean"]) == 64
    assert smallest_num_features(soft, 1.0) == 4
    assert smallest_num_features(soft, 0.0) is None
