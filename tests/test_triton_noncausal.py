"""Non-causal Triton kernels against the reference op and a float64 evaluation (output and gradients).

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
    rel_err,
    run,
)

CUDA = torch.cuda.is_available()

# (N, H, L, S, d, d_v, m)
SMALL = [(2, 2, 37, 45, 16, 16, 32), (1, 2, 70, 19, 32, 16, 16)]


@pytest.mark.parametrize("kernel_fn", ["softmax", "relu"])
@pytest.mark.parametrize("shape", SMALL, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mask", [None, "bool", "float"])
def test_matches_reference_fp32(kernel_fn, shape, mask, gen):
    n, h, length, s_len, d, dv, m = shape
    inputs = make_inputs(n, h, length, s_len, d, dv, m, torch.float32, gen, scale=1.5, mask=mask)
    check_against_reference(*inputs, kernel_fn, causal=False)


@pytest.mark.parametrize(
    "dtype, d, dv",
    [(torch.bfloat16, 64, 64), (torch.bfloat16, 128, 64), (torch.float32, 64, 32)],
    ids=["bf16-d64", "bf16-d128", "fp32-d64"],
)
def test_tuned_tiles_match_reference(dtype, d, dv, gen):
    """Each table of tuned rows per program (up to 256 rows) on ragged lengths longer than its
    largest block: more than one block of queries and keys, the last one partial."""
    from randattn.ops._triton_utils import launch_sizes
    from randattn.ops.noncausal import triton as kernels

    inputs = make_inputs(1, 2, 300, 150, d, dv, 32, dtype, gen, mask="bool")
    sizes = launch_sizes(inputs[0], inputs[2], inputs[3], "softmax")
    table = kernels.TILES[(dtype == torch.float32, max(d, dv))]
    for name, (rows, warps, stages) in table.items():
        assert kernels._tiles(name, sizes) == (rows, {"num_warps": warps, "num_stages": stages})
    check_against_reference(*inputs, "softmax", causal=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_matches_reference_low_precision(dtype, gen):
    inputs = make_inputs(2, 1, 33, 50, 16, 32, 32, dtype, gen, mask="bool")
    check_against_reference(*inputs, "softmax", causal=False)


@pytest.mark.parametrize("merge_in_kernel", [True, False], ids=["merge-in-kernel", "merge-kernel"])
@pytest.mark.parametrize("kernel_fn", ["softmax", "relu"])
def test_split_partials_merged_either_way(kernel_fn, merge_in_kernel, gen, monkeypatch):
    """The key splits' partial states merged by the query-output kernel (short sequences) or by a
    kernel of their own, and the query splits' state gradients summed by the key-gradient kernel or
    on the host: both match the reference, and each other to float32 rounding."""
    from randattn.ops._triton_utils import launch_sizes
    from randattn.ops.noncausal import triton as kernels

    inputs = make_inputs(2, 2, 150, 200, 16, 16, 32, torch.float32, gen, scale=1.5, mask="bool")
    rows, _ = kernels._tiles("key_state", launch_sizes(inputs[0], inputs[2], inputs[3], kernel_fn))
    nsplit, _ = kernels._split(200, 2 * 2, inputs[0].device, rows, kernels.SPLIT_PROGRAMS_PER_SM[True])
    assert nsplit > 1  # several splits to merge
    monkeypatch.setattr(kernels, "MERGE_IN_KERNEL_MAX", 10**9 if merge_in_kernel else 0)
    check_against_reference(*inputs, kernel_fn, causal=False)
    got = run("triton", *inputs, kernel_fn, False)
    monkeypatch.setattr(kernels, "MERGE_IN_KERNEL_MAX", 0 if merge_in_kernel else 10**9)
    other = run("triton", *inputs, kernel_fn, False)
    for a, b in zip(got, other):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_fully_masked_rows_are_zero_and_gradients_finite(gen):
    q, k, v, projection, dout, _ = make_inputs(2, 2, 21, 30, 16, 16, 16, torch.float32, gen)
    mask = torch.zeros(2, 30, dtype=torch.bool, device=DEVICE)
    mask[0] = True
    out, dq, dk, dv = run("triton", q, k, v, projection, dout, mask, "softmax", False)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert out[1].abs().sum() > 0
    for g in (dq, dk, dv):
        assert torch.isfinite(g).all()
    assert torch.equal(dq[0], torch.zeros_like(dq[0]))


def test_projection_gets_no_gradient(gen):
    q, k, v, projection, dout, _ = make_inputs(1, 1, 20, 20, 16, 16, 16, torch.float32, gen)
    projection.requires_grad_()
    out = run("triton", q, k, v, projection, dout, None, "softmax", False)[0]
    assert projection.grad is None and torch.isfinite(out).all()


def test_non_contiguous_heads(gen):
    """Heads split from a ``(N, L, H * d)`` projection arrive as strided views."""
    q, k, v, projection, dout, _ = make_inputs(2, 3, 40, 40, 16, 16, 32, torch.float32, gen)
    views = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v)]
    a = run("triton", *views, projection, dout, None, "softmax", False)
    b = run("triton", q, k, v, projection, dout, None, "softmax", False)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("keep", [False, True], ids=["first-pass", "kept-output"])
def test_heads_merge_without_copy_and_output_kept_only_for_t(keep, dtype, gen, monkeypatch):
    """Output and input gradients are stored heads-last, so ``(N, L, H * d)`` is a view of them; the
    backward keeps q, k, v and O(N H (m d_v + L)) floats, and the output only from
    ``T_FROM_OUTPUT_MIN_LENGTH`` queries (with its rest as int8 for bfloat16: half its bytes)."""
    from randattn.ops.noncausal import triton as kernels

    n, h, length, s_len, d, dv, m = 2, 3, 40, 24, 16, 32, 32
    monkeypatch.setattr(kernels, "T_FROM_OUTPUT_MIN_LENGTH", length if keep else length + 1)
    q, k, v, projection, dout, _ = make_inputs(n, h, length, s_len, d, dv, m, dtype, gen)
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = kernels.noncausal_attention(q, k, v, projection, "softmax", None)
    assert out.shape == (n, h, length, dv) and out.transpose(1, 2).is_contiguous()
    ptrs = {t.untyped_storage().data_ptr() for t in saved}
    assert (out.untyped_storage().data_ptr() in ptrs) == keep
    inputs = {x.untyped_storage().data_ptr() for x in (q, k, v, projection, out)}
    extra = [t for t in saved if t.untyped_storage().data_ptr() not in inputs]
    assert sum(t.numel() for t in extra if t.dtype != torch.int8) <= n * h * (m * dv + m + 1 + 2 * length)
    rest = sum(t.numel() for t in extra if t.dtype == torch.int8)
    assert rest == (out.numel() if keep and dtype == torch.bfloat16 else 0)
    dq, dk, dv_ = torch.autograd.grad(out, (q, k, v), dout)
    for g in (dq, dk, dv_):
        assert g.transpose(1, 2).is_contiguous()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kernel_fn", ["softmax", "relu"])
def test_t_from_the_kept_output_or_a_first_pass(kernel_fn, dtype, gen, monkeypatch):
    """The backward's ``t`` from the kept output (bfloat16: its int8 rest too) or from a first pass
    over the feature blocks: both pass the 2x rule, and their gradients agree to float32 rounding
    (float32 kernels; bfloat16 to its rounding of the gradients)."""
    from randattn.ops.noncausal import triton as kernels

    inputs = make_inputs(2, 2, 70, 45, 16, 16, 32, dtype, gen, scale=1.5, mask="bool")
    results = []
    for threshold in (0, 10**9):
        monkeypatch.setattr(kernels, "T_FROM_OUTPUT_MIN_LENGTH", threshold)
        check_against_reference(*inputs, kernel_fn, causal=False)
        results.append(run("triton", *inputs, kernel_fn, False))
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * b.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_forward_without_gradients_keeps_no_output(dtype, gen, monkeypatch):
    """A forward that needs no gradients (inference) keeps no output for ``t`` at any length (a
    bfloat16 one would cost a full-precision output product and its int8 rest), and gives the output
    of a forward that keeps it (to bfloat16 rounding: one pass against three)."""
    from randattn.ops.noncausal import triton as kernels

    monkeypatch.setattr(kernels, "T_FROM_OUTPUT_MIN_LENGTH", 0)
    q, k, v, projection, _, _ = make_inputs(1, 2, 70, 45, 16, 16, 32, dtype, gen)
    check_forward_without_gradients(kernels, q, k, v, projection, q.numel() if dtype == torch.bfloat16 else 0)


def test_kept_bfloat16_output_is_float32_accurate(gen, monkeypatch):
    """The bfloat16 output and its int8 rest that the backward gets ``t`` from give the output to a few
    units of 2^-16 of its rows' largest entry (the forward's product at full precision, also at the
    GPU's pass counts, where an output that is only returned takes one pass: errors near 2^-7)."""
    from _triton_checks import _bias, fp64_attention

    from randattn.ops._triton_utils import GPU_PRECISION, PRECISION
    from randattn.ops.noncausal import triton as kernels

    monkeypatch.setattr(kernels, "T_FROM_OUTPUT_MIN_LENGTH", 0)
    q, k, v, projection, _, mask = make_inputs(2, 2, 70, 45, 16, 16, 32, torch.bfloat16, gen, 1.5, "bool")
    saved_setting = (PRECISION.fwd_state, PRECISION.fwd_mixed, PRECISION.state, PRECISION.mixed, PRECISION.grad_w)
    PRECISION.set(GPU_PRECISION)
    try:
        out, (kept, lo, *_) = kernels.forward_saving(q, k, v, projection.float(), "softmax", _bias(mask))
    finally:
        PRECISION.set("".join(map(str, saved_setting)))
    assert kept is out and lo.dtype == torch.int8 and lo.shape == out.shape
    hi = out.double()
    back = hi + lo.double() * torch.exp2(torch.frexp(hi)[1] - 8.0) / 254
    exact = fp64_attention(q, k, v, projection, "softmax", _bias(mask), False)
    scale = exact.abs().amax(-1, keepdim=True).clamp_min(1e-30)
    err_hi, err = ((hi - exact).abs() / scale).max(), ((back - exact).abs() / scale).max()
    assert err < 2.0**-12 and err < err_hi / 8  # one forward pass: about 2^-7


