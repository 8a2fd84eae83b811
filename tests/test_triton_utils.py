"""Shared Triton helpers: TF32 rounding, the two-pass products with the projection, launch options.

On a machine without a GPU the helpers run in the Triton interpreter (``TRITON_INTERPRET=1``, set in
``conftest.py``); on a GPU the products run on the tensor cores.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")
tl = triton.language

from _triton_checks import DEVICE  # noqa: E402

from randattn.features import scaled_projection  # noqa: E402
from randattn.ops._triton_utils import (  # noqa: E402
    LAUNCH,
    _launch_sizes,
    joined_output,
    launch_opts,
    mm_w,
    split_output,
    tf32_round,
)


@triton.jit
def _round_kernel(x_ptr, out_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(out_ptr + offs, tf32_round(tl.load(x_ptr + offs)))


@triton.jit
def _split_output_kernel(x_ptr, hi_ptr, code_ptr, back_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    hi, code = split_output(tl.load(x_ptr + offs))
    tl.store(hi_ptr + offs, hi)
    tl.store(code_ptr + offs, code)
    # as the backward reads them: the bfloat16 half from memory, the code as stored
    tl.store(back_ptr + offs, joined_output(tl.load(hi_ptr + offs), tl.load(code_ptr + offs)))


@triton.jit
def _mm_w_kernel(a_ptr, w_ptr, acc_ptr, out_ptr, R: tl.constexpr, K: tl.constexpr, C: tl.constexpr,
                 FP32_DOT: tl.constexpr, PASSES: tl.constexpr = 2):
    rows, ks, cols = tl.arange(0, R), tl.arange(0, K), tl.arange(0, C)
    a = tl.load(a_ptr + rows[:, None] * K + ks[None, :])
    w = tl.load(w_ptr + ks[:, None] * C + cols[None, :])
    acc = tl.load(acc_ptr + rows[:, None] * C + cols[None, :])
    tl.store(out_ptr + rows[:, None] * C + cols[None, :], mm_w(a, w, acc, PASSES, FP32_DOT))


def _tf32_round_reference(x: torch.Tensor) -> torch.Tensor:
    """Nearest TF32 value (10 stored significand bits), ties away from zero, from float64 arithmetic."""
    xd = x.double()
    mant, exp = torch.frexp(xd)  # x = mant 2^exp, 0.5 <= |mant| < 1: 11 significant bits kept
    scaled = mant * 2.0**11
    rounded = torch.copysign(torch.floor(scaled.abs() + 0.5), scaled)
    return torch.ldexp(rounded, exp - 11).float()


def test_tf32_round_is_nearest_with_ties_away(gen):
    n = 1024
    x = torch.randn(n, generator=gen) * torch.exp2(torch.randint(-30, 30, (n,), generator=gen).float())
    bits = x.view(torch.int32)
    # exact ties (low 13 bits 0x1000), values just below a tie, and one-bit-above-truncation values
    x[:64] = (bits[:64] & ~0x1FFF | 0x1000).view(torch.float32)
    x[64:128] = (bits[64:128] & ~0x1FFF | 0x0FFF).view(torch.float32)
    x[128:192] = (bits[128:192] & ~0x1FFF | 0x0001).view(torch.float32)
    x[192:200] = torch.tensor([0.0, -0.0, 1.0, -1.0, 1.0 + 2**-11, -(1.0 + 2**-11), 3.0e38, -3.0e38])
    out = torch.empty_like(x, device=DEVICE)
    _round_kernel[(1,)](x.to(DEVICE), out, N=n)
    out = out.cpu()
    expected = _tf32_round_reference(x)
    assert torch.equal(out.view(torch.int32), expected.view(torch.int32))
    assert not (out.view(torch.int32) & 0x1FFF).any()  # exactly representable in TF32
    # the rounded value is within half a TF32 unit (2^-11 relative) of the input, with ties away from zero
    assert ((out.double() - x.double()).abs() <= x.double().abs() * 2.0**-11).all()
    assert (out[:64].abs() > x[:64].abs()).all() and (out[64:128].abs() < x[64:128].abs()).all()


@pytest.mark.parametrize(
    "fp32_dot, w_dtype, passes",
    [("tf32x3", torch.float32, 2), ("ieee", torch.float32, 2), ("tf32x3", torch.bfloat16, 3)],
    ids=["tf32-parts", "ieee", "bfloat16-parts"],
)
def test_mm_w_is_float32_accurate(fp32_dot, w_dtype, passes, gen):
    """``acc + a @ W'`` for float32 ``a`` and a projection tile (exact in bfloat16): float32-accurate
    (a few units of 2^-24 of the terms' magnitudes), with the running sum added exactly once; a
    bfloat16 ``W'`` takes ``a`` in three bfloat16 parts (the float32 kernels of the non-causal op)."""
    rows, k, cols = 32, 64, 32
    a = torch.randn(rows, k, generator=gen) * torch.exp2(torch.randint(-4, 5, (rows, 1), generator=gen).float())
    w = scaled_projection(torch.randn(k, cols, generator=gen))
    acc = torch.randn(rows, cols, generator=gen) * 100.0
    out = torch.empty(rows, cols, device=DEVICE)
    w_in = w.to(w_dtype).contiguous().to(DEVICE)
    assert torch.equal(w_in.cpu().double(), w.double())  # exact in bfloat16
    _mm_w_kernel[(1,)](a.to(DEVICE), w_in, acc.to(DEVICE), out, R=rows, K=k, C=cols, FP32_DOT=fp32_dot,
                       PASSES=passes)
    expected = acc.double() + a.double() @ w.double()
    bound = 2.0**-20 * (acc.double().abs() + a.double().abs() @ w.double().abs())
    err = (out.cpu().double() - expected).abs()
    assert (err <= bound).all(), (err / bound).max().item()
    # the projection's products alone, without the running sum, reach the same accuracy
    _mm_w_kernel[(1,)](a.to(DEVICE), w_in, torch.zeros_like(acc).to(DEVICE), out, R=rows, K=k, C=cols,
                       FP32_DOT=fp32_dot, PASSES=passes)
    err = (out.cpu().double() - a.double() @ w.double()).abs()
    bound = 2.0**-20 * (a.double().abs() @ w.double().abs())
    assert (err <= bound).all()
    if w_dtype == torch.bfloat16:  # two bfloat16 parts (16 bits of a) are not float32-accurate
        _mm_w_kernel[(1,)](a.to(DEVICE), w_in, torch.zeros_like(acc).to(DEVICE), out, R=rows, K=k, C=cols,
                           FP32_DOT=fp32_dot, PASSES=2)
        assert ((out.cpu().double() - a.double() @ w.double()).abs() > bound).any()


def test_launch_stage_caps_by_head_dim_and_kernel():
    """float32 tiles of head dim 128 run unpipelined in every kernel; the ReLU kernel's bfloat16 tiles
    of head dim 128 in the non-causal kernels only; head dim 256 unpipelined with 8 warps."""
    def opts(name, d, fp32, kernel_fn):
        return launch_opts(name, _launch_sizes(d, d, 256, fp32, kernel_fn))

    for name in ("state", "rstate", "query_grad", "key_state"):
        assert opts(name, 128, True, "softmax")["num_stages"] == 1
        assert opts(name, 256, False, "relu") == {"num_warps": 8, "num_stages": 1}
        assert opts(name, 64, False, "relu") == dict(zip(("num_warps", "num_stages"), LAUNCH.get(name, LAUNCH["*"])))
    for name in ("query_grad", "key_state", "query_out"):
        assert opts(name, 128, False, "relu")["num_stages"] == 1
        assert opts(name, 128, False, "softmax")["num_stages"] == LAUNCH.get(name, LAUNCH["*"])[1]
    for name in ("state", "rstate"):
        assert opts(name, 128, False, "relu")["num_stages"] == LAUNCH[name][1] > 1


def test_gradient_products_take_two_passes_with_few_features():
    """``dq``/``dk`` products with the projection round once only with many features (see
    :data:`~randattn.ops._triton_utils.GRAD_W_ONE_PASS_MIN_FEATURES`); a setting of 2 or more stays."""
    from randattn.ops._triton_utils import GRAD_W_ONE_PASS_MIN_FEATURES, Precision

    one, two = Precision.parse("21231"), Precision.parse("21232")
    assert [one.grad_w_passes(m) for m in (16, 64, GRAD_W_ONE_PASS_MIN_FEATURES - 1)] == [2, 2, 2]
    assert [one.grad_w_passes(m) for m in (GRAD_W_ONE_PASS_MIN_FEATURES, 256, 512)] == [1, 1, 1]
    assert [two.grad_w_passes(m) for m in (16, 256)] == [2, 2]


def test_feature_tiles_are_at_least_as_wide_as_the_key_tile_up_to_64():
    """Feature tiles narrower than the key tile were miscompiled on an H100 (see ``feature_block``)."""
    from randattn.ops._triton_utils import BLOCK_FEATURES, feature_block, pow2_block

    for m in (1, 16, 32, 33, 48, 64, 100, 256, 512):
        for d in (8, 16, 32, 48, 64, 96, 128, 256):
            block = feature_block(m, d)
            assert block >= min(pow2_block(d), 64, BLOCK_FEATURES)
            assert block & (block - 1) == 0 and block >= min(m, BLOCK_FEATURES)
    assert feature_block(32, 64) == 64 and feature_block(16, 16) == 32 and feature_block(256, 128) == 64


def test_output_split_into_bfloat16_and_an_int8_rest(gen):
    """``split_output``: ``hi`` is the float32 value rounded to bfloat16 to nearest, ties to even (bit
    for bit as torch's conversion), and ``joined_output(hi, code)`` gives the value back to within
    1/508 of ``hi``'s last place, over magnitudes from 2^-100 to 2^120, ties and signs; zeros give
    zeros, and tinier values are never worse than ``hi``."""
    n = 1024
    x = torch.randn(n, generator=gen) * torch.exp2(torch.randint(-100, 120, (n,), generator=gen).float())
    bits = x.view(torch.int32)
    x[:64] = (bits[:64] & ~0xFFFF | 0x8000).view(torch.float32)  # ties: even neighbour
    x[64:128] = (bits[64:128] & ~0xFFFF | 0x7FFF).view(torch.float32)  # just below a tie
    x[128:136] = torch.tensor([0.0, -0.0, 1.0, -1.0, 2.0 - 2**-20, -(2.0 - 2**-20), 3.0e38, -1e-30])
    tiny = torch.tensor([3.1e-37, -2.2e-38, 1e-40, 2.0**-110 * 1.3])
    hi = torch.empty(n, device=DEVICE)
    code = torch.empty(n, device=DEVICE, dtype=torch.int8)
    back = torch.empty(n, device=DEVICE)
    _split_output_kernel[(1,)](x.to(DEVICE), hi, code, back, N=n)
    hi, code, back = hi.cpu(), code.cpu(), back.cpu()
    assert torch.equal(hi.view(torch.int32), x.bfloat16().float().view(torch.int32))
    ulp = torch.exp2(torch.frexp(hi.double())[1] - 8.0)  # hi's last place (8 significant bits)
    err = (back.double() - x.double()).abs()
    assert (err <= ulp / 508 * (1 + 1e-6)).all(), (err / ulp).max()
    assert (code.abs() <= 127).all() and code[:136].ne(0).sum() > 0
    assert code[128] == 0 and code[129] == 0 and back[128] == 0 and back[129] == 0
    # the code carries the rest: without it the error would be up to half a last place
    assert (back.double() - x.double()).abs().max() < (hi.double() - x.double()).abs().max() / 50
    t_hi, t_code, t_back = torch.empty(4, device=DEVICE), torch.empty(4, device=DEVICE, dtype=torch.int8), torch.empty(4, device=DEVICE)
    _split_output_kernel[(1,)](tiny.to(DEVICE), t_hi, t_code, t_back, N=4)
    t_err, hi_err = (t_back.cpu().double() - tiny.double()).abs(), (t_hi.cpu().double() - tiny.double()).abs()
    assert torch.isfinite(t_back).all() and (t_err <= hi_err).all()
