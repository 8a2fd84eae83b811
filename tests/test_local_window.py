"""Causal softmax attention with a local exact window (``local_window``): exact weights for the
latest keys, feature estimates for the earlier ones, against dense formulas and exact attention."""

import math

import pytest
import torch

from randattn import RandMultiHeadAttention
from randattn.decoding import WindowedDecodingState, empty_window_state, init_state, rand_attention_step
from randattn.features import draw_projection, feature_projection
from randattn.functional import rand_attention
from randattn.ops.causal.reference import windowed_causal_attention


def _qkv(gen, n=2, h=2, length=70, d=8, scale=0.8, dtype=torch.float64):
    q = torch.randn(n, h, length, d, generator=gen, dtype=dtype) * scale
    k = torch.randn(n, h, length, d, generator=gen, dtype=dtype) * scale
    v = torch.randn(n, h, length, d, generator=gen, dtype=dtype)
    return q, k, v


def _dense(q, k, v, projection, window, key_bias=None):
    """The definition, densely in float64: exact logits within the window, the log of the feature
    estimate (mean over features of exp(w.x + w.y - |x|^2/2 - |y|^2/2)) before it, one softmax."""
    d, m = q.shape[-1], projection.shape[0]
    x, y = q * d**-0.25, k * d**-0.25
    w = feature_projection(projection)
    exact = x @ y.transpose(-1, -2)
    lq = x @ w.T - 0.5 * (x * x).sum(-1, keepdim=True)
    lk = y @ w.T - 0.5 * (y * y).sum(-1, keepdim=True)
    estimate = torch.logsumexp(lq.unsqueeze(-2) + lk.unsqueeze(-3), -1) - math.log(m)
    positions = torch.arange(q.shape[-2])
    gap = positions[:, None] - positions[None, :]
    logits = torch.where(gap < window, exact, estimate).masked_fill(gap < 0, float("-inf"))
    if key_bias is not None:
        logits = logits + key_bias[:, None, None, :]
    return torch.softmax(logits, -1) @ v


@pytest.mark.parametrize("window", [1, 5, 32, 69])
@pytest.mark.parametrize("chunk_size", [8, 128])
def test_matches_the_dense_definition(gen, window, chunk_size):
    q, k, v = _qkv(gen)
    w = draw_projection(24, 8, generator=gen)
    out = windowed_causal_attention(q, k, v, w.double(), None, window, chunk_size=chunk_size)
    want = _dense(q, k, v, w, window)
    # the only difference is the query features' floor (1e-10 of each row's largest feature)
    torch.testing.assert_close(out, want, rtol=1e-7, atol=1e-7)


def test_window_covering_the_sequence_is_exact_causal_attention(gen):
    q, k, v = _qkv(gen, length=50)
    w = draw_projection(16, 8, generator=gen)
    out = rand_attention(q, k, v, w, causal=True, local_window=50)
    mask = torch.ones(50, 50, dtype=torch.bool).triu(1)
    logits = (q @ k.transpose(-1, -2) / math.sqrt(8)).masked_fill(mask, float("-inf"))
    torch.testing.assert_close(out, torch.softmax(logits, -1) @ v, rtol=1e-12, atol=1e-12)


