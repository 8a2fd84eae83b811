"""``torch.compile(fullgraph=True)`` of a model holding ``RandMultiHeadAttention``: the kernels are
custom ops with fake implementations and registered autograd, so the graph does not break.

On the CPU the reference path is compiled; with ``TRITON_INTERPRET=1`` the Triton custom ops too
(run eagerly inside the compiled graph). On a GPU the kernels run for real.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from randattn import RandMultiHeadAttention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


class Block(nn.Module):
    def __init__(self, backend: str, causal: bool) -> None:
        super().__init__()
        self.attn = RandMultiHeadAttention(32, 2, batch_first=True, num_random_features=16, causal=causal,
                                           backend=backend, seed=0)
        self.norm = nn.LayerNorm(32)

    def forward(self, x, mask):
        return self.norm(x + self.attn(x, x, x, key_padding_mask=mask, need_weights=False)[0])


def _backends():
    out = ["reference"]
    try:
        import triton  # noqa: F401
    except ImportError:
        return out
    return out + ["triton"]


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("causal", [False, True])
def test_compile_fullgraph_matches_eager(backend, causal):
    torch.manual_seed(0)
    model = Block(backend, causal).to(DEVICE)
    x = torch.randn(2, 21, 32, device=DEVICE, requires_grad=True)
    mask = torch.zeros(2, 21, dtype=torch.bool, device=DEVICE)
    mask[1, 15:] = True
    dout = torch.randn(2, 21, 32, device=DEVICE)  # (the block ends in a layer norm: the sum of its
    eager = model(x, mask)  # output, or of its squares, hardly depends on x)
    eager.backward(dout)
    grad_eager = x.grad.clone()
    assert grad_eager.norm() > 0.1 * dout.norm()
    x.grad = None
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager" if DEVICE == "cpu" else "inductor")
    out = compiled(x, mask)
    out.backward(dout)
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x.grad, grad_eager, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(DEVICE == "cpu", reason="inductor on the CPU needs a C++ toolchain; checked with aot_eager")
def test_compile_inductor_gpu_bf16_autocast():
    model = Block("auto", False).to(DEVICE)
    x = torch.randn(2, 300, 32, device=DEVICE, requires_grad=True)
    compiled = torch.compile(model, fullgraph=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = compiled(x, None)
    out.float().backward(torch.randn(out.shape, device=DEVICE))
    assert torch.isfinite(x.grad).all() and x.grad.norm() > 0


@pytest.mark.skipif(DEVICE == "cpu", reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_graph_replays_match_eager(causal):
    """``torch.compile(mode="reduce-overhead")`` records the layer's kernels in CUDA graphs and replays
    them: over training steps with new inputs (warm-up, recording, replays) the outputs and every
    gradient equal eager mode's. The compiled model runs first (nothing prepared by an eager call
    before), and a projection redrawn between replays reaches them."""
    torch.manual_seed(0)
    model = Block("triton", causal).to(DEVICE)
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    params = list(model.parameters())
    for step in range(5):
        if step == 4:
            model.attn.redraw_features()
        x = torch.randn(2, 300, 32, device=DEVICE)
        mask = torch.zeros(2, 300, dtype=torch.bool, device=DEVICE)
        mask[1, 200 + 20 * step :] = True
        dout = torch.randn(2, 300, 32, device=DEVICE)
        results = []
        for run in (compiled, model):
            if run is compiled:
                torch.compiler.cudagraph_mark_step_begin()
            leaf = x.clone().requires_grad_()
            model.zero_grad(set_to_none=True)
            out = run(leaf, mask)
            out.backward(dout)
            results.append([out.detach().clone(), leaf.grad.clone()] + [p.grad.clone() for p in params])
        # inductor fuses the layer norm and sums in another order: norm-wise float32 agreement
        for got, want in zip(*results):
            assert torch.isfinite(got).all()
            assert (got - want).norm() <= 1e-4 * want.norm(), (step, (got - want).norm() / want.norm())


def test_fake_implementations_give_shapes():
    """The fake (meta) implementations return the shapes and dtypes of the real ones."""
    pytest.importorskip("triton")
    from torch._subclasses.fake_tensor import FakeTensorMode

    import randattn.ops.causal.triton  # noqa: F401  (registers the ops)
    import randattn.ops.noncausal.triton  # noqa: F401

    with FakeTensorMode():
        q = torch.empty(2, 3, 50, 16, dtype=torch.bfloat16)
        k = torch.empty(2, 3, 40, 16, dtype=torch.bfloat16)
        v = torch.empty(2, 3, 40, 8, dtype=torch.bfloat16)
        w = torch.empty(32, 16)
        for keep in (False, True):  # the output kept for the backward: its int8 rest beside it
            out, lo = torch.ops.randattn.noncausal_fwd(q, k, v, w, "softmax", None, keep)[:2]
            assert out.shape == (2, 3, 50, 8) and out.dtype == torch.bfloat16
            assert lo.dtype == torch.int8 and lo.shape == (out.shape if keep else (0,))
            assert not keep or lo.stride() == out.stride()
        kc, vc = torch.empty(2, 3, 50, 16, dtype=torch.bfloat16), torch.empty(2, 3, 50, 8, dtype=torch.bfloat16)
        out = torch.ops.randattn.causal_fwd(q, kc, vc, w, "relu", None, 0)[0]
        assert out.shape == (2, 3, 50, 8) and out.dtype == torch.bfloat16
        out = torch.ops.randattn.causal_fwd(q, kc, vc, w, "softmax", None, 16)[0]
        assert out.shape == (2, 3, 50, 8) and out.dtype == torch.bfloat16


@pytest.mark.parametrize("causal,window,keep", [(False, 0, False), (False, 0, True), (True, 0, False), (True, 5, False)])
def test_eager_path_equals_custom_ops(causal, window, keep, monkeypatch):
    """Outside ``torch.compile`` the kernels are called through an ``autograd.Function`` (less host
    overhead); its output and gradients equal those of the custom ops, strides included (causal: also
    with a local window; non-causal: also with the output kept for the backward)."""
    pytest.importorskip("triton")
    if DEVICE == "cpu":
        import os

        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("needs a GPU or TRITON_INTERPRET=1")
    from randattn.features import draw_projection
    from randattn.ops.causal.triton import causal_attention
    from randattn.ops.noncausal import triton as noncausal_kernels
    from randattn.ops.noncausal.triton import noncausal_attention

    monkeypatch.setattr(noncausal_kernels, "T_FROM_OUTPUT_MIN_LENGTH", 0 if keep else 10**9)
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, 70, 16, generator=gen).to(DEVICE) for _ in range(3))
    dout = torch.randn(2, 2, 70, 16, generator=gen).to(DEVICE)
    w = draw_projection(32, 16, generator=gen).to(DEVICE)
    bias = torch.zeros(2, 70, device=DEVICE)
    bias[1, :5] = float("-inf")
    eager = causal_attention if causal else noncausal_attention
    op = torch.ops.randattn.causal_fwd if causal else torch.ops.randattn.noncausal_fwd
    results = []
    extra = (window,) if causal else (keep,)
    for fn in (lambda *a: eager(*a, *extra[:int(causal)]), lambda *a: op(*a, *extra)[0]):
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        out = fn(qq, kk, vv, w, "softmax", bias)
        results.append((out, *torch.autograd.grad(out, (qq, kk, vv), dout)))
    for a, b in zip(*results):
        assert a.stride() == b.stride()
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_compiled_layer_redraws_on_the_eager_schedule_without_recompiling():
    """``feature_redraw_interval`` under ``torch.compile``: the redraw runs outside the graph, on the
    same steps as in eager mode, and the step counter is not guarded on (one graph, not one per
    step); a full-graph compile names the argument, and with it unset a redraw between steps
    reaches the compiled graph."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    options = dict(num_random_features=16, seed=0, backend="reference", batch_first=True)
    eager = RandMultiHeadAttention(32, 2, feature_redraw_interval=3, **options)
    twin = RandMultiHeadAttention(32, 2, feature_redraw_interval=3, **options)
    twin.load_state_dict(eager.state_dict())
    compiled = torch.compile(twin, backend="aot_eager")
    draws = set()
    for _ in range(8):
        x = torch.randn(2, 7, 32)
        want, got = eager(x, x, x, need_weights=False)[0], compiled(x, x, x, need_weights=False)[0]
        assert torch.equal(eager.projection, twin.projection)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        draws.add(tuple(twin.projection.flatten().tolist()))
    assert len(draws) == 3  # redrawn before the 4th and 7th forwards
    assert counters["stats"]["unique_graphs"] <= 2

    torch._dynamo.reset()  # (a cached graph of the same code, compiled with breaks, would be reused)
    strict = torch.compile(RandMultiHeadAttention(32, 2, feature_redraw_interval=3, **options), fullgraph=True,
                           backend="aot_eager")
    with pytest.raises(Exception, match="feature_redraw_interval"):
        strict(x, x, x, need_weights=False)

    layer = RandMultiHeadAttention(32, 2, **options)
    graph = torch.compile(layer, fullgraph=True, backend="aot_eager")
    before = graph(x, x, x, need_weights=False)[0]
    layer.redraw_features()
    after = graph(x, x, x, need_weights=False)[0]
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, layer(x, x, x, need_weights=False)[0], rtol=1e-5, atol=1e-6)
