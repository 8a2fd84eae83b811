"""Non-causal random-feature attention as fused Triton kernels, wrapped as ``torch.library`` custom ops.

Forward (the ``(N, H, L, m)`` features never reach device memory):

1. ``_key_state_kernel``: per ``(n, h)``, key split and block of features, the key features are
   computed on chip from ``k`` tiles and the projection and reduced into a partial state
   ``A = phi_k^T v`` ``(m, d_v)`` and key sum ``(m)``, under a running maximum of the logits
   (rescaling as it grows). ``_merge_kernel`` merges the partials at the largest maximum ``c``, the
   key stabiliser of the reference; for short sequences the query-output kernel merges them itself
   (:data:`MERGE_IN_KERNEL_MAX`), one launch fewer.
2. ``_query_out_kernel``: per block of queries, query features on chip (online row maximum over the
   feature blocks), ``out = phi_q S / phi_q z``; also keeps the row stabiliser and denominator
   (``(N, H, L)`` float32 each) for the backward.

Outputs and input gradients are ``(N, H, L, d)`` views of ``(N, L, H, d)`` storage (:func:`heads_last`),
so that the heads merge back into ``(N, L, E)`` for the projections without a copy.

Backward (features recomputed): ``_query_grad_kernel`` (``dq`` and the per-row scalar
``t = dout . num / den^2 = dout . out / den``, float32-accurate: from the output kept by the forward
for long sequences, :func:`keeps_output`, else with ``dout . num = sum_m phi_m (dout S^T)_m`` from a
first pass over the feature blocks), ``_query_state_grad_kernel`` (``dS = phi_q^T (dout / den)``,
``dz = -phi_q^T t``, one partial per query split) and ``_key_grad_kernel`` (``dk``, ``dv``; it sums the
splits' partials itself for short sequences, else they are summed on the host first).
The projection gets no gradient.
"""

from __future__ import annotations

import os
import sys

import torch
import triton
import triton.language as tl

from .._triton_utils import (
    NEG_BIG,
    PRECISION,
    cdiv,
    env_settings,
    features_tile,
    finish_gradients,
    fixed_grid_size,
    gradient_buffers,
    heads_last,
    joined_output,
    kernel_dtype,
    kernel_projection,
    key_tiles,
    launch_opts,
    launch_sizes,
    load_w,
    load_wt,
    logits_tile,
    mm_exact_a_f32,
    mm_exact_b,
    mm_mixed,
    mm_w,
    next_pow2,
    query_floor,
    query_rows,
    query_state_grad_tile,
    row_tile,
    rows_contiguous,
    split_output,
    store_dtype,
)
from ..eager import KernelAttention
from ..launch import direct_launch

__all__ = ["noncausal_attention", "forward_saving", "backward_from"]

#: Rows (queries or keys) per program of each kernel, with the launch settings of
#: :data:`~randattn.ops._triton_utils.LAUNCH`.
ROWS = {"key_state": 64, "query_out": 64, "query_grad": 64, "query_state_grad": 64, "key_grad": 64}
#: Rows per program, ``num_warps`` and ``num_stages`` per kernel, by ``(float32 operands, widest head
#: tile)`` (float32 operands also run float16 inputs): the fastest of 8-10 settings per kernel on an
#: H100 at B=4, H=8, L=65536, m=256, fwd+bwd kernel time: bfloat16 d=64 9.51 -> 8.03 ms, d=128
#: 24.0 -> 17.1 ms. float32 re-swept once its products with ``W'`` took bfloat16 parts (fewer
#: registers; per-kernel profiles of 15 tiles, and of the split kernels' tiles x split counts): op
#: fwd+bwd 19.64-19.67 -> 16.64-16.68 ms at 65536, 5.00-5.01 -> 4.32 ms at 16384; the split kernels
#: run best in programs of 2 warps and 32 rows (``scripts/KERNEL_NOTES.md``). Other kernels and tiles:
#: :data:`ROWS` with :data:`~randattn.ops._triton_utils.LAUNCH`.
TILES = {
    (False, 64): {
        "key_state": (64, 4, 3),
        "query_out": (128, 4, 1),
        "query_grad": (256, 8, 2),
        "query_state_grad": (64, 4, 3),
    },
    (False, 128): {"query_out": (128, 8, 1), "query_grad": (128, 8, 1), "key_grad": (128, 8, 1)},
    (True, 64): {
        "key_state": (32, 2, 2),
        "query_out": (128, 8, 2),
        "query_grad": (64, 4, 1),
        "query_state_grad": (32, 2, 1),
        "key_grad": (128, 8, 1),
    },
}
#: ``RANDATTN_TRITON_ROWS="name=rows;..."`` (tuning runs) sets the rows of every tile kind; with it or
#: ``RANDATTN_TRITON_LAUNCH`` set, :data:`TILES` is not used.
ROWS.update({name: value[0] for name, value in env_settings("RANDATTN_TRITON_ROWS").items()})
_TUNING = bool(os.environ.get("RANDATTN_TRITON_ROWS") or os.environ.get("RANDATTN_TRITON_LAUNCH"))


def _tiles(name: str, c: dict) -> tuple[int, dict]:
    """Rows per program and launch options of kernel ``name`` for the launch sizes ``c``."""
    widest = max(c["BLOCK_D"], c["BLOCK_DV"])
    tuned = TILES.get((c["fp32"], max(widest, 64)), {})
    if not _TUNING and name in tuned:
        rows, warps, stages = tuned[name]
        return rows, {"num_warps": warps, "num_stages": stages}
    return ROWS[name], launch_opts(name, c)


#: Largest (blocks of rows) x (splits) for which the query-output kernel merges the key splits' partial
#: states itself, and the key-gradient kernel sums the query splits' partial state gradients, instead
#: of a kernel launch of their own (each block re-reads all splits' partials: cheap for short
#: sequences, whose speed is set by the host's launches, not by the GPU).
MERGE_IN_KERNEL_MAX = 128

