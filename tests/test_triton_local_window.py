"""The causal Triton kernels with a local exact window (``local_window``) against the windowed
reference op and its float64 evaluation: output and every gradient, the 2x rule.

Without a GPU the kernels run in the interpreter (``TRITON_INTERPRET=1``) on small shapes; with a GPU
the real sizes run too.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from _triton_checks import DEVICE, FLOOR, make_inputs, rel_err, small_windows  # noqa: E402

from randattn import RandMultiHeadAttention  # noqa: E402
from randattn.functional import KERNEL_MAX_WINDOW, rand_attention  # noqa: E402

CUDA = torch.cuda.is_available()


def _run(backend, q, k, v, projection, dout, key_mask, window, dtype=None):
    """``[out, dq, dk, dv]`` of causal softmax ``rand_attention`` with a local window (inputs cast to
    ``dtype`` when given: float64 for the exact values)."""
    leaves = [(t if dtype is None else t.to(dtype)).detach().clone().requires_grad_() for t in (q, k, v)]
    out = rand_attention(
        *leaves, projection, causal=True, key_padding_mask=key_mask, backend=backend, local_window=window
    )
    grads = torch.autograd.grad(out, leaves, dout.to(out.dtype))
    return [out.detach(), *grads]


def _check(inputs, window):
    """The 2x rule against the windowed reference in the same dtype, float64 values as the truth."""
    q = inputs[0]
    exact = _run("reference", *inputs, window, dtype=torch.float64)
    ref = _run("reference", *inputs, window)
    tri = _run("triton", *inputs, window)
    for name, e, r, t in zip(("out", "dq", "dk", "dv"), exact, ref, tri):
        assert t.dtype == q.dtype and t.shape == r.shape, name
        assert torch.isfinite(t).all(), f"{name} has non-finite values"
        err_t, err_r = rel_err(t, e), rel_err(r, e)
        assert err_t <= 2 * err_r + FLOOR[q.dtype], f"{name}: kernel error {err_t:.3e} > 2 x reference {err_r:.3e}"
    return tri


# (N, H, L, d, d_v, m): one chunk (L < 64), several chunks with a ragged last one, three feature blocks
SMALL = [(2, 2, 37, 16, 16, 32), (1, 2, 150, 16, 16, 32), (1, 1, 140, 32, 40, 160)]


@pytest.mark.parametrize("window", [1, 5, 63, 64])
@pytest.mark.parametrize("shape", SMALL, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mask", [None, "bool", "float"])
def test_matches_the_windowed_reference(shape, window, mask, gen):
    n, h, length, d, dv, m = shape
    inputs = make_inputs(n, h, length, length, d, dv, m, torch.float32, gen, scale=1.5, mask=mask)
    _check(inputs, window)


def test_window_of_the_whole_chunk_is_exact_attention_for_the_first_chunk(gen):
    """With ``local_window = 64`` every query of the first chunk weighs all its keys exactly: the
    output and gradients there are those of exact causal softmax attention."""
    q, k, v, projection, dout, _ = make_inputs(1, 2, 64, 64, 16, 16, 32, torch.float32, gen)
    tri = _run("triton", q, k, v, projection, dout, None, 64)
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    mask = torch.ones(64, 64, dtype=torch.bool, device=q.device).triu(1)
    logits = (leaves[0] @ leaves[1].transpose(-1, -2) / 4.0).masked_fill(mask, float("-inf"))
    out = torch.softmax(logits, -1) @ leaves[2]
    want = [out.detach(), *torch.autograd.grad(out, leaves, dout.double())]
    for got, w in zip(tri, want):
        assert rel_err(got, w) < 1e-5


@pytest.mark.parametrize("mode", ["kept", "recomputed", "windows"])
def test_states_kept_recomputed_or_in_windows_match(mode, gen, monkeypatch):
    """The local window across chunk and state-window boundaries: the backward with kept states, with
    recomputed ones and with states one window of chunks at a time all satisfy the 2x rule, and the
    last two give identical results (the same sums in the same order)."""
    from randattn.ops.causal import triton as kernels

    length, dtype = (2048, torch.bfloat16) if CUDA else (300, torch.float32)
    inputs = make_inputs(1, 2, length, length, 32, 16, 80, dtype, gen, scale=1.5, mask="bool")
    monkeypatch.setattr(kernels, "KEEP_STATES_MAX_BYTES", 0)
    want = _run("triton", *inputs, 48)
    monkeypatch.setattr(kernels, "KEEP_STATES_MAX_BYTES", 1 << 40 if mode == "kept" else 0)
    if mode == "windows":
        small_windows(kernels, monkeypatch, 80, 16)
        nt = -(-length // kernels.CHUNK)
        assert kernels._windows(2, nt, 80, 16, False, kernels._bytes(inputs[0])) < nt
    got = _check(inputs, 48)
    if mode == "windows":
        for a, b in zip(got, want):
            assert torch.equal(a, b)


def test_outputs_do_not_depend_on_later_tokens(gen):
    """Changing the keys and values after position 99 leaves the outputs up to 99 unchanged."""
    q, k, v, projection, dout, _ = make_inputs(1, 2, 150, 150, 16, 16, 32, torch.float32, gen, scale=1.5)
    a = _run("triton", q, k, v, projection, dout, None, 40)[0]
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 100:] *= 3.0
    v2[:, :, 100:] = -v2[:, :, 100:]
    b = _run("triton", q, k2, v2, projection, dout, None, 40)[0]
    torch.testing.assert_close(a[:, :, :100], b[:, :, :100], rtol=1e-6, atol=1e-6)


def test_module_runs_the_window_on_the_kernels(gen):
    """``RandMultiHeadAttention(local_window=...)`` with ``backend="triton"`` equals the reference
    backend (output and the input's gradient)."""
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    options = dict(batch_first=True, causal=True, num_random_features=32, local_window=24, seed=1)
    layers = [RandMultiHeadAttention(32, 2, backend=b, **options).to(DEVICE) for b in ("reference", "triton")]
    layers[1].load_state_dict(layers[0].state_dict())
    x = torch.randn(2, 90, 32, generator=gen).to(DEVICE)
    results = []
    for layer in layers:
        xx = x.clone().requires_grad_()
        out = layer(xx, xx, xx, need_weights=False)[0]
        results.append((out, torch.autograd.grad(out.square().sum(), xx)[0]))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)