# ---- GPU sizes ---------------------------------------------------------------------------------

GPU_SHAPES = [
    (2, 4, 1000, 1000, 64, 64, 256),
    (1, 2, 4096, 3000, 128, 64, 512),
    (1, 2, 1024, 1024, 128, 128, 256),  # the widest float32 / ReLU tiles (unpipelined: shared memory)
    (2, 2, 2048, 2048, 32, 32, 64),
    # head dims and feature counts away from powers of two: padded head tiles, partial feature blocks
    (1, 2, 777, 600, 16, 16, 16),
    (2, 1, 777, 600, 48, 80, 100),
    (1, 2, 777, 600, 80, 48, 333),
    (1, 2, 777, 600, 96, 96, 512),
    (1, 2, 600, 777, 112, 64, 200),
    (2, 2, 777, 600, 24, 40, 48),
    (1, 2, 777, 600, 64, 64, 32),  # feature tiles narrower than the key tile (see feature_block)
    (1, 2, 2048, 1500, 32, 16, 80),  # value tiles of 16 were miscompiled (see randattn.ops._triton_utils.MIN_TILE)
    (1, 2, 2048, 1500, 64, 16, 80),
    (1, 2, 2048, 1500, 128, 32, 80),
]


@pytest.mark.skipif(not CUDA, reason="needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kernel_fn", ["softmax", "relu"])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gpu_sizes(dtype, kernel_fn, shape, gen):
    n, h, length, s_len, d, dv, m = shape
    inputs = make_inputs(n, h, length, s_len, d, dv, m, dtype, gen, scale=1.0, mask="bool")
    report = check_against_reference(*inputs, kernel_fn, causal=False)
    print("ERR", "noncausal", kernel_fn, dtype, shape, {k: f"{a:.2e}/{b:.2e}" for k, (a, b) in report.items()})