#: Queries from which the backward's ``t = dout . out / den`` comes from the output kept by the
#: autograd node (bfloat16 outputs with their rest as an int8 code, half the output's bytes more:
#: :func:`~randattn.ops._triton_utils.split_output`) instead of a first pass of the query-gradient
#: kernel over the feature blocks (the query features and ``dout S^T`` once more). Below it the node
#: holds no output, so that a layer's output is freed once the layers after it are done with it
#: (``RANDATTN_TRITON_T_FROM_OUTPUT``, queries).
T_FROM_OUTPUT_MIN_LENGTH = int(os.environ.get("RANDATTN_TRITON_T_FROM_OUTPUT", "16384"))


def keeps_output(length: int, dtype: torch.dtype, kernel_fn: str, needs_grad: bool) -> bool:
    """Whether the forward keeps the output for the backward's ``t`` (kernel dtype ``dtype``).

    bfloat16 outputs cost the forward a full-precision output product and the int8 rest (H100,
    B=4, H=8, d=64, m=256, L=65536, op fwd / fwd+bwd ms: softmax 1.80 / 6.97 -> 2.21 / 6.72, ReLU
    1.24 / 5.16 -> 1.64 / 5.46), so the bfloat16 ReLU kernel keeps none; float32 outputs cost
    nothing more (float32 ReLU 6.93 / 21.10 -> 6.90 / 19.76)."""
    if not needs_grad or length < T_FROM_OUTPUT_MIN_LENGTH:
        return False
    return not (dtype == torch.bfloat16 and kernel_fn == "relu")


@direct_launch
@triton.jit
def _key_state_kernel(
    K,
    V,
    W,
    BIAS,
    A,
    Z,
    MX,
    sk_n,
    sk_h,
    sk_s,
    sv_n,
    sv_h,
    sv_s,
    H,
    S,
    D,
    DV,
    M,
    KEYS_PER_SPLIT,
    NSPLIT,
    half_inv_sqrt_d,
    RELU_SCALE,
    EPS,
    HAS_BIAS: tl.constexpr,
    KERNEL: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    STATE_PASSES: tl.constexpr,
    FP32_DOT: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_split = tl.program_id(1)
    pid_nh = tl.program_id(2)
    n = pid_nh // H
    h = pid_nh % H
    offs_d = tl.arange(0, BLOCK_D)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_ok = offs_m < M
    wt = load_wt(W, offs_d, offs_m, D, M)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), tl.float32)
    zacc = tl.zeros((BLOCK_M,), tl.float32)
    mx = NEG_BIG
    start = pid_split * KEYS_PER_SPLIT
    end = tl.minimum(start + KEYS_PER_SPLIT, S)
    for s0 in range(start, end, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        s_ok = offs_s < end
        y, vt, b = key_tiles(
            K, V, BIAS, n, h, offs_s, s_ok, offs_d, offs_dv, S, D, DV, sk_n, sk_h, sk_s, sv_n, sv_h, sv_s, HAS_BIAS
        )
        proj = logits_tile(y, wt, FP32_DOT)
        ok = s_ok[:, None] & m_ok[None, :]
        if KERNEL == 0:
            yf = y.to(tl.float32)
            sq = tl.sum(yf * yf, 1) * half_inv_sqrt_d
            # the scale counts kept keys only (logit plus bias): the largest kept feature is 1
            s = tl.where(ok, proj - sq[:, None] + b[:, None], float("-inf"))
            new = tl.maximum(mx, tl.max(tl.max(s, 1), 0))
            alpha = tl.exp(mx - new)
            p = tl.exp(s - new)
            acc = acc * alpha
            zacc = zacc * alpha
            mx = new
        else:
            p = tl.where(ok, (tl.maximum(proj, 0.0) * RELU_SCALE + EPS) * tl.exp(b)[:, None], 0.0)
        acc = mm_exact_b(tl.trans(p), vt, acc, STATE_PASSES, FP32_DOT)
        zacc += tl.sum(p, 0)
    if KERNEL != 0:
        mx = 0.0
    part = pid_nh * NSPLIT + pid_split
    tl.store(
        A + part * M * DV + offs_m[:, None] * DV + offs_dv[None, :], acc, mask=m_ok[:, None] & (offs_dv[None, :] < DV)
    )
    tl.store(Z + part * M + offs_m, zacc, mask=m_ok)
    tl.store(MX + part * tl.num_programs(0) + pid_m, mx)


@triton.jit
def _head_scale(MX, pid_nh, NSPLIT, NMB, BLOCK_P: tl.constexpr):
    """The key scale ``c_k`` of head ``pid_nh``: the largest of its splits' and feature blocks' maxima."""
    offs_p = tl.arange(0, BLOCK_P)
    return tl.max(tl.load(MX + pid_nh * NSPLIT * NMB + offs_p, mask=offs_p < NSPLIT * NMB, other=NEG_BIG), 0)


@triton.jit
def _merged_block(
    A, Z, MX, pid_nh, blk, ck, offs_m, m_ok, offs_dv, M, DV, NSPLIT, NMB, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr
):
    """State rows ``offs_m`` (feature block ``blk``) and key sums of head ``pid_nh``: the key splits'
    partials, each at its own maximum, summed at the head's scale ``ck``."""
    mask = m_ok[:, None] & (offs_dv[None, :] < DV)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), tl.float32)
    acc_z = tl.zeros((BLOCK_M,), tl.float32)
    for sp in range(NSPLIT):
        part = pid_nh * NSPLIT + sp
        scale = tl.exp(tl.load(MX + part * NMB + blk) - ck)
        acc += scale * tl.load(A + (part * M + offs_m[:, None]) * DV + offs_dv[None, :], mask=mask, other=0.0)
        acc_z += scale * tl.load(Z + part * M + offs_m, mask=m_ok, other=0.0)
    return acc, acc_z


