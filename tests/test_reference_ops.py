"""The reference ops against exact attention and their own invariants."""

import pytest
import torch

from randattn.features import draw_projection
from randattn.functional import exact_attention, rand_attention


def _qkv(gen, n=2, h=2, length=40, s=None, d=8, dtype=torch.float64, scale=0.5):
    s = length if s is None else s
    q = torch.randn(n, h, length, d, generator=gen, dtype=dtype) * scale
    k = torch.randn(n, h, s, d, generator=gen, dtype=dtype) * scale
    v = torch.randn(n, h, s, d, generator=gen, dtype=dtype)
    return q, k, v


@pytest.mark.parametrize("kernel_fn", ["softmax", "relu"])
def test_key_padding_mask_equals_dropping_keys(gen, kernel_fn):
    q, k, v = _qkv(gen, s=30)
    w = draw_projection(32, 8, generator=gen)
    drop = torch.zeros(2, 30, dtype=torch.bool)
    drop[0, 5:12] = True
    drop[1, 20:] = True
    out = rand_attention(q, k, v, w, kernel_fn=kernel_fn, key_padding_mask=drop)
    for b in range(2):
        keep = ~drop[b]
        ref = rand_attention(q[b : b + 1], k[b : b + 1, :, keep], v[b : b + 1, :, keep], w, kernel_fn=kernel_fn)
        torch.testing.assert_close(out[b : b + 1], ref)
    # a float mask with -inf is the same mask
    bias = torch.zeros(2, 30, dtype=torch.float64).masked_fill(drop, float("-inf"))
    torch.testing.assert_close(rand_attention(q, k, v, w, kernel_fn=kernel_fn, key_padding_mask=bias), out)


@pytest.mark.parametrize("causal", [False, True])
def test_float_mask_folds_as_factor(gen, causal):
    """A float bias log(2) on key j counts that key twice; a constant bias changes nothing."""
    q, k, v = _qkv(gen, length=12)
    w = draw_projection(16, 8, generator=gen)
    base = rand_attention(q, k, v, w, causal=causal)
    shifted = rand_attention(q, k, v, w, causal=causal, key_padding_mask=torch.full((2, 12), -3.0))
    torch.testing.assert_close(shifted, base)
    if not causal:
        bias = torch.zeros(2, 12)
        bias[:, 4] = torch.log(torch.tensor(2.0))
        doubled_k = torch.cat([k, k[:, :, 4:5]], dim=2)
        doubled_v = torch.cat([v, v[:, :, 4:5]], dim=2)
        torch.testing.assert_close(
            rand_attention(q, k, v, w, key_padding_mask=bias), rand_attention(q, doubled_k, doubled_v, w)
        )


@pytest.mark.parametrize("kernel_fn", ["softmax", "relu"])
@pytest.mark.parametrize("causal", [False, True])
def test_fully_masked_rows_are_zero(gen, kernel_fn, causal):
    q, k, v = _qkv(gen, length=20, dtype=torch.float32)
    w = draw_projection(16, 8, generator=gen)
    mask = torch.zeros(2, 20, dtype=torch.bool)
    mask[0] = True
    if causal:
        mask[1, :5] = True
    out = rand_attention(q, k, v, w, kernel_fn=kernel_fn, causal=causal, key_padding_mask=mask)
    assert torch.isfinite(out).all()
    assert (out[0] == 0).all()
    if causal:
        assert (out[1, :, :5] == 0).all() and (out[1, :, 5:] != 0).any()


@pytest.mark.parametrize("kernel_fn", ["softmax", "relu"])
def test_causal_equals_prefix_noncausal_and_never_leaks(gen, kernel_fn):
    q, k, v = _qkv(gen, length=300, dtype=torch.float64)
    w = draw_projection(24, 8, generator=gen)
    out = rand_attention(q, k, v, w, kernel_fn=kernel_fn, causal=True)
    for t in (0, 1, 127, 128, 129, 255, 299):
        prefix = rand_attention(q[:, :, : t + 1], k[:, :, : t + 1], v[:, :, : t + 1], w, kernel_fn=kernel_fn)
        torch.testing.assert_close(out[:, :, t], prefix[:, :, -1])
    # change the future, including a key with a huge logit: the past does not move at all
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 150:] = torch.randn_like(k2[:, :, 150:]) * 6
    v2[:, :, 150:] = 100.0
    out2 = rand_attention(q, k2, v2, w, kernel_fn=kernel_fn, causal=True)
    torch.testing.assert_close(out2[:, :, :150], out[:, :, :150], rtol=0, atol=0)