def test_key_padding_mask_and_float_bias(gen):
    """Masked keys weigh nothing on either side of the window; a float bias multiplies a key's weight
    by e^b on both sides; a query with no kept key so far gets zeros."""
    q, k, v = _qkv(gen, n=2, length=40)
    w = draw_projection(16, 8, generator=gen)
    bias = torch.randn(2, 40, generator=gen, dtype=torch.float64)
    bias[0, :3] = float("-inf")
    bias[1, 10:25] = float("-inf")
    out = rand_attention(q, k, v, w, causal=True, key_padding_mask=bias, local_window=6)
    want = _dense(q, k, v, w, 6, key_bias=bias)
    assert torch.equal(out[0, :, :3], torch.zeros_like(out[0, :, :3]))
    torch.testing.assert_close(out[0, :, 3:], want[0, :, 3:], rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(out[1], want[1], rtol=1e-7, atol=1e-7)


def test_outputs_never_depend_on_later_tokens(gen):
    q, k, v = _qkv(gen, length=60)
    w = draw_projection(16, 8, generator=gen)
    out = rand_attention(q, k, v, w, causal=True, local_window=7)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    k2[..., 40:, :] = 30.0  # huge later logits
    v2[..., 40:, :] = -5.0
    q2[..., 40:, :] = 3.0
    out2 = rand_attention(q2, k2, v2, w, causal=True, local_window=7)
    assert torch.equal(out[..., :40, :], out2[..., :40, :])


def test_gradients_match_finite_differences(gen):
    q, k, v = (t.requires_grad_() for t in _qkv(gen, n=1, h=1, length=11, d=4))
    w = draw_projection(8, 4, generator=gen).double()
    assert torch.autograd.gradcheck(
        lambda q, k, v: windowed_causal_attention(q, k, v, w, None, 3, chunk_size=2), (q, k, v)
    )


def test_module_with_a_covering_window_equals_causal_multihead_attention(gen):
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(16, 2, batch_first=True).double()
    layer = RandMultiHeadAttention.from_mha(mha, causal=True, local_window=30, num_random_features=8)
    assert "local_window=30" in repr(layer)
    x = torch.randn(2, 30, 16, generator=gen, dtype=torch.float64)
    mask = torch.ones(30, 30, dtype=torch.bool).triu(1)
    want, want_weights = mha(x, x, x, attn_mask=mask, average_attn_weights=False)
    out, weights = layer(x, x, x, average_attn_weights=False)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(weights, want_weights, rtol=1e-10, atol=1e-10)


def test_module_weights_reproduce_the_output(gen):
    layer = RandMultiHeadAttention(16, 2, batch_first=True, causal=True, local_window=4, num_random_features=8)
    layer = layer.double()
    x = torch.randn(1, 25, 16, generator=gen, dtype=torch.float64)
    out, weights = layer(x, x, x, average_attn_weights=False)
    q, _, v = torch.nn.functional.linear(x, layer.in_proj_weight, layer.in_proj_bias).chunk(3, -1)
    v = v.unflatten(-1, (2, 8)).transpose(1, 2)
    heads = (weights @ v).transpose(1, 2).flatten(2)
    torch.testing.assert_close(layer.out_proj(heads), out, rtol=1e-10, atol=1e-10)


def test_low_precision_inputs_run_in_float32(gen):
    q, k, v = (t.to(torch.bfloat16) for t in _qkv(gen, length=33))
    w = draw_projection(16, 8, generator=gen)
    out = rand_attention(q, k, v, w, causal=True, local_window=4)
    want = _dense(q.double(), k.double(), v.double(), w, 4)
    assert out.dtype == torch.bfloat16
    assert ((out.double() - want).norm() / want.norm()).item() < 1e-2


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(causal=False, local_window=4), "causal=True"),
        (dict(causal=True, kernel_fn="relu", local_window=4), "kernel_fn='softmax'"),
        (dict(causal=True, backend="triton", local_window=65), "up to 64"),
        (dict(causal=True, local_window=0), "int >= 1"),
        (dict(causal=True, local_window=2.5), "int >= 1"),
        (dict(causal=True, local_window=True), "int >= 1"),
    ],
)
def test_bad_local_window_names_the_argument(gen, options, message):
    q, k, v = _qkv(gen, length=10)
    w = draw_projection(8, 8, generator=gen)
    with pytest.raises(ValueError, match="local_window") as info:
        rand_attention(q, k, v, w, **options)
    assert message in str(info.value)
    with pytest.raises(ValueError, match="local_window"):
        RandMultiHeadAttention(16, 2, **options)