@direct_launch
@triton.jit
def _merge_kernel(
    A,
    Z,
    MX,
    ST,
    KS,
    CK,
    NSPLIT,
    NMB,
    M,
    DV,
    BLOCK_M: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """Merge the key splits' partial states at the largest maximum ``c_k`` of the head."""
    pid_m = tl.program_id(0)
    pid_nh = tl.program_id(1)
    ck = _head_scale(MX, pid_nh, NSPLIT, NMB, BLOCK_P)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_ok = offs_m < M
    acc, acc_z = _merged_block(
        A, Z, MX, pid_nh, pid_m, ck, offs_m, m_ok, offs_dv, M, DV, NSPLIT, NMB, BLOCK_M, BLOCK_DV
    )
    tl.store(
        ST + (pid_nh * M + offs_m[:, None]) * DV + offs_dv[None, :], acc, mask=m_ok[:, None] & (offs_dv[None, :] < DV)
    )
    tl.store(KS + pid_nh * M + offs_m, acc_z, mask=m_ok)
    if pid_m == 0:
        tl.store(CK + pid_nh, ck)


@direct_launch
@triton.jit
def _query_out_kernel(
    Q,
    W,
    A,
    Z,
    MX,
    ST,
    KS,
    CK,
    OUT,
    LO,
    CQ,
    DEN,
    NSPLIT,
    NMB,
    sq_n,
    sq_h,
    sq_l,
    so_n,
    so_h,
    so_l,
    H,
    L,
    D,
    DV,
    M,
    half_inv_sqrt_d,
    RELU_SCALE,
    EPS,
    KERNEL: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    MIXED_PASSES: tl.constexpr,
    FP32_DOT: tl.constexpr,
    MERGE: tl.constexpr,
    BLOCK_P: tl.constexpr,
    STORE_LO: tl.constexpr,
):
    """``MERGE``: merge the key splits' partials ``A, Z, MX`` here (as ``_merge_kernel`` does; the
    first block of queries stores the merged ``ST, KS, CK`` for the backward), else read ``ST, KS``.
    ``STORE_LO``: the output is stored rounded to bfloat16 and the rest goes to ``LO`` as an int8
    code (:func:`split_output`), so that the backward gets ``t`` from the output."""
    pid_l = tl.program_id(0)
    pid_nh = tl.program_id(1)
    n = pid_nh // H
    h = pid_nh % H
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    l_ok = offs_l < L
    if MERGE:
        ck = _head_scale(MX, pid_nh, NSPLIT, NMB, BLOCK_P)
        if pid_l == 0:
            tl.store(CK + pid_nh, ck)
    x = row_tile(Q + n * sq_n + h * sq_h, offs_l, l_ok, offs_d, D, sq_l)
    xf = x.to(tl.float32)
    sq = tl.sum(xf * xf, 1) * half_inv_sqrt_d
    num = tl.zeros((BLOCK_L, BLOCK_DV), tl.float32)
    den = tl.zeros((BLOCK_L,), tl.float32)
    cq = tl.full((BLOCK_L,), NEG_BIG, tl.float32)
    ssum = tl.zeros((BLOCK_DV,), tl.float32)  # sum_m S and sum_m z: the query floor's terms
    zsum = 0.0
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < M
        wt = load_wt(W, offs_d, offs_m, D, M)
        proj = logits_tile(x, wt, FP32_DOT)
        if KERNEL == 0:
            s = tl.where(m_ok[None, :], proj - sq[:, None], float("-inf"))
            new = tl.maximum(cq, tl.max(s, 1))
            alpha = tl.exp(cq - new)
            phi = tl.exp(s - new[:, None])
            num = num * alpha[:, None]
            den = den * alpha
            cq = new
        else:
            phi = tl.where(m_ok[None, :], tl.maximum(proj, 0.0) * RELU_SCALE + EPS, 0.0)
        smask = m_ok[:, None] & (offs_dv[None, :] < DV)
        if MERGE:
            st, z = _merged_block(
                A, Z, MX, pid_nh, m0 // BLOCK_M, ck, offs_m, m_ok, offs_dv, M, DV, NSPLIT, NMB, BLOCK_M, BLOCK_DV
            )
            if pid_l == 0:
                tl.store(ST + pid_nh * M * DV + offs_m[:, None] * DV + offs_dv[None, :], st, mask=smask)
                tl.store(KS + pid_nh * M + offs_m, z, mask=m_ok)
        else:
            st = tl.load(ST + pid_nh * M * DV + offs_m[:, None] * DV + offs_dv[None, :], mask=smask, other=0.0)
            z = tl.load(KS + pid_nh * M + offs_m, mask=m_ok, other=0.0)
        num = mm_mixed(phi, st, num, x, MIXED_PASSES, FP32_DOT)
        den += tl.sum(phi * z[None, :], 1)
        if KERNEL == 0:
            ssum += tl.sum(st, 0)
            zsum += tl.sum(z, 0)
    if KERNEL == 0:  # every query feature carries the floor EPS
        num += EPS * ssum[None, :]
        den += EPS * zsum
    out = num / tl.where(den == 0.0, 1.0, den)[:, None]
    omask = l_ok[:, None] & (offs_dv[None, :] < DV)
    o_ptrs = n * so_n + h * so_h + offs_l[:, None] * so_l + offs_dv[None, :]
    if STORE_LO:
        out, code = split_output(out)
        tl.store(LO + o_ptrs, code, mask=omask)
    tl.store(OUT + o_ptrs, out.to(OUT.dtype.element_ty), mask=omask)
    if KERNEL != 0:
        cq = tl.zeros((BLOCK_L,), tl.float32)
    tl.store(CQ + pid_nh * L + offs_l, cq, mask=l_ok)
    tl.store(DEN + pid_nh * L + offs_l, den, mask=l_ok)


@triton.jit
def _state_rows(do, ST, pid_nh, offs_m, m_ok, offs_dv, DV, M, STATE_PASSES: tl.constexpr, FP32_DOT: tl.constexpr):
    """``g = dout S^T`` for one block of features: ``(BLOCK_L, BLOCK_M)``, the state split in two parts."""
    stt = tl.load(
        ST + pid_nh * M * DV + offs_m[None, :] * DV + offs_dv[:, None],
        mask=m_ok[None, :] & (offs_dv[:, None] < DV),
        other=0.0,
    )
    return mm_exact_a_f32(do, stt, tl.zeros((do.shape[0], offs_m.shape[0]), tl.float32), STATE_PASSES, FP32_DOT)


@triton.jit
def _query_feature_block(
    x, sq, cq, do, W, ST, pid_nh, m0, offs_d, offs_dv, D, DV, M,
    KERNEL: tl.constexpr, BLOCK_M: tl.constexpr, STATE_PASSES: tl.constexpr, FP32_DOT: tl.constexpr,
    RELU_SCALE, EPS,
):  # fmt: skip
    """One feature block of the query-gradient kernel's two passes: ``(offs_m, m_ok, phi, proj, g)``
    with the query features ``phi`` (stabilised by ``cq``), their logits and ``g = dout S^T``."""
    offs_m = m0 + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    wt = load_wt(W, offs_d, offs_m, D, M)
    phi, proj = features_tile(x, sq, wt, m_ok, cq[:, None], KERNEL, FP32_DOT, RELU_SCALE, EPS)
    g = _state_rows(do, ST, pid_nh, offs_m, m_ok, offs_dv, DV, M, STATE_PASSES, FP32_DOT)
    return offs_m, m_ok, phi, proj, g


@direct_launch
@triton.jit
def _query_grad_kernel(
    Q,
    DO,
    W,
    ST,
    KS,
    CQ,
    DEN,
    OUT,
    LO,
    DQ,
    TV,
    sq_n,
    sq_h,
    sq_l,
    sd_n,
    sd_h,
    sd_l,
    so_n,
    so_h,
    so_l,
    sg_n,
    sg_h,
    sg_l,
    H,
    L,
    D,
    DV,
    M,
    half_inv_sqrt_d,
    RELU_SCALE,
    EPS,
    KERNEL: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    STATE_PASSES: tl.constexpr,
    GRADW_PASSES: tl.constexpr,
    FP32_DOT: tl.constexpr,
    T_FROM_OUT: tl.constexpr,
    HAS_LO: tl.constexpr,
):
    pid_l = tl.program_id(0)
    pid_nh = tl.program_id(1)
    n = pid_nh // H
    h = pid_nh % H
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    l_ok = offs_l < L
    x, do, sq, cq, den, inv_den = query_rows(
        Q, DO, CQ, DEN, n, h, pid_nh, offs_l, l_ok, offs_d, offs_dv, L, D, DV,
        sq_n, sq_h, sq_l, sd_n, sd_h, sd_l, half_inv_sqrt_d,
    )  # fmt: skip
    # t_i = dout_i . num_i / den_i^2 = dout_i . out_i / den_i, float32-accurate: from the kept output
    # (T_FROM_OUT; bfloat16 outputs with their int8 rest, HAS_LO), else from a first pass over the
    # feature blocks, dout_i . num_i = sum_m phi_im g_im with g = dout S^T
    if T_FROM_OUT:
        o_offs = n * so_n + h * so_h + offs_l[:, None] * so_l + offs_dv[None, :]
        o_ok = l_ok[:, None] & (offs_dv[None, :] < DV)
        out = tl.load(OUT + o_offs, mask=o_ok, other=0.0).to(tl.float32)
        if HAS_LO:
            out = joined_output(out, tl.load(LO + o_offs, mask=o_ok, other=0))
        t = tl.sum(do.to(tl.float32) * out, 1) * inv_den
    else:
        u = tl.zeros((BLOCK_L,), tl.float32)
        for m0 in range(0, M, BLOCK_M):
            offs_m, m_ok, phi, proj, g = _query_feature_block(
                x, sq, cq, do, W, ST, pid_nh, m0, offs_d, offs_dv, D, DV, M,
                KERNEL, BLOCK_M, STATE_PASSES, FP32_DOT, RELU_SCALE, EPS,
            )  # fmt: skip
            u += tl.sum(query_floor(phi, m_ok, KERNEL, EPS) * g, 1)
        t = u * inv_den * inv_den
    # dphi = g / den - z t ; ds = dphi * dphi/ds ; dx = ds W'
    dx = tl.zeros((BLOCK_L, BLOCK_D), tl.float32)
    rs = tl.zeros((BLOCK_L,), tl.float32)
    for m0 in range(0, M, BLOCK_M):
        offs_m, m_ok, phi, proj, g = _query_feature_block(
            x, sq, cq, do, W, ST, pid_nh, m0, offs_d, offs_dv, D, DV, M,
            KERNEL, BLOCK_M, STATE_PASSES, FP32_DOT, RELU_SCALE, EPS,
        )  # fmt: skip
        z = tl.load(KS + pid_nh * M + offs_m, mask=m_ok, other=0.0)
        dphi = g * inv_den[:, None] - z[None, :] * t[:, None]
        if KERNEL == 0:
            ds = dphi * phi
            rs += tl.sum(ds, 1)
        else:
            ds = tl.where((proj > 0.0) & m_ok[None, :], dphi * RELU_SCALE, 0.0)
        w = load_w(W, offs_m, offs_d, D, M)
        dx = mm_w(ds, w, dx, GRADW_PASSES, FP32_DOT)
    if KERNEL == 0:
        dx = dx - rs[:, None] * x.to(tl.float32) * (2.0 * half_inv_sqrt_d)
    tl.store(
        DQ + n * sg_n + h * sg_h + offs_l[:, None] * sg_l + offs_d[None, :],
        dx.to(DQ.dtype.element_ty),
        mask=l_ok[:, None] & (offs_d[None, :] < D),
    )
    tl.store(TV + pid_nh * L + offs_l, t, mask=l_ok)


@direct_launch
@triton.jit
def _query_state_grad_kernel(
    Q,
    DO,
    W,
    CQ,
    DEN,
    TV,
    DST,
    DKS,
    sq_n,
    sq_h,
    sq_l,
    sd_n,
    sd_h,
    sd_l,
    H,
    L,
    D,
    DV,
    M,
    ROWS_PER_SPLIT,
    NSPLIT,
    half_inv_sqrt_d,
    RELU_SCALE,
    EPS,
    KERNEL: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    STATE_PASSES: tl.constexpr,
    FP32_DOT: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_split = tl.program_id(1)
    pid_nh = tl.program_id(2)
    n = pid_nh // H
    h = pid_nh % H
    offs_d = tl.arange(0, BLOCK_D)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_ok = offs_m < M
    wt = load_wt(W, offs_d, offs_m, D, M)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), tl.float32)
    zacc = tl.zeros((BLOCK_M,), tl.float32)
    start = pid_split * ROWS_PER_SPLIT
    end = tl.minimum(start + ROWS_PER_SPLIT, L)
    for l0 in range(start, end, BLOCK_L):
        offs_l = l0 + tl.arange(0, BLOCK_L)
        l_ok = offs_l < end
        x = row_tile(Q + n * sq_n + h * sq_h, offs_l, l_ok, offs_d, D, sq_l)
        do = row_tile(DO + n * sd_n + h * sd_h, offs_l, l_ok, offs_dv, DV, sd_l)
        cq = tl.load(CQ + pid_nh * L + offs_l, mask=l_ok, other=0.0)
        den = tl.load(DEN + pid_nh * L + offs_l, mask=l_ok, other=1.0)
        t = tl.load(TV + pid_nh * L + offs_l, mask=l_ok, other=0.0)
        acc, phi = query_state_grad_tile(
            x,
            do,
            cq,
            den,
            l_ok.to(tl.float32),
            acc,
            wt,
            m_ok,
            half_inv_sqrt_d,
            RELU_SCALE,
            EPS,
            KERNEL,
            STATE_PASSES,
            FP32_DOT,
        )
        zacc -= tl.sum(phi * t[:, None], 0)
    part = pid_nh * NSPLIT + pid_split
    tl.store(
        DST + part * M * DV + offs_m[:, None] * DV + offs_dv[None, :], acc, mask=m_ok[:, None] & (offs_dv[None, :] < DV)
    )
    tl.store(DKS + part * M + offs_m, zacc, mask=m_ok)