def test_softmax_error_falls_with_m_against_exact(gen):
    q, k, v = _qkv(gen, n=1, h=2, length=64, d=16, scale=0.7)
    exact = exact_attention(q, k, v)
    errs = []
    for m in (16, 256, 4096):
        e = [
            (rand_attention(q, k, v, draw_projection(m, 16, generator=gen)) - exact).norm() / exact.norm()
            for _ in range(4)
        ]
        errs.append(torch.stack(e).mean().item())
    assert errs[0] > errs[1] > errs[2], errs


@pytest.mark.parametrize("kernel_fn", ["softmax", "relu"])
@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck_float64(gen, kernel_fn, causal):
    q, k, v = _qkv(gen, n=1, h=2, length=9, s=9 if causal else 7, d=4)
    w = draw_projection(6, 4, generator=gen).double()
    mask = torch.zeros(1, k.shape[2])
    mask[0, 2] = -0.7
    for t in (q, k, v):
        t.requires_grad_(True)

    def fn(q, k, v):
        return rand_attention(q, k, v, w, kernel_fn=kernel_fn, causal=causal, key_padding_mask=mask.double())

    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_half_precision_long_sequence_finite(gen, causal):
    """bf16/fp16 with realistic large logits (|q.k|/sqrt(d) up to ~30) stays finite."""
    n, h, length, d = 1, 1, 65536, 8
    q = torch.randn(n, h, length, d, generator=gen) * 3.2
    k = torch.randn(n, h, length, d, generator=gen) * 3.2
    v = torch.randn(n, h, length, d, generator=gen)
    w = draw_projection(8, d, generator=gen)
    for dtype in (torch.bfloat16, torch.float16):
        qq, kk, vv = (t.to(dtype).requires_grad_(True) for t in (q, k, v))
        out = rand_attention(qq, kk, vv, w, causal=causal)
        out.float().square().mean().backward()
        assert out.dtype == dtype and torch.isfinite(out).all()
        assert all(torch.isfinite(t.grad).all() for t in (qq, kk, vv))


def test_rand_attention_errors(gen):
    q, k, v = _qkv(gen, dtype=torch.float32)
    w = draw_projection(8, 8, generator=gen)
    with pytest.raises(ValueError, match="kernel_fn"):
        rand_attention(q, k, v, w, kernel_fn="gelu")
    with pytest.raises(ValueError, match="backend"):
        rand_attention(q, k, v, w, backend="cuda")
    with pytest.raises(ValueError, match="q must have shape"):
        rand_attention(q[0], k, v, w)
    with pytest.raises(ValueError, match="projection"):
        rand_attention(q, k, v, w[:, :4])
    with pytest.raises(ValueError, match="k and v"):
        rand_attention(q, k, v[:, :, :5], w)
    with pytest.raises(ValueError, match="causal attention needs L == S"):
        rand_attention(q, k[:, :, :5], v[:, :, :5], w, causal=True)
    with pytest.raises(ValueError, match="key_padding_mask must have shape"):
        rand_attention(q, k, v, w, key_padding_mask=torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="key_padding_mask must be a bool or floating"):
        rand_attention(q, k, v, w, key_padding_mask=torch.zeros(2, 40, dtype=torch.int64))


def test_triton_backend_rejects_unsupported_sizes(gen):
    pytest.importorskip("triton")
    q, k, v = _qkv(gen, d=8, dtype=torch.float32)
    with pytest.raises(ValueError, match="takes head dims up to 128"):
        rand_attention(q, k, v, draw_projection(600, 8, generator=gen), backend="triton")
