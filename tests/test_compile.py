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
    eager = model(x, mask)
    eager.sum().backward()
    grad_eager = x.grad.clone()
    x.grad = None
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager" if DEVICE == "cpu" else "inductor")
    out = compiled(x, mask)
    out.sum().backward()
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x.grad, grad_eager, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(DEVICE == "cpu", reason="inductor on the CPU needs a C++ toolchain; checked with aot_eager")
def test_compile_inductor_gpu_bf16_autocast():
    model = Block("auto", False).to(DEVICE)
    x = torch.randn(2, 300, 32, device=DEVICE, requires_grad=True)
    compiled = torch.compile(model, fullgraph=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = compiled(x, None)
    out.float().sum().backward()
    assert torch.isfinite(x.grad).all()


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
        out = torch.ops.randattn.noncausal_fwd(q, k, v, w, "softmax", None)[0]
        assert out.shape == (2, 3, 50, 8) and out.dtype == torch.bfloat16
        kc, vc = torch.empty(2, 3, 50, 16, dtype=torch.bfloat16), torch.empty(2, 3, 50, 8, dtype=torch.bfloat16)
        out = torch.ops.randattn.causal_fwd(q, kc, vc, w, "relu", None)[0]
        assert out.shape == (2, 3, 50, 8) and out.dtype == torch.bfloat16


@pytest.mark.parametrize("causal", [False, True])
def test_eager_path_equals_custom_ops(causal):
    """Outside ``torch.compile`` the kernels are called through an ``autograd.Function`` (less host
    overhead); its output and gradients equal those of the custom ops, strides included."""
    pytest.importorskip("triton")
    if DEVICE == "cpu":
        import os

        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("needs a GPU or TRITON_INTERPRET=1")
    from randattn.features import draw_projection
    from randattn.ops.causal.triton import causal_attention
    from randattn.ops.noncausal.triton import noncausal_attention

    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, 70, 16, generator=gen).to(DEVICE) for _ in range(3))
    dout = torch.randn(2, 2, 70, 16, generator=gen).to(DEVICE)
    w = draw_projection(32, 16, generator=gen).to(DEVICE)
    bias = torch.zeros(2, 70, device=DEVICE)
    bias[1, :5] = float("-inf")
    eager = causal_attention if causal else noncausal_attention
    op = torch.ops.randattn.causal_fwd if causal else torch.ops.randattn.noncausal_fwd
    results = []
    for fn in (lambda *a: eager(*a), lambda *a: op(*a)[0]):
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        out = fn(qq, kk, vv, w, "softmax", bias)
        results.append((out, *torch.autograd.grad(out, (qq, kk, vv), dout)))
    for a, b in zip(*results):
        assert a.stride() == b.stride()
        torch.testing.assert_close(a, b, rtol=0, atol=0)
