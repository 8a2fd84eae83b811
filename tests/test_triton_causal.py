"""Causal Triton kernels against the reference op and a float64 evaluation (output and gradients).

On a machine without a GPU the kernels run in the Triton interpreter (``TRITON_INTERPRET=1``, set in
``conftest.py``) on small shapes; with a GPU the larger cases run too.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from _triton_checks import (  # noqa: E402
    DEVICE,
    check_against_reference,
    check_forward_without_gradients,
    make_inputs,
    run,
    small_windows,
)

CUDA = torch.cuda.is_available()

# (N, H, L, S, d, d_v, m)
SMALL = [(2, 2, 37, 37, 16, 16, 32), (1, 2, 150, 150, 32, 16, 16)]


@pytest.mark.parametrize("kernel_fn", ["softmax", "relu"])
@pytest.mark.parametrize("shape", SMALL, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mask", [None, "bool", "float"])
def test_matches_reference_fp32(kernel_fn, shape, mask, gen):
    n, h, length, s_len, d, dv, m = shape
    inputs = make_inputs(n, h, length, s_len, d, dv, m, torch.float32, gen, scale=1.5, mask=mask)
    check_against_reference(*inputs, kernel_fn, causal=True)


@pytest.mark.parametrize("kernel_fn", ["softmax", "relu"])
def test_several_feature_blocks(kernel_fn, gen):
    """m = 160: three feature blocks of 64 (the last one partial), each walked by the state kernels
    in programs of fewer features, several chunks, ragged length."""
    inputs = make_inputs(1, 2, 150, 150, 16, 40, 160, torch.float32, gen, scale=1.5, mask="bool")
    check_against_reference(*inputs, kernel_fn, causal=True)


@pytest.mark.parametrize("mode", ["kept", "recomputed", "windows", "wider-forward-windows"])
@pytest.mark.parametrize("kernel_fn", ["softmax", "relu"])
def test_carried_states_kept_recomputed_or_windowed_match(kernel_fn, mode, gen, monkeypatch):
    """The backward with the forward's carried states (and the output's lo half), with states it
    recomputes (long sequences; ``t = dout . out / den`` from the float32 output recomputed), and with
    states that exist one window of chunks at a time in both passes (a ragged last window; the
    forward's windows as wide or twice as wide as the backward's): all match the reference, and the
    last three each other exactly (a window's scan starts from the previous window's final state, so
    every sum runs in the same order)."""
    from randattn.ops.causal import triton as kernels

    length, dtype = (2048, torch.bfloat16) if CUDA else (300, torch.float32)
    inputs = make_inputs(1, 2, length, length, 32, 16, 80, dtype, gen, scale=1.5, mask="bool")
    monkeypatch.setattr(kernels, "KEEP_STATES_MAX_BYTES", 0)
    want = run("triton", *inputs, kernel_fn, True)
    monkeypatch.setattr(kernels, "KEEP_STATES_MAX_BYTES", 1 << 40 if mode == "kept" else 0)
    if "windows" in mode:  # windows of 2 chunks (CPU) or 16 (GPU): 3 and 2 windows, the last one short
        small_windows(kernels, monkeypatch, 80, 16)
    if mode == "wider-forward-windows":  # the forward's (given the bytes of k and v) twice as wide
        windows = kernels._windows
        monkeypatch.setattr(kernels, "_windows", lambda *a: windows(*a) * (2 if len(a) > 6 else 1))
    nw = kernels._windows(2, -(-length // kernels.CHUNK), 80, 16, mode == "kept", kernels._bytes(inputs[0]))
    assert (nw < -(-length // kernels.CHUNK)) == ("windows" in mode)
    saved = kernels.forward_saving(*inputs[:4], kernel_fn, None)[1]
    assert (saved[-2].numel() > 0) == (saved[1].numel() > 0) == (mode == "kept")
    check_against_reference(*inputs, kernel_fn, causal=True)
    if mode != "kept":
        for a, b in zip(run("triton", *inputs, kernel_fn, True), want):
            assert torch.equal(a, b)


@pytest.mark.parametrize("unroll", [2, 3])
@pytest.mark.parametrize("kernel_fn", ["softmax", "relu"])
def test_chunks_per_step_of_the_state_walks_change_nothing(kernel_fn, unroll, gen, monkeypatch):
    """The sequential state kernels taking 2 or 3 chunks per step give the output and gradients of
    1 chunk per step bit for bit (the states are summed in the same order). Windows of 3 (2) chunks
    for 2 (3) per step: steps run past the end of windows whose final state the next window takes."""
    from randattn.ops.causal import triton as kernels

    length, dtype = (2048, torch.bfloat16) if CUDA else (500, torch.float32)
    inputs = make_inputs(1, 2, length, length, 32, 16, 80, dtype, gen, scale=1.5, mask="bool")
    chunks = 16 if CUDA else 5 - unroll
    monkeypatch.setattr(kernels, "KEEP_STATES_MAX_BYTES", 0)
    monkeypatch.setattr(kernels, "STABILISER_CHUNKS", chunks if CUDA else 1)
    monkeypatch.setattr(kernels, "STATE_WINDOW_BYTES", chunks * 2 * 80 * 16 * 4)
    monkeypatch.setattr(kernels, "STATE_WINDOW_PER_Q", 0)
    monkeypatch.setattr(kernels, "STATE_WINDOW_KV", 0)
    monkeypatch.setattr(kernels, "STATE_UNROLL", 1)
    want = run("triton", *inputs, kernel_fn, True)
    monkeypatch.setattr(kernels, "STATE_UNROLL", unroll)
    got = run("triton", *inputs, kernel_fn, True)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("keep", [False, True])
def test_backward_holds_the_output_only_beside_kept_states(keep, gen, monkeypatch):
    """With recomputed states the backward needs no output, so the autograd node holds none of it
    (a layer's output is then freed once the layers after it are done with it); beside kept states
    it holds the output's storage (``t`` comes from its two halves)."""
    from randattn.ops.causal import triton as kernels
    from randattn.ops.eager import KernelAttention

    monkeypatch.setattr(kernels, "KEEP_STATES_MAX_BYTES", 1 << 40 if keep else 0)
    q, k, v, projection, dout, _ = make_inputs(1, 2, 130, 130, 16, 16, 32, torch.float32, gen)
    q.requires_grad_(True)
    out = KernelAttention.apply(kernels, q, k, v, projection, "softmax", None)
    held = {t.untyped_storage().data_ptr() for t in out.grad_fn.saved_tensors if t is not None and t.numel()}
    assert (out.untyped_storage().data_ptr() in held) == keep
    (dq,) = torch.autograd.grad(out, q, dout)
    want = run("reference", q.detach(), k, v, projection, dout, None, "softmax", True)[1]
    torch.testing.assert_close(dq, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_forward_without_gradients_keeps_nothing(dtype, gen, monkeypatch):
    """Where kept states would hold the states and the output's lo half for the backward, a forward
    that needs no gradients (inference) keeps neither and gives the same output (to the rounding of
    the recomputed-states path)."""
    from randattn.ops.causal import triton as kernels

    monkeypatch.setattr(kernels, "KEEP_STATES_MAX_BYTES", 1 << 40)
    q, k, v, projection, _, _ = make_inputs(1, 2, 130, 130, 16, 16, 32, dtype, gen)
    check_forward_without_gradients(kernels, q, k, v, projection, q.numel())


@pytest.mark.parametrize("windows", [False, True])
@pytest.mark.parametrize("kernel_fn", ["softmax", "relu"])
def test_carried_states_are_the_sums_over_earlier_keys(kernel_fn, windows, gen, monkeypatch):
    """The forward's stabilisers are ``c = cummax(max(r, floor))`` of the keys' logit maxima and its
    carried states ``S_t = sum_{j < tC} phi_k[j] e^{-cprev_t} v_j`` (with ``z_t`` likewise) against a
    float64 computation from the definition, in one window or several (each window's states
    starting from the previous window's final state); the backward's recomputation (the same kernel
    from the forward's stabilisers) gives them bit for bit."""
    from _triton_checks import _bias

    from randattn.features import RELU_EPS, scaled_projection
    from randattn.ops._triton_utils import launch_sizes, prepare_projection
    from randattn.ops.causal import triton as kernels
    from randattn.ops.feature_maps import STABILISER_FLOOR

    length, d, dv, m = (2048 if CUDA else 300), 32, 16, 80
    q, k, v, projection, _, key_mask = make_inputs(1, 2, length, length, d, dv, m, torch.float32, gen, 1.5, "bool")
    if windows:  # windows of 2 chunks (CPU) or 16 (GPU), the last one short
        small_windows(kernels, monkeypatch, m, dv)
    sz = launch_sizes(q, v, projection, kernel_fn)
    w = prepare_projection(projection, q.dtype)
    nt, chunk = -(-length // kernels.CHUNK), kernels.CHUNK
    nw = kernels._windows(2, nt, m, dv, False, kernels._bytes(q))
    assert (nw < nt) == windows
    bias = _bias(key_mask)
    # float64 features of every key, without a stabiliser (softmax: logits s_k, kept exponentiated later)
    y, vv = k.double().flatten(0, 1), v.double().flatten(0, 1)
    wp = scaled_projection(projection).double()
    proj, mag = y @ wp.T, y.abs() @ wp.abs().T  # the logits and their terms' magnitudes
    b = bias.double().repeat_interleave(2, 0)[:, :, None]
    if kernel_fn == "softmax":
        s = proj - 0.5 * d**-0.5 * (y * y).sum(-1, keepdim=True) + b
        mag = mag + 0.5 * d**-0.5 * (y * y).sum(-1, keepdim=True) + torch.where(b.isfinite(), b.abs(), 0)
        c = torch.cummax(s.amax(-1).clamp_min(STABILISER_FLOOR), dim=-1).values
    else:
        phi = (torch.relu(proj) * m**-0.5 + RELU_EPS) * b.exp()
        c = torch.zeros(2, length, dtype=torch.float64, device=k.device)
    fwd = kernels._States(k, v, w, bias, sz, nw)
    bwd = kernels._KnownStates(k, v, w, bias, sz, nw, fwd.c, fwd.cprev, fwd.cend, fwd.decay)
    for t0, steps in kernels._window_starts(nt, nw):
        fwd.window(t0, steps)
        bwd.window(t0, steps)
        for t in range(t0, t0 + steps):
            cprev = fwd.cprev[:, t].double()[:, None, None]
            before = slice(0, t * chunk)
            p = (s[:, before] - cprev).exp() if kernel_fn == "softmax" else phi[:, before] * (-cprev).exp()
            want, want_z = p.transpose(1, 2) @ vv[:, before], p.sum(1)
            got, got_z = fwd.a[:, t - t0].double(), fwd.za[:, t - t0].double()
            # a bound per entry from the magnitudes of its terms (with cancellation an entry keeps
            # that absolute error, so its own size is no bound): each term's float32 rounding (its
            # logit's error is float32's unit times the logit's terms' magnitudes) and the float32
            # sums of a chunk's 64 products (tensor cores accumulate with truncation on a GPU)
            err = p * (mag[:, before] + cprev.abs() + 1) if kernel_fn == "softmax" else p + mag[:, before] * m**-0.5 * (-cprev).exp()
            err = 2**-20 * err + 2**-17 * p
            size, size_z = err.transpose(1, 2) @ vv[:, before].abs(), err.sum(1)
            assert ((got - want).abs() <= size).all(), (got - want).abs().div(size).max()
            assert ((got_z - want_z).abs() <= size_z).all(), (got_z - want_z).abs().div(size_z).max()
        assert torch.equal(bwd.a[:, :steps], fwd.a[:, :steps]) and torch.equal(bwd.za[:, :steps], fwd.za[:, :steps])
    torch.testing.assert_close(fwd.c.double(), c, rtol=1e-6, atol=1e-4)  # (the floor, -1e30, in float32)


@pytest.mark.parametrize("kernel_fn", ["softmax", "relu"])
def test_recomputed_backward_does_not_depend_on_the_forwards_passes(kernel_fn, gen, monkeypatch):
    """With recomputed states the forward's output product may round once (its output is only
    rounded to the input dtype); the backward recomputes what it needs of the forward (``t`` and the
    denominators) at full precision, so its gradients are bit-equal whatever the forward's passes
    (bfloat16, where the passes differ; before the denominators were recomputed, one pass gave dk 3.3x
    the reference's error on the H100)."""
    from randattn.ops._triton_utils import PRECISION
    from randattn.ops.causal import triton as kernels

    monkeypatch.setattr(kernels, "KEEP_STATES_MAX_BYTES", 0)
    inputs = make_inputs(1, 2, 150, 150, 16, 16, 16, torch.bfloat16, gen, scale=1.5, mask="bool")
    results = []
    for passes in (1, 3):
        monkeypatch.setattr(PRECISION, "fwd_mixed", passes)
        results.append(run("triton", *inputs, kernel_fn, True))
    assert not torch.equal(results[0][0], results[1][0])  # the forward's outputs do differ
    for a, b in zip(results[0][1:], results[1][1:]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("windows", [False, True])
@pytest.mark.parametrize("kernel_fn", ["softmax", "relu"])
def test_bfloat16_forward_states_change_nothing(kernel_fn, windows, gen, monkeypatch):
    """With recomputed states and a one-pass output product, the forward stores its states in
    bfloat16 (the product reads them rounded to bfloat16 anyway): the stored states are the float32
    ones rounded (the carry between windows stays float32), the float32 output before its rounding
    (the output kernel writing float32) and the op's output and gradients are bit-equal to float32
    storage, in one window and in windows whose state carries over."""
    from _triton_checks import _bias

    from randattn.ops._triton_utils import PRECISION, launch_sizes, prepare_projection
    from randattn.ops.causal import triton as kernels

    monkeypatch.setattr(kernels, "KEEP_STATES_MAX_BYTES", 0)
    monkeypatch.setattr(PRECISION, "fwd_mixed", 1)
    length, d, dv, m = (2048 if CUDA else 300), 32, 16, 80
    if windows:  # windows of 2 chunks (CPU) or 16 (GPU), the last one short
        small_windows(kernels, monkeypatch, m, dv, state_bytes=2)
    inputs = make_inputs(1, 2, length, length, d, dv, m, torch.bfloat16, gen, scale=1.5, mask="bool")
    q, k, v, projection, _, key_mask = inputs
    nt = -(-length // kernels.CHUNK)
    nw = kernels._windows(2, nt, m, dv, False, kernels._bytes(q), 0, 2)
    assert (nw < nt) == windows
    sz = launch_sizes(q, v, projection, kernel_fn)
    w = prepare_projection(projection, q.dtype)
    bias = _bias(key_mask)
    outputs = []
    for dtype in (torch.bfloat16, torch.float32):
        states = kernels._States(k, v, w, bias, sz, nw, dtype)
        lag = kernels._Lag(states.a, states.za, 0, nt)
        out = torch.zeros(1, length, 2, dv, device=q.device).permute(0, 2, 1, 3)  # heads last, float32
        cq, den = torch.empty(2, length, device=q.device), torch.empty(2, length, device=q.device)
        kept = []
        for t0, steps in kernels._window_starts(nt, nw):
            states.window(t0, steps)
            kept.append(states.a[:, :steps].clone())
            kernels._out_launch(q, k, v, w, bias, states, sz, t0, steps, out, out, cq, den, lag, mode=1)
        outputs.append((torch.cat(kept, 1), out, cq, den))
    (a16, *lean), (a32, *full) = outputs
    if not CUDA:  # the interpreter rounds float32 to bfloat16 by truncation
        a32 = (a32.view(torch.int32) & -65536).view(torch.float32)
    assert a16.dtype == torch.bfloat16 and torch.equal(a16, a32.to(torch.bfloat16))
    for a, b in zip(lean, full):
        assert torch.equal(a, b)
    results = []
    for lean_states in (True, False):
        monkeypatch.setattr(kernels, "BF16_FORWARD_STATES", lean_states)
        want = torch.bfloat16 if lean_states else torch.float32
        assert kernels._forward_state_dtype(torch.bfloat16, False) == want
        results.append(run("triton", *inputs, kernel_fn, True))
    for a, b in zip(*results):
        assert torch.equal(a, b)
    assert kernels._forward_state_dtype(torch.bfloat16, True) == torch.float32  # kept: the backward reads them
    assert kernels._forward_state_dtype(torch.float32, False) == torch.float32
    monkeypatch.setattr(PRECISION, "fwd_mixed", 3)
    assert kernels._forward_state_dtype(torch.bfloat16, False) == torch.float32  # a split product


@pytest.mark.parametrize("kernel_fn", ["softmax", "relu"])
def test_custom_op_outputs_do_not_alias(kernel_fn, gen):
    """The forward custom op returns distinct storages (a custom op's outputs may not alias each
    other), also for the ReLU kernel, whose stabilisers are constants."""
    import randattn.ops.causal.triton  # noqa: F401  (registers the op)

    q, k, v, projection, _, _ = make_inputs(1, 2, 100, 100, 16, 16, 32, torch.float32, gen)
    outputs = [t for t in torch.ops.randattn.causal_fwd(q, k, v, projection, kernel_fn, None, 0) if t.numel()]
    assert len({t.untyped_storage().data_ptr() for t in outputs}) == len(outputs) >= 8


@pytest.mark.parametrize("forward", [False, True])
@pytest.mark.parametrize("floor", [1 << 20, 64 << 20])
@pytest.mark.parametrize("keep", [False, True])
@pytest.mark.parametrize("nt", [1, 127, 128, 129, 256, 1024, 4099])
@pytest.mark.parametrize("nh, m, dv, d", [(32, 256, 64, 64), (2, 16, 16, 16), (64, 512, 128, 128)])
def test_window_sizes(nh, m, dv, d, nt, keep, floor, forward, monkeypatch):
    """One window for kept states and states within the budget (twice the bytes of a bf16 ``q`` or
    the set floor, whichever is more; the forward's also the bytes of ``k`` and ``v``), at every
    length; otherwise the largest multiple of the stabiliser's chunks whose states fit (at least
    one such multiple)."""
    from randattn.ops.causal import triton as kernels

    monkeypatch.setattr(kernels, "STATE_WINDOW_BYTES", floor)
    q = torch.empty(nh, nt * kernels.CHUNK, d, dtype=torch.bfloat16, device="meta")
    v = torch.empty(nh, nt * kernels.CHUNK, dv, dtype=torch.bfloat16, device="meta")
    assert kernels._bytes(q) == nh * nt * kernels.CHUNK * d * 2
    kv_bytes = kernels._bytes(q) + kernels._bytes(v) if forward else 0
    budget = max(floor, 2 * nh * nt * kernels.CHUNK * d * 2) + kv_bytes
    nw = kernels._windows(nh, nt, m, dv, keep, kernels._bytes(q), kv_bytes)
    per_chunk = nh * m * dv * 4
    if keep or nt * per_chunk <= budget:
        assert nw == nt
        return
    step = kernels.STABILISER_CHUNKS
    if nt <= step:  # no multiple of the stabiliser's chunks is shorter: one window, no larger buffer
        assert nw == nt
        return
    assert nw % step == 0 and 0 < nw < nt
    assert nw == step or nw * per_chunk <= budget
    assert (nw + step) * per_chunk > budget
    starts = kernels._window_starts(nt, nw)
    assert [t0 for t0, _ in starts] == list(range(0, nt, nw)) and sum(n for _, n in starts) == nt
    assert kernels._window_starts(nt, nw, reverse=True) == starts[::-1]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_matches_reference_low_precision(dtype, gen):
    inputs = make_inputs(2, 1, 90, 90, 16, 32, 32, dtype, gen, mask="bool")
    check_against_reference(*inputs, "softmax", causal=True)


def test_fully_masked_rows_are_zero_and_gradients_finite(gen):
    q, k, v, projection, dout, _ = make_inputs(2, 2, 30, 30, 16, 16, 16, torch.float32, gen)
    mask = torch.zeros(2, 30, dtype=torch.bool, device=DEVICE)
    mask[0] = True
    out, dq, dk, dv = run("triton", q, k, v, projection, dout, mask, "softmax", True)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert out[1].abs().sum() > 0
    for g in (dq, dk, dv):
        assert torch.isfinite(g).all()
    assert torch.equal(dq[0], torch.zeros_like(dq[0]))


def test_leading_masked_keys_give_zero_rows(gen):
    """Queries before the first kept key have no keys: zero output, finite gradients."""
    q, k, v, projection, dout, _ = make_inputs(1, 2, 80, 80, 16, 16, 32, torch.float32, gen)
    mask = torch.zeros(1, 80, dtype=torch.bool, device=DEVICE)
    mask[0, :70] = True
    out, dq, dk, dv = run("triton", q, k, v, projection, dout, mask, "softmax", True)
    assert torch.equal(out[:, :, :70], torch.zeros_like(out[:, :, :70]))
    assert (out[:, :, 70:].abs().sum(-1) > 0).all()
    for g in (dq, dk, dv):
        assert torch.isfinite(g).all()


def test_future_keys_do_not_change_the_past(gen):
    """Changing the keys and values after position p leaves outputs up to p unchanged (also their scale)."""
    q, k, v, projection, dout, _ = make_inputs(1, 2, 100, 100, 16, 16, 32, torch.float32, gen)
    out = run("triton", q, k, v, projection, dout, None, "softmax", True)[0]
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 60:] *= 6.0
    v2[:, :, 60:] = 1e3
    out2 = run("triton", q, k2, v2, projection, dout, None, "softmax", True)[0]
    torch.testing.assert_close(out[:, :, :60], out2[:, :, :60], rtol=0, atol=0)


@pytest.mark.parametrize("length", [1, 7, 8, 37, 70])
@pytest.mark.parametrize("window", [None, 4], ids=["whole", "windows"])
def test_stabiliser_kernel_equals_the_cummax_formula(length, window, gen):
    """``c = cummax(max(max_b r, floor))``, each chunk's end and the previous chunk's end (``c_0`` for
    chunk 0), over several programs of the kernel (chunks of 4, 2 chunks per program, the running
    maximum before a program from the chunks' maxima), with dropped keys (``-inf`` rows, also at the
    start); in one call, or window by window (4 chunks each, row maxima of the window only)."""
    from randattn.ops.causal.triton import _stabiliser_kernel
    from randattn.ops.feature_maps import STABILISER_FLOOR

    nh, nmb, chunk = 3, 3, 4
    nt = -(-length // chunk)
    rp = (torch.randn(nh, length, nmb, generator=gen) * 50).to(DEVICE)
    rp[0, : min(3, length)] = float("-inf")  # the first keys of head 0 dropped
    rp[1, length // 2 :: 3] = float("-inf")
    rp[2, :, 1] = float("-inf")
    # the chunks' maxima per feature block, floored (as the chunk-maximum kernel writes them)
    padded = torch.full((nh, nt * chunk, nmb), float("-inf"), device=DEVICE)
    padded[:, :length] = rp
    mb = padded.view(nh, nt, chunk, nmb).amax(2).clamp_min(STABILISER_FLOOR)
    shapes = ((nh, length), (nh, nt), (nh, nt), (nh, nt))
    c, cend, cprev, decay = (torch.full(shape, float("nan"), device=DEVICE) for shape in shapes)
    nw = nt if window is None else window
    for t0 in range(0, nt, nw):
        steps = min(nw, nt - t0)
        rp_window = torch.full((nh, nw * chunk, nmb), float("nan"), device=DEVICE)
        part = rp[:, t0 * chunk : (t0 + nw) * chunk]
        rp_window[:, : part.shape[1]] = part
        _stabiliser_kernel[(-(-steps // 2), nh)](
            rp_window, mb, c, cend, cprev, decay, length, nt, nmb, t0, nw,
            BLOCK_NMB=4, BLOCK_C=chunk, CHUNKS=2, BLOCK_T=2,
        )  # fmt: skip
    want = torch.cummax(rp.amax(-1).clamp_min(STABILISER_FLOOR), dim=-1).values
    last = torch.clamp(torch.arange(nt, device=DEVICE) * chunk + chunk - 1, max=length - 1)
    want_end = want[:, last]
    want_prev = torch.cat([want[:, :1], want_end[:, :-1]], dim=1)
    assert torch.equal(c, want) and torch.equal(cend, want_end) and torch.equal(cprev, want_prev)
    # the GPU's exp of x rounds x log2(e) first: relative error up to ~|x| 1e-7
    torch.testing.assert_close(decay, torch.exp(want_prev - want_end), rtol=3e-5, atol=1e-30)
    assert (decay <= 1).all()  # the scales never grow along the chunks


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_first_key_far_below_its_chunk(dtype, gen):
    """Key 0's largest logit ``y . w - |y|^2 / 2`` some 200 below the later keys' in the same chunk: the
    first chunk's scale must not be its end's, where ``exp(c_end - c_0)`` overflows to inf (seen as
    NaN outputs in a character-level model trained with bfloat16 autocast)."""
    from randattn.features import feature_projection

    q, k, v, projection, dout, _ = make_inputs(1, 2, 50, 50, 16, 16, 32, dtype, gen)
    k[:, :, 0] = (k[:, :, 0].float() / k[:, :, 0].float().norm(dim=-1, keepdim=True) * 49.0).to(dtype)
    with torch.no_grad():
        y = k.double() * 16**-0.25
        s = y @ feature_projection(projection).T - 0.5 * (y * y).sum(-1, keepdim=True)
        row_max = s.amax(-1)
        assert (row_max[:, :, 1:].max(-1).values - row_max[:, :, 0] > 150).all()
    check_against_reference(q, k, v, projection, dout, None, "softmax", causal=True)


def test_projection_gets_no_gradient(gen):
    q, k, v, projection, dout, _ = make_inputs(1, 1, 20, 20, 16, 16, 16, torch.float32, gen)
    projection.requires_grad_()
    out = run("triton", q, k, v, projection, dout, None, "softmax", True)[0]
    assert projection.grad is None and torch.isfinite(out).all()


def test_non_contiguous_heads(gen):
    """Heads split from a ``(N, L, H * d)`` projection arrive as strided views."""
    q, k, v, projection, dout, _ = make_inputs(2, 3, 40, 40, 16, 16, 32, torch.float32, gen)
    views = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v)]
    a = run("triton", *views, projection, dout, None, "softmax", True)
    b = run("triton", q, k, v, projection, dout, None, "softmax", True)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)


def test_heads_merge_without_copy(gen):
    """Output and input gradients are stored heads-last: ``(N, L, H * d)`` is a view of them."""
    from randattn.ops.causal.triton import causal_attention

    q, k, v, projection, dout, _ = make_inputs(2, 3, 70, 70, 16, 32, 32, torch.float32, gen)
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = causal_attention(q, k, v, projection, "softmax", None)
    assert out.transpose(1, 2).is_contiguous()
    for g in torch.autograd.grad(out, (q, k, v), dout):
        assert g.transpose(1, 2).is_contiguous()


# ---- GPU sizes ---------------------------------------------------------------------------------

GPU_SHAPES = [
    (2, 4, 1000, 1000, 64, 64, 256),
    (1, 2, 4096, 4096, 128, 64, 512),
    (1, 2, 1024, 1024, 128, 128, 256),  # the widest float32 / ReLU tiles
    (2, 2, 2048, 2048, 32, 32, 64),
    # head dims and feature counts away from powers of two: padded head tiles, partial feature blocks
    (1, 2, 777, 777, 16, 16, 16),
    (2, 1, 777, 777, 48, 80, 100),
    (1, 2, 777, 777, 80, 48, 333),
    (1, 2, 777, 777, 96, 96, 512),
    (1, 2, 777, 777, 112, 64, 200),
    (2, 2, 777, 777, 24, 40, 48),
    (1, 2, 777, 777, 64, 64, 32),  # feature tiles narrower than the key tile were miscompiled (feature_block)
    (1, 2, 2048, 2048, 32, 16, 80),  # value tiles of 16 were miscompiled (see randattn.ops._triton_utils.MIN_TILE)
    (1, 2, 2048, 2048, 64, 16, 80),
    (1, 2, 2048, 2048, 128, 32, 80),
]


@pytest.mark.skipif(not CUDA, reason="needs a GPU")
@pytest.mark.parametrize("states", ["kept", "recomputed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kernel_fn", ["softmax", "relu"])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gpu_sizes(dtype, kernel_fn, shape, states, gen, monkeypatch):
    """The 2x rule at real sizes, with the carried states kept by the forward (and ``t`` from the
    output's two halves) or recomputed by the backward (``t`` from the ``dq`` kernel's sums), as
    long sequences have them."""
    from randattn.ops.causal import triton as kernels

    monkeypatch.setattr(kernels, "KEEP_STATES_MAX_BYTES", 1 << 40 if states == "kept" else 0)
    n, h, length, s_len, d, dv, m = shape
    inputs = make_inputs(n, h, length, s_len, d, dv, m, dtype, gen, scale=1.0, mask="bool")
    report = check_against_reference(*inputs, kernel_fn, causal=True)
    print("ERR", "causal", states, kernel_fn, dtype, shape, {k: f"{a:.2e}/{b:.2e}" for k, (a, b) in report.items()})


@pytest.mark.skipif(not CUDA, reason="needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_long_sequence_large_logits_finite(dtype, gen):
    """L = 65536 with logits q.k/sqrt(d) up to about +-30: no NaN or inf in output or gradients."""
    q, k, v, projection, dout, _ = make_inputs(1, 2, 65536, 65536, 64, 64, 256, dtype, gen, scale=2.2)
    logits = (q[0, 0, :512].float() @ k[0, 0, :512].float().T) / 8
    assert logits.abs().max() > 20
    out, dq, dk, dv = run("triton", q, k, v, projection, dout, None, "softmax", True)
    for g in (out, dq, dk, dv):
        assert torch.isfinite(g).all()


@pytest.mark.parametrize("value, want", [(None, 123), ("", 123), ("0", 0), ("67108864", 64 << 20)])
def test_env_bytes_reads_a_byte_count(value, want, monkeypatch):
    from randattn.ops._triton_utils import env_bytes

    if value is None:
        monkeypatch.delenv("RANDATTN_TEST_BYTES", raising=False)
    else:
        monkeypatch.setenv("RANDATTN_TEST_BYTES", value)
    assert env_bytes("RANDATTN_TEST_BYTES", 123) == want


@pytest.mark.parametrize("value", ["64MiB", "-1", "1.5"])
def test_env_bytes_names_the_variable_on_bad_values(value, monkeypatch):
    from randattn.ops._triton_utils import env_bytes

    monkeypatch.setenv("RANDATTN_TEST_BYTES", value)
    with pytest.raises(ValueError, match=r"RANDATTN_TEST_BYTES must be a whole number of bytes"):
        env_bytes("RANDATTN_TEST_BYTES", 123)