@pytest.mark.parametrize("window", [1, 5, 16])
@pytest.mark.parametrize("sizes", [[1] * 40, [7, 1, 13, 19], [3, 37], [40]], ids=["tokens", "chunks", "short", "whole"])
def test_recurrent_decoding_with_a_window_matches_the_forward(window, sizes):
    """Feeding a sequence through ``step`` in pieces of any sizes gives the layer's outputs at every
    position; the state keeps at most ``window - 1`` latest positions beside the older keys' sums."""
    torch.manual_seed(0)
    layer = RandMultiHeadAttention(
        32, 4, batch_first=True, causal=True, num_random_features=24, local_window=window, seed=1
    ).eval()
    x = torch.randn(3, 40, 32, generator=torch.Generator().manual_seed(1)) * 2.0
    expected, _ = layer(x, x, x, need_weights=False)
    state = init_state(layer, 3)
    assert isinstance(state, WindowedDecodingState) and state.position == 0
    outs, start = [], 0
    for size in sizes:
        out, state = layer.step(x[:, start : start + size], state)
        outs.append(out)
        start += size
        assert state.position == start and state.keys.shape[-2] == min(window - 1, start)
        assert state.older.position == start - state.keys.shape[-2]
    got = torch.cat(outs, dim=1)
    per_pos = ((got - expected).norm(dim=-1) / expected.norm(dim=-1)).max().item()
    assert per_pos <= 1e-5


@pytest.mark.parametrize("chunk_size", [1, 4, 128])
def test_window_step_with_key_bias_matches_rand_attention(gen, chunk_size):
    """:func:`rand_attention_step` from a windowed state, in two blocks with float and dropped keys,
    equals ``rand_attention`` with the same ``local_window`` over the whole sequence (float64)."""
    q, k, v = _qkv(gen, length=30)
    w = draw_projection(16, 8, generator=gen)
    bias = torch.rand(2, 30, generator=gen, dtype=torch.float64) * 2 - 1
    bias[0, 3] = bias[1, 17] = bias[1, 18] = float("-inf")
    want = rand_attention(q, k, v, w, causal=True, key_padding_mask=bias, local_window=6)
    state = empty_window_state(2, 2, 16, 8, 8, 6, dtype=torch.float64)
    outs = []
    for part in (slice(0, 11), slice(11, 30)):
        out, state = rand_attention_step(
            q[..., part, :], k[..., part, :], v[..., part, :], w, state, key_bias=bias[:, part], chunk_size=chunk_size
        )
        outs.append(out)
    torch.testing.assert_close(torch.cat(outs, dim=-2), want, rtol=1e-10, atol=1e-10)


def test_window_state_errors_name_what_is_wrong(gen):
    q, k, v = _qkv(gen, length=4)
    w = draw_projection(16, 8, generator=gen)
    state = empty_window_state(2, 2, 16, 8, 8, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="kernel_fn"):
        rand_attention_step(q, k, v, w, state, kernel_fn="relu")
    _, state = rand_attention_step(q, k, v, w, state)
    assert state.keys.shape[-2] == 2
    with pytest.raises(ValueError, match="state.kv_sum"):
        rand_attention_step(q[:1], k[:1], v[:1], w, state)
    with pytest.raises(ValueError, match="state.values"):
        rand_attention_step(q, k, v, w, state._replace(values=state.values[..., :1, :]))
    twice = {name: torch.cat([getattr(state, name)] * 2, dim=-2) for name in ("keys", "values", "features")}
    twice |= {name: torch.cat([getattr(state, name)] * 2, dim=-1) for name in ("scales", "bias")}
    longer = state._replace(**twice)
    with pytest.raises(ValueError, match="at most 2"):
        rand_attention_step(q, k, v, w, longer)
    with pytest.raises(ValueError, match="local_window"):
        empty_window_state(2, 2, 16, 8, 8, 0)