@pytest.mark.skipif(not CUDA, reason="needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kernel_fn", ["softmax", "relu"])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gpu_sizes_t_from_the_kept_output(dtype, kernel_fn, shape, gen, monkeypatch):
    """:func:`test_gpu_sizes` with the backward's ``t`` from the kept output at every length."""
    from randattn.ops.noncausal import triton as kernels

    monkeypatch.setattr(kernels, "T_FROM_OUTPUT_MIN_LENGTH", 0)
    n, h, length, s_len, d, dv, m = shape
    inputs = make_inputs(n, h, length, s_len, d, dv, m, dtype, gen, scale=1.0, mask="bool")
    report = check_against_reference(*inputs, kernel_fn, causal=False)
    print("ERR", "noncausal-kept", kernel_fn, dtype, shape, {k: f"{a:.2e}/{b:.2e}" for k, (a, b) in report.items()})


@pytest.mark.skipif(not CUDA, reason="needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_long_sequence_large_logits_finite(dtype, gen):
    """L = 65536 with logits q.k/sqrt(d) up to about +-30: no NaN or inf in output or gradients."""
    q, k, v, projection, dout, _ = make_inputs(1, 2, 65536, 65536, 64, 64, 256, dtype, gen, scale=2.2)
    logits = (q[0, 0, :512].float() @ k[0, 0, :512].float().T) / 8
    assert logits.abs().max() > 20
    out, dq, dk, dv = run("triton", q, k, v, projection, dout, None, "softmax", False)
    for g in (out, dq, dk, dv):
        assert torch.isfinite(g).all()


def test_prepared_projection_is_reused_until_the_projection_changes():
    """The kernels' ``W' = W d^{-1/4}`` is the projection as the feature maps use it (exact in
    bfloat16, stored in the operand dtype); prepared once per projection tensor and version."""
    from randattn.features import feature_projection
    from randattn.ops._triton_utils import prepare_projection

    w = torch.randn(16, 8)
    a = prepare_projection(w, torch.bfloat16)
    assert prepare_projection(w, torch.bfloat16) is a
    assert a.shape == (16, 8) and a.dtype == torch.bfloat16
    torch.testing.assert_close(a.double(), feature_projection(w) * 8**-0.25, rtol=1e-15, atol=0)
    assert ((a.double() - w.double() * 8**-0.25).abs() <= 2.0**-8 * (w.double() * 8**-0.25).abs()).all()
    assert torch.equal(prepare_projection(w, torch.float32), a.float())
    w.mul_(-1)  # in place: the version counter moves
    b = prepare_projection(w, torch.bfloat16)
    assert b is not a and torch.equal(b, -a)
    assert prepare_projection(w.clone(), torch.bfloat16) is not b
    # uncached (the custom ops under torch.compile): the same values, neither taken from nor kept in the cache
    c = prepare_projection(w, torch.bfloat16, cached=False)
    assert c is not b and torch.equal(c, b)
    v = torch.randn(16, 8)
    d = prepare_projection(v, torch.bfloat16, cached=False)
    assert prepare_projection(v, torch.bfloat16) is not d


def test_prepared_projection_is_kept_per_dtype():
    """One projection prepared in two dtypes (the non-causal float32 kernels read ``W'`` in bfloat16,
    the causal ones in float32): each dtype has its own cached tensor, with the same (exact) values."""
    from randattn.ops._triton_utils import kernel_projection, prepare_projection

    w = torch.randn(16, 8)
    a = prepare_projection(w, torch.bfloat16)
    b = prepare_projection(w, torch.float32)
    assert a.dtype == torch.bfloat16 and b.dtype == torch.float32 and torch.equal(a.float(), b)
    assert prepare_projection(w, torch.bfloat16) is a and prepare_projection(w, torch.float32) is b
    assert kernel_projection(w, torch.float32, "noncausal") is a
    assert kernel_projection(w, torch.float32, "causal") is b
    assert kernel_projection(w, torch.bfloat16, "causal") is a


@pytest.mark.parametrize("kernel_fn", ["softmax", "relu"])
def test_float32_products_with_the_projection_in_bfloat16_parts(kernel_fn, gen, monkeypatch):
    """The non-causal float32 kernels take their products with ``W'`` in three bfloat16 parts (``W'``
    read in bfloat16); with ``W'`` read in float32 they take two tf32 parts. Both pass the 2x rule
    and agree to float32 rounding; the prepared ``W'`` has the dtype that selects the product."""
    from randattn.ops import _triton_utils as utils

    inputs = make_inputs(2, 2, 70, 90, 32, 32, 48, torch.float32, gen, scale=1.5, mask="bool")
    assert utils.kernel_projection(inputs[3], torch.float32, "noncausal").dtype == torch.bfloat16
    parts = check_against_reference(*inputs, kernel_fn, causal=False)
    three = run("triton", *inputs, kernel_fn, False)
    monkeypatch.setattr(utils, "BF16_W_OPS", frozenset())
    assert utils.kernel_projection(inputs[3], torch.float32, "noncausal").dtype == torch.float32
    check_against_reference(*inputs, kernel_fn, causal=False)
    two = run("triton", *inputs, kernel_fn, False)
    for name, x, y in zip(("out", "dq", "dk", "dv"), three, two):
        tol = 4 * max(parts[name][1], 1e-6)  # a few times the float32 reference's own error
        assert rel_err(x, y) <= tol, name



def test_head_dim_256_in_bfloat16_non_causal(gen):
    """Non-causal bfloat16 takes head dims up to 256 in the kernels; float32 and causal up to 128."""
    from randattn.functional import rand_attention

    n, h, length, d, m = 1, 1, 20, 256, 32
    inputs = make_inputs(n, h, length, length, d, d, m, torch.bfloat16, gen, mask="bool")
    check_against_reference(*inputs, "softmax", causal=False)
    q, w = inputs[0], inputs[3]
    with pytest.raises(ValueError, match="head dims up to 128 for non-causal torch.float32"):
        rand_attention(q.float(), q.float(), q.float(), w, backend="triton")
    with pytest.raises(ValueError, match="head dims up to 128 for causal torch.bfloat16"):
        rand_attention(q, q, q, w, causal=True, backend="triton")


@pytest.mark.skipif(not CUDA, reason="needs a GPU")
@pytest.mark.parametrize("kernel_fn", ["softmax", "relu"])
def test_gpu_head_dim_256_bfloat16(kernel_fn, gen):
    inputs = make_inputs(2, 4, 2048, 2048, 256, 256, 256, torch.bfloat16, gen, mask="bool")
    report = check_against_reference(*inputs, kernel_fn, causal=False)
    print("ERR", "d256", kernel_fn, {k: f"{a:.2e}/{b:.2e}" for k, (a, b) in report.items()})
