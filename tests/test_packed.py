"""Self-attention through the packed in-projection: the kernels read ``q, k, v`` in place from the
``(N, L, 3E)`` projection and write their gradients into one tensor; results equal the separate path."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from _triton_checks import DEVICE  # noqa: E402

from randattn import RandMultiHeadAttention  # noqa: E402
from randattn.features import draw_projection  # noqa: E402
from randattn.functional import packed_self_attention, projected_self_attention, rand_attention  # noqa: E402
from randattn.ops.eager import split_packed  # noqa: E402


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("kernel_fn", "dtype"), [("softmax", torch.float32), ("relu", torch.float32),
                                                  ("softmax", torch.bfloat16), ("softmax", torch.float16)])
def test_packed_equals_separate_views(causal, kernel_fn, dtype, gen):
    n, length, heads, d = 2, 45, 3, 16
    qkv = torch.randn(n, length, 3 * heads * d, generator=gen).to(DEVICE, dtype)
    w = draw_projection(32, d, generator=gen).to(DEVICE)
    mask = torch.zeros(n, length, dtype=torch.bool, device=DEVICE)
    mask[1, -7:] = True
    dout = torch.randn(n, heads, length, d, generator=gen).to(DEVICE, dtype)
    results = []
    for packed in (True, False):
        x = qkv.clone().requires_grad_()
        if packed:
            out = packed_self_attention(x, heads, w, kernel_fn=kernel_fn, causal=causal, key_padding_mask=mask,
                                        backend="triton")
        else:
            q, k, v = split_packed(x, heads)
            out = rand_attention(q, k, v, w, kernel_fn=kernel_fn, causal=causal, key_padding_mask=mask,
                                 backend="triton")
        (grad,) = torch.autograd.grad(out, x, dout)
        results.append((out, grad))
    (out_p, grad_p), (out_s, grad_s) = results
    assert grad_p.is_contiguous() and grad_p.shape == qkv.shape and grad_p.dtype == dtype
    torch.testing.assert_close(out_p, out_s, rtol=0, atol=0)
    torch.testing.assert_close(grad_p, grad_s, rtol=0, atol=0)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("batch_first", [True, False])
def test_module_self_attention_kernels_match_reference(causal, batch_first, gen):
    """The module takes the packed path for self-attention; output and every gradient (input and
    weights) agree with the reference backend."""
    torch.manual_seed(0)
    layer = RandMultiHeadAttention(32, 2, batch_first=batch_first, num_random_features=16, causal=causal,
                                   backend="triton", seed=1).to(DEVICE)
    ref = RandMultiHeadAttention(32, 2, batch_first=batch_first, num_random_features=16, causal=causal,
                                 backend="reference", seed=1).to(DEVICE)
    ref.load_state_dict(layer.state_dict())
    shape = (2, 37, 32) if batch_first else (37, 2, 32)
    x = torch.randn(*shape, generator=gen).to(DEVICE)
    pad = torch.zeros(2, 37, dtype=torch.bool, device=DEVICE)
    pad[0, -5:] = True
    outs = []
    for module in (layer, ref):
        xx = x.clone().requires_grad_()
        out = module(xx, xx, xx, key_padding_mask=pad, need_weights=False)[0]
        grads = torch.autograd.grad(out.square().sum(), [xx, *module.parameters()])
        outs.append((out, *grads))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_packed_rejects_a_bad_shape():
    with pytest.raises(ValueError, match="qkv must have shape"):
        packed_self_attention(torch.zeros(2, 5, 10), 2, torch.zeros(4, 5))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("with_bias", [True, False])
def test_projected_equals_linear_then_packed(causal, dtype, with_bias, gen):
    """In-projection inside the attention's autograd node == ``F.linear`` then the packed kernels: same
    output, and the same gradients of ``x``, ``W`` and ``b`` (autocast to bf16 for the bf16 case)."""
    n, length, embed, heads, m = 2, 29, 32, 2, 16
    x = torch.randn(n, length, embed, generator=gen).to(DEVICE)
    weight = (torch.randn(3 * embed, embed, generator=gen) / embed**0.5).to(DEVICE)
    bias = torch.randn(3 * embed, generator=gen).to(DEVICE) if with_bias else None
    w = draw_projection(m, embed // heads, generator=gen).to(DEVICE)
    mask = torch.zeros(n, length, dtype=torch.bool, device=DEVICE)
    mask[1, -4:] = True
    autocast = dtype == torch.bfloat16
    if not autocast:
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    results = []
    for fused in (True, False):
        leaves = [t.clone().requires_grad_() for t in (x, weight, bias) if t is not None]
        xx, ww, bb = leaves[0], leaves[1], leaves[2] if with_bias else None
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
            if fused:
                out = projected_self_attention(xx, ww, bb, heads, w, causal=causal, key_padding_mask=mask,
                                               backend="triton")
            else:
                qkv = torch.nn.functional.linear(xx, ww, bb)
                out = packed_self_attention(qkv, heads, w, causal=causal, key_padding_mask=mask, backend="triton")
        assert out.dtype == (torch.bfloat16 if autocast else dtype)
        grads = torch.autograd.grad(out.float().square().sum(), leaves)
        results.append((out, *grads))
    tol = {torch.float32: dict(rtol=1e-5, atol=1e-5)}.get(dtype, dict(rtol=1e-2, atol=1e-2))
    for name, a, b in zip(("out", "dx", "dW", "db"), *results):
        assert a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, **tol, msg=name)


def test_projected_without_input_gradient_and_bad_shapes(gen):
    x = torch.randn(1, 20, 16, generator=gen).to(DEVICE)
    weight = torch.randn(48, 16, generator=gen).to(DEVICE).requires_grad_()
    w = draw_projection(16, 8, generator=gen).to(DEVICE)
    out = projected_self_attention(x, weight, None, 2, w, backend="triton")
    (grad,) = torch.autograd.grad(out.sum(), [weight])  # x needs no gradient, there is no bias
    out = packed_self_attention(torch.nn.functional.linear(x, weight), 2, w, backend="triton")
    torch.testing.assert_close(grad, torch.autograd.grad(out.sum(), [weight])[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="in_proj_weight must have shape"):
        projected_self_attention(x, weight[:40], None, 2, w, backend="triton")
    with pytest.raises(ValueError, match="in_proj_bias must have shape"):
        projected_self_attention(x, weight, torch.zeros(47, device=DEVICE), 2, w, backend="triton")
    with pytest.raises(ValueError, match="x must have shape"):
        projected_self_attention(x[0], weight, None, 2, w, backend="triton")


@pytest.mark.parametrize("rows", [1, 255, 256, 1000])
def test_column_sums_in_two_stages_equal_a_float64_sum(rows, gen):
    from randattn.ops.eager import column_sums

    t = torch.randn(rows, 7, generator=gen).to(torch.bfloat16)
    total = column_sums(t, group=256)
    assert total.dtype == torch.float32
    torch.testing.assert_close(total.double(), t.double().sum(0), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("layout", ["contiguous", "strided", "offset"])
def test_packed_views_are_the_split_views(layout, gen):
    """The kernels' ``as_strided`` views address exactly the elements of ``split_packed``'s views."""
    from randattn.ops.eager import packed_views

    base = torch.randn(3, 2 * 5, 2 * 24, generator=gen)
    qkv = {
        "contiguous": base[:, :5, :24].contiguous(),
        "strided": base[:, ::2, ::2],  # every stride above one element
        "offset": base[1:, 3:8, 24:],  # a view starting inside its storage
    }[layout]
    for got, want in zip(packed_views(qkv, 4), split_packed(qkv, 4)):
        assert got.shape == want.shape and got.stride() == want.stride()
        assert got.data_ptr() == want.data_ptr()
        assert torch.equal(got, want)