@direct_launch
@triton.jit
def _key_grad_kernel(
    K,
    V,
    W,
    BIAS,
    CK,
    DST,
    DKS,
    DK,
    DVO,
    NSPLIT,
    sk_n,
    sk_h,
    sk_s,
    sv_n,
    sv_h,
    sv_s,
    sgk_n,
    sgk_h,
    sgk_s,
    sgv_n,
    sgv_h,
    sgv_s,
    H,
    S,
    D,
    DV,
    M,
    half_inv_sqrt_d,
    RELU_SCALE,
    EPS,
    HAS_BIAS: tl.constexpr,
    KERNEL: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    STATE_PASSES: tl.constexpr,
    MIXED_PASSES: tl.constexpr,
    GRADW_PASSES: tl.constexpr,
    FP32_DOT: tl.constexpr,
):
    pid_s = tl.program_id(0)
    pid_nh = tl.program_id(1)
    n = pid_nh // H
    h = pid_nh % H
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    s_ok = offs_s < S
    y, vt, b = key_tiles(
        K, V, BIAS, n, h, offs_s, s_ok, offs_d, offs_dv, S, D, DV, sk_n, sk_h, sk_s, sv_n, sv_h, sv_s, HAS_BIAS
    )
    yf = y.to(tl.float32)
    sq = tl.sum(yf * yf, 1) * half_inv_sqrt_d
    ck = tl.load(CK + pid_nh)
    dy = tl.zeros((BLOCK_S, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_S, BLOCK_DV), tl.float32)
    rs = tl.zeros((BLOCK_S,), tl.float32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < M
        wt = load_wt(W, offs_d, offs_m, D, M)
        if KERNEL == 0:
            phi, proj = features_tile(y, sq, wt, m_ok, ck - b[:, None], KERNEL, FP32_DOT, RELU_SCALE, EPS)
        else:
            phi, proj = features_tile(y, sq, wt, m_ok, 0.0, KERNEL, FP32_DOT, RELU_SCALE, EPS)
            phi = phi * tl.exp(b)[:, None]
        phi = tl.where(s_ok[:, None], phi, 0.0)
        # dS^T and dz: the sums of the NSPLIT query splits' partials
        dstt = tl.zeros((BLOCK_DV, BLOCK_M), tl.float32)
        dz = tl.zeros((BLOCK_M,), tl.float32)
        for sp in range(NSPLIT):
            part = pid_nh * NSPLIT + sp
            dstt += tl.load(
                DST + part * M * DV + offs_m[None, :] * DV + offs_dv[:, None],
                mask=m_ok[None, :] & (offs_dv[:, None] < DV),
                other=0.0,
            )
            dz += tl.load(DKS + part * M + offs_m, mask=m_ok, other=0.0)
        dphi = mm_exact_a_f32(vt, dstt, tl.zeros((BLOCK_S, BLOCK_M), tl.float32), STATE_PASSES, FP32_DOT) + dz[None, :]
        dv = mm_mixed(phi, tl.trans(dstt), dv, vt, MIXED_PASSES, FP32_DOT)
        if KERNEL == 0:
            ds = dphi * phi
            rs += tl.sum(ds, 1)
        else:
            ds = tl.where((proj > 0.0) & m_ok[None, :], dphi * RELU_SCALE * tl.exp(b)[:, None], 0.0)
        w = load_w(W, offs_m, offs_d, D, M)
        dy = mm_w(ds, w, dy, GRADW_PASSES, FP32_DOT)
    if KERNEL == 0:
        dy = dy - rs[:, None] * yf * (2.0 * half_inv_sqrt_d)
    tl.store(
        DK + n * sgk_n + h * sgk_h + offs_s[:, None] * sgk_s + offs_d[None, :],
        dy.to(DK.dtype.element_ty),
        mask=s_ok[:, None] & (offs_d[None, :] < D),
    )
    tl.store(
        DVO + n * sgv_n + h * sgv_h + offs_s[:, None] * sgv_s + offs_dv[None, :],
        dv.to(DVO.dtype.element_ty),
        mask=s_ok[:, None] & (offs_dv[None, :] < DV),
    )


# ----------------------------------------------------------------------------------------------
# launchers


#: Programs per multiprocessor that the key-state and query-state-gradient kernels' splits aim at,
#: by float32 operands. Their programs run long, so a last wave that fills the device only in part
#: costs its whole length: the float32 key-state kernel (two programs of 4 warps per multiprocessor)
#: made 1.45 waves at 2; at 3 (two waves nearly full), op fwd+bwd on an H100 at B=4, H=8, d=64,
#: m=256: float32 65536 21.14-21.26 -> 19.99-20.09 ms, 16384 5.46-5.52 -> 5.15-5.17 ms; bfloat16
#: (three programs per multiprocessor, one wave at 2) was 7-8% slower at 3. With the float32 tiles
#: of 32 rows and 2 warps (:data:`TILES`) 3 stays the best from 16384 rows (2, 4, 6 and 8 measured
#: per kernel); 6 is faster at 4096 (op fwd+bwd 1.33-1.34 against 1.41-1.42 ms), where the whole op
#: takes a tenth of the 65536 time.
SPLIT_PROGRAMS_PER_SM = {False: 2, True: 3}


def _split(rows: int, blocks_per_row_group: int, device: torch.device, block: int, per_sm: int) -> tuple[int, int]:
    """Number of splits of ``rows`` (a multiple of ``block`` each) that gives about ``per_sm``
    programs per multiprocessor, and the rows per split."""
    want = max(1, -(-per_sm * fixed_grid_size(device) // max(1, blocks_per_row_group)))
    nsplit = max(1, min(want, cdiv(rows, block)))
    per = cdiv(cdiv(rows, nsplit), block) * block
    return cdiv(rows, per), per


def _forward(q, k, v, projection, kernel_fn, key_bias, keep_output, cached=True):
    """``(out, lo, state, ksum, ck, cq, den)``; ``keep_output`` (see :func:`keeps_output`): the output
    is float32-accurate with ``lo``, the int8 rest of a bfloat16 output (else ``lo`` is ``None``)."""
    q, k, v = rows_contiguous(q), rows_contiguous(k), rows_contiguous(v)
    n, h, length, _ = q.shape
    s_len = k.shape[2]
    c = launch_sizes(q, v, projection, kernel_fn)
    w = kernel_projection(projection, q.dtype, "noncausal", cached)
    nmb = cdiv(c["m"], c["BLOCK_M"])
    ks_rows, ks_opts = _tiles("key_state", c)
    qo_rows, qo_opts = _tiles("query_out", c)
    nsplit, per = _split(s_len, nmb * n * h, q.device, ks_rows, SPLIT_PROGRAMS_PER_SM[c["fp32"]])
    nh = n * h
    f32 = dict(device=q.device, dtype=torch.float32)
    a = torch.empty(nh, nsplit, c["m"], c["dv"], **f32)
    z = torch.empty(nh, nsplit, c["m"], **f32)
    mx = torch.empty(nh, nsplit, nmb, **f32)
    bias = key_bias.contiguous() if key_bias is not None else a
    _key_state_kernel[(nmb, nsplit, nh)](
        k,
        v,
        w,
        bias,
        a,
        z,
        mx,
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        h,
        s_len,
        c["d"],
        c["dv"],
        c["m"],
        per,
        nsplit,
        c["half"],
        c["rscale"],
        c["eps"],
        HAS_BIAS=key_bias is not None,
        KERNEL=c["KERNEL"],
        BLOCK_S=ks_rows,
        BLOCK_D=c["BLOCK_D"],
        BLOCK_M=c["BLOCK_M"],
        BLOCK_DV=c["BLOCK_DV"],
        STATE_PASSES=PRECISION.fwd_state,
        FP32_DOT=PRECISION.fp32_dot,
        **ks_opts,
    )
    state = torch.empty(nh, c["m"], c["dv"], **f32)
    ksum = torch.empty(nh, c["m"], **f32)
    ck = torch.empty(nh, **f32)
    query_blocks = cdiv(length, qo_rows)
    merge_in_query = query_blocks * nsplit <= MERGE_IN_KERNEL_MAX
    if not merge_in_query:
        _merge_kernel[(nmb, nh)](
            a,
            z,
            mx,
            state,
            ksum,
            ck,
            nsplit,
            nmb,
            c["m"],
            c["dv"],
            BLOCK_M=c["BLOCK_M"],
            BLOCK_DV=c["BLOCK_DV"],
            BLOCK_P=next_pow2(nsplit * nmb),
        )
    out = heads_last(n, h, length, c["dv"], device=q.device, dtype=store_dtype(q.dtype))
    store_lo = keep_output and q.dtype == torch.bfloat16
    lo = heads_last(n, h, length, c["dv"], device=q.device, dtype=torch.int8) if store_lo else None
    cq = torch.empty(nh, length, **f32)
    den = torch.empty(nh, length, **f32)
    _query_out_kernel[(query_blocks, nh)](
        q,
        w,
        a,
        z,
        mx,
        state,
        ksum,
        ck,
        out,
        out if lo is None else lo,
        cq,
        den,
        nsplit,
        nmb,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        h,
        length,
        c["d"],
        c["dv"],
        c["m"],
        c["half"],
        c["rscale"],
        c["eps"],
        KERNEL=c["KERNEL"],
        BLOCK_L=qo_rows,
        BLOCK_D=c["BLOCK_D"],
        BLOCK_M=c["BLOCK_M"],
        BLOCK_DV=c["BLOCK_DV"],
        MIXED_PASSES=PRECISION.mixed if store_lo else PRECISION.fwd_mixed,  # t needs a float32-accurate output
        FP32_DOT=PRECISION.fp32_dot,
        MERGE=merge_in_query,
        BLOCK_P=next_pow2(nsplit * nmb),
        STORE_LO=store_lo,
        **qo_opts,
    )
    return out.to(q.dtype), lo, state, ksum, ck, cq, den


def _backward(
    dout, q, k, v, out, lo, projection, kernel_fn, key_bias, state, ksum, ck, cq, den, grads=None, cached=True
):
    """``(dq, dk, dv)``; ``out`` (with ``lo``, when given) the kept output, or ``None`` (see
    :func:`keeps_output`)."""
    q, k, v, dout = rows_contiguous(q), rows_contiguous(k), rows_contiguous(v), rows_contiguous(dout)
    t_from_out = out is not None
    if out is None:
        out = dout  # a stand-in for the kernel's output pointers, never read
    n, h, length, _ = q.shape
    s_len = k.shape[2]
    nh = n * h
    c = launch_sizes(q, v, projection, kernel_fn)
    w = kernel_projection(projection, q.dtype, "noncausal", cached)
    f32 = dict(device=q.device, dtype=torch.float32)
    common_consts = (c["half"], c["rscale"], c["eps"])
    dq, dk, dv = gradient_buffers(q, k, v, grads)
    tv = torch.empty(nh, length, **f32)
    qg_rows, qg_opts = _tiles("query_grad", c)
    _query_grad_kernel[(cdiv(length, qg_rows), nh)](
        q,
        dout,
        w,
        state,
        ksum,
        cq,
        den,
        out,
        out if lo is None else lo,
        dq,
        tv,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        dout.stride(0),
        dout.stride(1),
        dout.stride(2),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        dq.stride(0),
        dq.stride(1),
        dq.stride(2),
        h,
        length,
        c["d"],
        c["dv"],
        c["m"],
        *common_consts,
        KERNEL=c["KERNEL"],
        BLOCK_L=qg_rows,
        BLOCK_D=c["BLOCK_D"],
        BLOCK_M=c["BLOCK_M"],
        BLOCK_DV=c["BLOCK_DV"],
        STATE_PASSES=PRECISION.state,
        GRADW_PASSES=PRECISION.grad_w_passes(c["m"], c["fp32"]),
        FP32_DOT=PRECISION.fp32_dot,
        T_FROM_OUT=t_from_out,
        HAS_LO=lo is not None,
        **qg_opts,
    )
    nmb = cdiv(c["m"], c["BLOCK_M"])
    sg_rows, sg_opts = _tiles("query_state_grad", c)
    nsplit, per = _split(length, nmb * nh, q.device, sg_rows, SPLIT_PROGRAMS_PER_SM[c["fp32"]])
    dst = torch.empty(nh, nsplit, c["m"], c["dv"], **f32)
    dks = torch.empty(nh, nsplit, c["m"], **f32)
    _query_state_grad_kernel[(nmb, nsplit, nh)](
        q,
        dout,
        w,
        cq,
        den,
        tv,
        dst,
        dks,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        dout.stride(0),
        dout.stride(1),
        dout.stride(2),
        h,
        length,
        c["d"],
        c["dv"],
        c["m"],
        per,
        nsplit,
        *common_consts,
        KERNEL=c["KERNEL"],
        BLOCK_L=sg_rows,
        BLOCK_D=c["BLOCK_D"],
        BLOCK_M=c["BLOCK_M"],
        BLOCK_DV=c["BLOCK_DV"],
        STATE_PASSES=PRECISION.state,
        FP32_DOT=PRECISION.fp32_dot,
        **sg_opts,
    )
    kg_rows, kg_opts = _tiles("key_grad", c)
    key_blocks = cdiv(s_len, kg_rows)
    if key_blocks * nsplit > MERGE_IN_KERNEL_MAX:  # else the key-gradient kernel sums the splits
        dst, dks, nsplit = dst.sum(1), dks.sum(1), 1
    bias = key_bias.contiguous() if key_bias is not None else dst
    _key_grad_kernel[(key_blocks, nh)](
        k,
        v,
        w,
        bias,
        ck,
        dst,
        dks,
        dk,
        dv,
        nsplit,
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        dk.stride(0),
        dk.stride(1),
        dk.stride(2),
        dv.stride(0),
        dv.stride(1),
        dv.stride(2),
        h,
        s_len,
        c["d"],
        c["dv"],
        c["m"],
        *common_consts,
        HAS_BIAS=key_bias is not None,
        KERNEL=c["KERNEL"],
        BLOCK_S=kg_rows,
        BLOCK_D=c["BLOCK_D"],
        BLOCK_M=c["BLOCK_M"],
        BLOCK_DV=c["BLOCK_DV"],
        STATE_PASSES=PRECISION.state,
        MIXED_PASSES=PRECISION.mixed,
        GRADW_PASSES=PRECISION.grad_w_passes(c["m"], c["fp32"]),
        FP32_DOT=PRECISION.fp32_dot,
        **kg_opts,
    )
    return finish_gradients((dq, dk, dv), q, k, v, grads)


# ----------------------------------------------------------------------------------------------
# custom ops


@torch.library.custom_op("randattn::noncausal_fwd", mutates_args=())
def _noncausal_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    projection: torch.Tensor,
    kernel_fn: str,
    key_bias: torch.Tensor | None,
    keep_output: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    out, lo, *rest = _forward(q, k, v, projection, kernel_fn, key_bias, keep_output, cached=False)
    if lo is None:  # a custom op returns tensors: an empty one stands for no rest
        lo = torch.empty(0, device=q.device, dtype=torch.int8)
    return out, lo, *rest


@_noncausal_fwd.register_fake
def _(q, k, v, projection, kernel_fn, key_bias, keep_output):
    n, h, length, _ = q.shape
    m, dv = projection.shape[0], v.shape[-1]
    f32 = dict(device=q.device, dtype=torch.float32)
    store_lo = keep_output and q.dtype == torch.bfloat16
    return (
        heads_last(n, h, length, dv, device=q.device, dtype=q.dtype),
        heads_last(n, h, length, dv, device=q.device, dtype=torch.int8)
        if store_lo
        else torch.empty(0, device=q.device, dtype=torch.int8),
        torch.empty(n * h, m, dv, **f32),
        torch.empty(n * h, m, **f32),
        torch.empty(n * h, **f32),
        torch.empty(n * h, length, **f32),
        torch.empty(n * h, length, **f32),
    )


@torch.library.custom_op("randattn::noncausal_bwd", mutates_args=())
def _noncausal_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor | None,
    lo: torch.Tensor | None,
    projection: torch.Tensor,
    kernel_fn: str,
    key_bias: torch.Tensor | None,
    state: torch.Tensor,
    ksum: torch.Tensor,
    ck: torch.Tensor,
    cq: torch.Tensor,
    den: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(dout, q, k, v, out, lo, projection, kernel_fn, key_bias, state, ksum, ck, cq, den, cached=False)


@_noncausal_bwd.register_fake
def _(dout, q, k, v, out, lo, projection, kernel_fn, key_bias, state, ksum, ck, cq, den):
    n, h, length, d = q.shape
    s_len, dv = v.shape[2], v.shape[3]
    return (
        heads_last(n, h, length, d, device=q.device, dtype=q.dtype),
        heads_last(n, h, s_len, d, device=k.device, dtype=k.dtype),
        heads_last(n, h, s_len, dv, device=v.device, dtype=v.dtype),
    )


def _setup_context(ctx, inputs, output):
    q, k, v, projection, kernel_fn, key_bias, keep_output = inputs
    out, lo, *rest = output
    ctx.kernel_fn = kernel_fn
    # the output only where t comes from it (keeps_output), its rest only where it has one
    ctx.save_for_backward(
        q, k, v, projection, key_bias, out if keep_output else None, lo if lo.numel() else None, *rest
    )
    ctx.mark_non_differentiable(lo, *rest)


def _backward_rule(ctx, dout, *unused):
    q, k, v, projection, key_bias, *saved = ctx.saved_tensors
    dq, dk, dv = torch.ops.randattn.noncausal_bwd(
        dout, q, k, v, *saved[:2], projection, ctx.kernel_fn, key_bias, *saved[2:]
    )
    return dq, dk, dv, None, None, None, None


_noncausal_fwd.register_autograd(_backward_rule, setup_context=_setup_context)


def forward_saving(q, k, v, projection, kernel_fn, key_bias, needs_grad=True):
    """The forward kernels: ``(out, saved)`` with what :func:`backward_from` needs (the output among
    it only where ``t`` comes from it, :func:`keeps_output`)."""
    keep = keeps_output(q.shape[2], q.dtype, kernel_fn, needs_grad)
    out, lo, *rest = _forward(q, k, v, projection, kernel_fn, key_bias, keep)
    return out, (out if keep else None, lo, *rest)


def backward_from(dout, q, k, v, projection, kernel_fn, key_bias, saved, grads=None):
    """The backward kernels: ``(dq, dk, dv)``, written into ``grads`` (three views) when given."""
    out, lo, *rest = saved
    return _backward(dout, q, k, v, out, lo, projection, kernel_fn, key_bias, *rest, grads=grads)


def noncausal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    projection: torch.Tensor,
    kernel_fn: str,
    key_bias: torch.Tensor | None,
) -> torch.Tensor:
    """Random-feature attention of every query over every key, with the Triton kernels.

    Same contract as :func:`randattn.ops.noncausal.reference.noncausal_attention`; differentiable in
    ``q``, ``k`` and ``v`` (not in ``projection`` or ``key_bias``).

    Args:
        q: ``(N, H, L, d)``; k: ``(N, H, S, d)``; v: ``(N, H, S, d_v)`` (one floating dtype).
        projection: ``(m, d)`` float32.
        kernel_fn: ``"softmax"`` or ``"relu"``.
        key_bias: ``(N, S)`` float32 additive key bias or ``None``.

    Returns:
        ``(N, H, L, d_v)`` in ``q.dtype``; rows with every key masked are zero. float16 inputs run
        the float32 kernels (see :func:`randattn.ops._triton_utils.kernel_dtype`).
    """
    dtype = kernel_dtype(q.dtype)
    args = (q.to(dtype), k.to(dtype), v.to(dtype), projection.float(), kernel_fn, key_bias)
    if torch.compiler.is_compiling():
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        out = torch.ops.randattn.noncausal_fwd(*args, keeps_output(q.shape[2], dtype, kernel_fn, needs_grad))[0]
    else:
        out = KernelAttention.apply(sys.modules[__name__], *args)
    return out.to(q.dtype)