def test_windows_beyond_the_kernels_name_the_argument(gen):
    q, k, v, projection, _, _ = make_inputs(1, 1, 20, 20, 16, 16, 16, torch.float32, gen)
    with pytest.raises(ValueError, match=f"local_window up to {KERNEL_MAX_WINDOW}"):
        rand_attention(q, k, v, projection, causal=True, backend="triton", local_window=KERNEL_MAX_WINDOW + 1)


def test_kernels_window_limit_is_their_chunk():
    from randattn.ops.causal import triton as kernels

    assert KERNEL_MAX_WINDOW == kernels.CHUNK
    with pytest.raises(ValueError, match="local window"):
        kernels.windowed(kernels.CHUNK + 1)


@pytest.mark.skipif(not CUDA, reason="needs a GPU")
def test_auto_backend_takes_the_kernels_up_to_their_limit(gen):
    """On CUDA ``backend="auto"`` gives the kernels' result for windows up to the limit and the
    reference's beyond it."""
    q, k, v, projection, dout, _ = make_inputs(1, 2, 300, 300, 32, 32, 64, torch.bfloat16, gen)
    for window, backend in ((KERNEL_MAX_WINDOW, "triton"), (KERNEL_MAX_WINDOW + 1, "reference")):
        auto = _run("auto", q, k, v, projection, dout, None, window)
        want = _run(backend, q, k, v, projection, dout, None, window)
        for a, b in zip(auto, want):
            assert torch.equal(a, b)


# ---- GPU sizes ---------------------------------------------------------------------------------

# (N, H, L, d, d_v, m)
GPU_SHAPES = [(2, 4, 1000, 64, 64, 256), (1, 2, 4096, 128, 64, 512), (2, 2, 2048, 32, 32, 64)]


@pytest.mark.skipif(not CUDA, reason="needs a GPU")
@pytest.mark.parametrize("window", [16, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gpu_sizes(shape, dtype, window, gen):
    n, h, length, d, dv, m = shape
    inputs = make_inputs(n, h, length, length, d, dv, m, dtype, gen, scale=1.0, mask="bool")
    _check(inputs, window)


@pytest.mark.skipif(not CUDA, reason="needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_long_sequence_is_finite(dtype, gen):
    """L = 65536 with the window: output and every gradient finite."""
    q, k, v, projection, dout, _ = make_inputs(1, 2, 65536, 65536, 64, 64, 256, dtype, gen, scale=1.5)
    for t in _run("triton", q, k, v, projection, dout, None, 64):
        assert torch.isfinite(t).all()
