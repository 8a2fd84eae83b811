"""Causal random-feature attention as chunk-parallel Triton kernels, wrapped as ``torch.library`` custom ops.

Positions are cut into chunks of ``C`` (:data:`CHUNK`). The stabiliser of position ``j`` is the running
maximum ``c_j`` of ``r_j = max_m s_k[j]`` (never a later key). The carried state of chunk ``t`` is
``S_t = sum_{j < tC} exp(s_k[j] - c_prev) v_j`` at the scale ``c_prev`` of the last position of
chunk ``t - 1`` (``c_j`` cancels inside the state).

Forward:

1. ``_chunk_max_kernel`` (chunk x feature block, parallel; softmax only): the keys' logit maxima
   ``r`` and each chunk's maximum.
2. ``_stabiliser_kernel`` (blocks of chunks, parallel): ``c = cummax(r)``, each chunk's end and the
   scale ``c_prev`` of its carried state.
3. ``_state_kernel``: sequential over chunks with the state on chip, parallel over ``(n, h)`` and
   feature blocks, it writes each chunk's carried state. (Partial states per chunk and a scan over
   them took longer: H100, bf16, 4 x 8 heads, m = 256, op forward 1.89 / 7.36 ms at 16384 / 65536
   positions against 1.66 / 6.50 with this step, the same states up to rounding.)
4. ``_chunk_out_kernel`` (chunk-parallel): inter-chunk part ``phi_q S_t`` plus the intra-chunk
   quadratic part ``(phi_q phit_k^T * exp(c_j - c_i))_{j<=i} v``, divided by the matching denominator.

States in windows: the carried states are ``N H L/C m d_v`` float32 values (537 MB for 4 x 8 heads,
16384 positions, ``m = 256``, ``d_v = 64``). Unless they fit a window (see :func:`_windows`), steps 1-4
run window by window (chunks ``t0 .. t0 + W``): the walk of a window starts from the previous
window's final state (``CARRY``), and the stabilisers of a window need no later position, so the
results equal those of one window bit for bit while only one window's states exist.

Backward: the carried states again, window by window, unless the forward kept them (kept only up to
:data:`KEEP_STATES_MAX_BYTES`, since a model of many layers would hold one such tensor per layer
between the passes): ``_state_kernel`` recomputes them from the forward's stabilisers in one launch
per window, bit-equal to the forward's;
``t_i = dout_i . num_i / den_i^2 = dout_i . out_i / den_i`` needs the float32 output: beside kept
states the forward keeps it as ``hi + lo`` in the input dtype; otherwise ``_chunk_out_kernel``
recomputes it in each window (``MODE`` 2) and writes only ``t``, so no second copy of the output
lives between the passes;
``_chunk_grad_kernel`` gives ``dq`` chunk by chunk from the carried states, which are then freed;
``_rstate_kernel`` builds the states of later queries
``R_t = sum_{i after chunk t} exp(c_end - c_i) phi_q[i] g_i^T`` chunk by chunk from the last, the
state on chip (parallel over ``(n, h)`` and feature blocks; windows from the last one back),
and a second launch of ``_chunk_grad_kernel`` gives ``dk`` and ``dv``. So at most one window of
states exists at a time. Features are always recomputed, never stored.

Local window (``window > 0``, softmax, at most :data:`CHUNK` keys): the queries of chunk ``t`` read
``S_{t-1}`` and weigh the keys of chunks ``t - 1`` and ``t`` pair by pair, exact within the window
and estimated beyond it; the keys' side reads ``R_{t+1}`` and weighs the queries of chunks ``t`` and
``t + 1`` pair by pair. The states are the same as without a window; only which one a chunk reads
changes (:class:`_Lag` carries a window's edge state across windows of chunks).
"""

from __future__ import annotations

import functools
import os
import sys
import types

import torch
import triton
import triton.language as tl

from .._triton_utils import (
    NEG_BIG,
    PRECISION,
    cdiv,
    env_bytes,
    features_tile,
    finish_gradients,
    gradient_buffers,
    heads_last,
    kernel_dtype,
    kernel_projection,
    key_bias,
    key_tiles,
    launch_opts,
    launch_sizes,
    load_w,
    load_wt,
    logits_tile,
    mm_exact_a,
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
    store_dtype,
)
from ..eager import KernelAttention
from ..launch import direct_launch

__all__ = ["causal_attention", "CHUNK", "forward_saving", "backward_from"]

#: Positions per chunk of the kernels.
CHUNK = 64
#: The forward keeps the carried states for the backward up to this many bytes (short sequences,
#: where the three launches that recompute them cost more host time than the GPU time they take);
#: larger states are recomputed in the backward instead of held between the passes. Overridable
#: (``RANDATTN_TRITON_KEEP_STATES``, bytes): keeping states is faster and holds more memory.
KEEP_STATES_MAX_BYTES = env_bytes("RANDATTN_TRITON_KEEP_STATES", 64 << 20)
#: Otherwise the states exist one window of chunks at a time (at least :data:`STABILISER_CHUNKS`
#: chunks): the forward's output and the backward's two gradient sides run window by window, each
#: window's states computed from the previous window's final state. Each window costs dependent
#: launches (four forward, five backward): larger windows are faster and hold more memory. A window's
#: float32 states take at most this many bytes or :data:`STATE_WINDOW_PER_Q` times as many as ``q``
#: itself, whichever is more, so that at long sequences the states grow with the sequence as the
#: op's inputs do (``4 m d_v`` bytes a position against ``q``'s ``d``: m = 256, d = 64 in bf16 gives
#: windows of a quarter of the sequence), and the forward's windows may also take
#: :data:`STATE_WINDOW_KV` times the bytes of ``k`` and ``v``: the backward holds the gradients of
#: ``q``, ``k`` and ``v`` beside its window, the forward only the output in their place, so the
#: larger forward window leaves the higher of the two peaks where it was. H100, bf16, 4 x 8 heads,
#: m = 256, module fwd+bwd ms in turns (peak MiB fwd/bwd), windows of at least 64 MiB or ``q``'s
#: bytes against this rule (32 MiB or twice ``q``'s bytes): 4096 positions 3.52-3.64 (187/217)
#: against 3.68-4.13 (153/185), ``nn.MultiheadAttention`` 194/215; 8192 the same windows (299/362,
#: MHA 546/389); 16384 9.25-9.34 (528/654) against 9.09-9.12 (594/719); 65536 31.03-31.10
#: (2101/2601) against 30.72-30.97 (2365/2861), MHA's non-causal 1794/3090. Overridable for tuning
#: runs (``RANDATTN_TRITON_STATE_WINDOW``, bytes).
STATE_WINDOW_BYTES = env_bytes("RANDATTN_TRITON_STATE_WINDOW", 32 << 20)
#: The share of ``q``'s bytes in a window's budget (see :data:`STATE_WINDOW_BYTES`; 0: the fixed
#: budget alone).
STATE_WINDOW_PER_Q = 2
#: The share of the bytes of ``k`` and ``v`` that the forward's windows add (see
#: :data:`STATE_WINDOW_BYTES`).
STATE_WINDOW_KV = 1


def _keeps_states(nh: int, length: int, m: int, dv: int) -> bool:
    """Whether the forward keeps the ``(nh, T, m, dv)`` float32 carried states for the backward."""
    return nh * -(-length // CHUNK) * m * dv * 4 <= KEEP_STATES_MAX_BYTES


#: Features per program of the kernels that walk the chunks one after another with the state on chip
#: (``_state_kernel``, ``_rstate_kernel``): their programs, ``(N H, m / SEQ_BLOCK_M)``, are all the
#: parallelism they have. H100, bf16, 4 x 8 heads, m = 256, op fwd+bwd at 16384 / 65536 positions:
#: 32 features 6.93 / 27.52 ms, 64 features 7.24 / 29.10; then ``_state_kernel`` with 4 stages instead
#: of 2 (``LAUNCH["state"]``): 6.68 / 25.53 against 6.79-6.80 / 26.07-26.08. Overridable for tuning runs.
SEQ_BLOCK_M = int(os.environ.get("RANDATTN_TRITON_SEQ_BLOCK_M", "32"))
#: Chunks per step of the sequential state kernels (see :func:`_state_kernel`).
STATE_UNROLL = int(os.environ.get("RANDATTN_TRITON_STATE_UNROLL", "1"))


@triton.jit
def _key_chunk(
    K,
    V,
    BIAS,
    n,
    h,
    offs_s,
    s_ok,
    offs_d,
    offs_dv,
    m_ok,
    wt,
    sk_n,
    sk_h,
    sk_s,
    sv_n,
    sv_h,
    sv_s,
    L,
    D,
    DV,
    half_inv_sqrt_d,
    RELU_SCALE,
    EPS,
    HAS_BIAS: tl.constexpr,
    KERNEL: tl.constexpr,
    FP32_DOT: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Keys ``offs_s`` against a feature block: ``(s, v)`` (``s`` as in :func:`_key_logits`)."""
    y, vt, b = key_tiles(
        K, V, BIAS, n, h, offs_s, s_ok, offs_d, offs_dv, L, D, DV, sk_n, sk_h, sk_s, sv_n, sv_h, sv_s, HAS_BIAS
    )
    s = _key_logits(y, b, s_ok, m_ok, wt, half_inv_sqrt_d, RELU_SCALE, EPS, KERNEL, FP32_DOT)
    return s, vt


@triton.jit
def _key_logits(
    y,
    b,
    s_ok,
    m_ok,
    wt,
    half_inv_sqrt_d,
    RELU_SCALE,
    EPS,
    KERNEL: tl.constexpr,
    FP32_DOT: tl.constexpr,
):
    """Key tile ``y`` (bias ``b``) against a feature block. Softmax: the logits plus the key bias
    (``-inf`` for keys and features out of range), unstabilised; ReLU: the features times
    ``exp(bias)`` (0 out of range)."""
    proj = logits_tile(y, wt, FP32_DOT)
    ok = s_ok[:, None] & m_ok[None, :]
    if KERNEL == 0:
        yf = y.to(tl.float32)
        sq = tl.sum(yf * yf, 1) * half_inv_sqrt_d
        s = tl.where(ok, proj - sq[:, None] + b[:, None], float("-inf"))
    else:
        s = tl.where(ok, (tl.maximum(proj, 0.0) * RELU_SCALE + EPS) * tl.exp(b)[:, None], 0.0)
    return s


@direct_launch
@triton.jit
def _chunk_max_kernel(
    K,
    W,
    BIAS,
    MB,
    RP,
    sk_n,
    sk_h,
    sk_s,
    H,
    L,
    D,
    M,
    NT,
    NMB,
    T0,
    NW,
    half_inv_sqrt_d,
    HAS_BIAS: tl.constexpr,
    KERNEL: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    FP32_DOT: tl.constexpr,
):
    """The keys' logit maxima of chunk ``T0 + program_id(1)`` (of a window of ``NW`` chunks) against
    feature block ``program_id(0)``: per key ``RP`` (the window's, positions counted from ``T0``) and
    over the chunk ``MB`` (the whole sequence's, floored). Softmax only: kept keys only (logit plus
    bias; ``-inf`` for a dropped key)."""
    pid_m = tl.program_id(0)
    pid_w = tl.program_id(1)
    pid_t = T0 + pid_w
    pid_nh = tl.program_id(2)
    n = pid_nh // H
    h = pid_nh % H
    offs_s = pid_t * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_d = tl.arange(0, BLOCK_D)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    s_ok = offs_s < L
    m_ok = offs_m < M
    wt = load_wt(W, offs_d, offs_m, D, M)
    y = row_tile(K + n * sk_n + h * sk_h, offs_s, s_ok, offs_d, D, sk_s)
    b = key_bias(BIAS, n, offs_s, s_ok, L, HAS_BIAS)
    s = _key_logits(y, b, s_ok, m_ok, wt, half_inv_sqrt_d, 0.0, 0.0, KERNEL, FP32_DOT)
    rmax = tl.max(s, 1)
    tl.store(MB + (pid_nh * NT + pid_t) * NMB + pid_m, tl.maximum(tl.max(rmax, 0), NEG_BIG))
    tl.store(RP + (pid_nh * NW * BLOCK_C + offs_s - T0 * BLOCK_C) * NMB + pid_m, rmax, mask=s_ok)


@triton.jit
def _carry_in(
    CARRY,
    CARRY_Z,
    pid_nh,
    offs_m,
    offs_dv,
    s_mask,
    z_mask,
    M,
    DV,
    HAS_CARRY: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    """The state tile and its sums a sequential kernel starts from: ``CARRY``, ``CARRY_Z`` (one per
    head, left by the previous window) when ``HAS_CARRY``, else zeros."""
    if HAS_CARRY:
        st = tl.load(CARRY + pid_nh * M * DV + offs_m[:, None] * DV + offs_dv[None, :], mask=s_mask, other=0.0)
        sz = tl.load(CARRY_Z + pid_nh * M + offs_m, mask=z_mask, other=0.0)
    else:
        st = tl.zeros((BLOCK_M, BLOCK_DV), tl.float32)
        sz = tl.zeros((BLOCK_M,), tl.float32)
    return st, sz


@triton.jit
def _carry_out(CARRY, CARRY_Z, st, sz, pid_nh, offs_m, offs_dv, s_mask, z_mask, M, DV, HAS_CARRY: tl.constexpr):
    """Leave the final state tile and its sums for the next window (when ``HAS_CARRY``)."""
    if HAS_CARRY:
        tl.store(CARRY + pid_nh * M * DV + offs_m[:, None] * DV + offs_dv[None, :], st, mask=s_mask)
        tl.store(CARRY_Z + pid_nh * M + offs_m, sz, mask=z_mask)


@direct_launch
@triton.jit
def _state_kernel(
    K,
    V,
    W,
    BIAS,
    CEND,
    DECAY,
    A,
    ZA,
    CARRY,
    CARRY_Z,
    sk_n,
    sk_h,
    sk_s,
    sv_n,
    sv_h,
    sv_s,
    H,
    L,
    D,
    DV,
    M,
    NT,
    T0,
    STEPS,
    NW,
    half_inv_sqrt_d,
    RELU_SCALE,
    EPS,
    HAS_BIAS: tl.constexpr,
    KERNEL: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    STATE_PASSES: tl.constexpr,
    FP32_DOT: tl.constexpr,
    HAS_CARRY: tl.constexpr,
    UNROLL: tl.constexpr,
):
    """The carried states from known stabilisers (step 3 of the module docstring, and the backward's
    recomputation), for one feature block: chunk by chunk, ``A[t]``, ``ZA[t]`` get the state before
    chunk ``t``, then ``state <- state * DECAY[t] + sum_j exp(s_k[j] - c_end) v_j`` (ReLU: the
    features times ``exp(-c_end) = 1``), the state on chip between chunks: no partial states through
    memory (H100, bf16, B=4, 8 heads, m=256, d_v=64, backward's recomputation, op fwd+bwd at 4096 /
    16384 / 65536 positions, 64 features per program: 2.40 / 7.47 / 30.00 ms with partial states and
    a scan, 2.07 / 7.24 / 29.01 with this kernel).

    Runs chunks ``T0 .. T0 + STEPS`` (``A``, ``ZA`` hold a window of ``NW`` chunks from ``T0``);
    ``HAS_CARRY``: the state starts from ``CARRY``, ``CARRY_Z`` (the previous window's final state)
    and ends there.
    """
    pid_m = tl.program_id(0)
    pid_nh = tl.program_id(1)
    n = pid_nh // H
    h = pid_nh % H
    offs_d = tl.arange(0, BLOCK_D)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_ok = offs_m < M
    s_mask = m_ok[:, None] & (offs_dv[None, :] < DV)
    wt = load_wt(W, offs_d, offs_m, D, M)
    st, sz = _carry_in(CARRY, CARRY_Z, pid_nh, offs_m, offs_dv, s_mask, m_ok, M, DV, HAS_CARRY, BLOCK_M, BLOCK_DV)
    # UNROLL chunks per step (STATE_UNROLL): their contributions are independent of each other and of
    # the state, only the updates are sequential; on an H100 (Triton 3.6) 1 is the fastest (2 and 4 are
    # 9% and 65% slower: the compiler does not overlap the chunks, and wider steps cost registers)
    for pid_w in range(0, STEPS, UNROLL):
        for u in tl.static_range(UNROLL):
            acc, zsum, decay = _state_step(
                K, V, BIAS, CEND, DECAY, n, h, pid_nh, T0 + pid_w + u, T0 + STEPS, offs_d, offs_dv, m_ok, wt,
                sk_n, sk_h, sk_s, sv_n, sv_h, sv_s, L, D, DV, NT, half_inv_sqrt_d, RELU_SCALE, EPS,
                HAS_BIAS, KERNEL, BLOCK_C, BLOCK_M, BLOCK_DV, STATE_PASSES, FP32_DOT,
            )  # fmt: skip
            base = pid_nh * NW + pid_w + u
            ok = m_ok & (pid_w + u + tl.zeros_like(offs_m) < STEPS)  # (a vector: the interpreter's masks)
            tl.store(
                A + base * M * DV + offs_m[:, None] * DV + offs_dv[None, :],
                st.to(A.dtype.element_ty),
                mask=ok[:, None] & s_mask,
            )
            tl.store(ZA + base * M + offs_m, sz, mask=ok)
            st = st * decay + acc
            sz = sz * decay + zsum
    _carry_out(CARRY, CARRY_Z, st, sz, pid_nh, offs_m, offs_dv, s_mask, m_ok, M, DV, HAS_CARRY)


@triton.jit
def _state_step(
    K,
    V,
    BIAS,
    CEND,
    DECAY,
    n,
    h,
    pid_nh,
    pid_t,
    end,
    offs_d,
    offs_dv,
    m_ok,
    wt,
    sk_n,
    sk_h,
    sk_s,
    sv_n,
    sv_h,
    sv_s,
    L,
    D,
    DV,
    NT,
    half_inv_sqrt_d,
    RELU_SCALE,
    EPS,
    HAS_BIAS: tl.constexpr,
    KERNEL: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    STATE_PASSES: tl.constexpr,
    FP32_DOT: tl.constexpr,
):
    """Chunk ``pid_t``'s contribution to the carried state of one feature block: ``(acc, zsum,
    decay)`` with ``acc = sum_j p_j v_j^T``, ``zsum = sum_j p_j`` (``p_j = exp(s_k[j] - c_end)``; ReLU:
    the features times ``exp(-c_end)``) and the chunk's decay; for a chunk from ``end`` on 0, 0 and 1:
    the update then leaves the state as it is."""
    offs_s = pid_t * BLOCK_C + tl.arange(0, BLOCK_C)
    s_ok = (offs_s < L) & (offs_s < end * BLOCK_C)
    s, vt = _key_chunk(
        K,
        V,
        BIAS,
        n,
        h,
        offs_s,
        s_ok,
        offs_d,
        offs_dv,
        m_ok,
        wt,
        sk_n,
        sk_h,
        sk_s,
        sv_n,
        sv_h,
        sv_s,
        L,
        D,
        DV,
        half_inv_sqrt_d,
        RELU_SCALE,
        EPS,
        HAS_BIAS,
        KERNEL,
        FP32_DOT,
        BLOCK_C,
    )
    t_in = tl.minimum(pid_t, NT - 1)  # a chunk past the sequence reads the last one's (unused) values
    cend = tl.load(CEND + pid_nh * NT + t_in)
    decay = tl.where(pid_t < end, tl.load(DECAY + pid_nh * NT + t_in), 1.0)
    if KERNEL == 0:
        p = tl.exp(s - cend)
    else:
        p = s * tl.exp(-cend)
    acc = mm_exact_b(tl.trans(p), vt, tl.zeros((BLOCK_M, BLOCK_DV), tl.float32), STATE_PASSES, FP32_DOT)
    return acc, tl.sum(p, 0), decay


@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b)


@direct_launch
@triton.jit
def _stabiliser_kernel(
    RP,
    MB,
    C,
    CEND,
    CPREV,
    DECAY,
    L,
    NT,
    NMB,
    T0,
    NW,
    BLOCK_NMB: tl.constexpr,
    BLOCK_C: tl.constexpr,
    CHUNKS: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """``c = cummax(max(max_b RP, floor))`` over positions, the chunks' ends ``CEND`` (``c`` at each
    chunk's last position) and ``CPREV`` (the previous chunk's end; for chunk 0 ``c_0``, the smallest
    scale of that chunk), for ``CHUNKS`` chunks of ``BLOCK_C`` positions per program. The running
    maximum before the program's first chunk comes from the chunks' maxima ``MB`` (``(NT, NMB)`` per
    head, floored), so the programs of a head run in parallel. Also the states' decay from one chunk's
    end to the next, ``DECAY = exp(CPREV - CEND)``. The programs cover the window of
    chunks from ``T0`` (a multiple of ``CHUNKS``), whose row maxima ``RP`` hold ``NW`` chunks per head
    (positions counted from the window's first)."""
    pid_s = tl.program_id(0)
    pid = tl.program_id(1)
    offs_b = tl.arange(0, BLOCK_NMB)
    offs_k = tl.arange(0, CHUNKS)
    t0 = T0 + pid_s * CHUNKS
    rp_head = RP + (pid * NW * BLOCK_C - T0 * BLOCK_C) * NMB  # position p of the head at rp_head + p * NMB
    carry = NEG_BIG  # c before chunk t0: the largest maximum of the chunks before it
    for tb in range(0, t0, BLOCK_T):
        offs_tb = tb + tl.arange(0, BLOCK_T)
        mb = tl.load(
            MB + (pid * NT + offs_tb[:, None]) * NMB + offs_b[None, :],
            mask=(offs_tb[:, None] < t0) & (offs_b[None, :] < NMB),
            other=NEG_BIG,
        )
        carry = tl.maximum(carry, tl.max(tl.max(mb, 1), 0))
    # c_0 = r_0 (floored): the scale of chunk 0's empty state (used by the first window only; later
    # windows read their own first position here)
    first = tl.maximum(
        tl.max(tl.load(RP + pid * NW * BLOCK_C * NMB + offs_b, mask=offs_b < NMB, other=NEG_BIG), 0), NEG_BIG
    )
    offs_l = t0 * BLOCK_C + tl.arange(0, CHUNKS * BLOCK_C)
    l_ok = offs_l < L
    rp = tl.load(
        rp_head + offs_l[:, None] * NMB + offs_b[None, :],
        mask=l_ok[:, None] & (offs_b[None, :] < NMB),
        other=NEG_BIG,
    )
    r = tl.where(l_ok, tl.maximum(tl.max(rp, 1), NEG_BIG), NEG_BIG)
    c = tl.maximum(tl.associative_scan(r, 0, _max_combine), carry)
    tl.store(C + pid * L + offs_l, c, mask=l_ok)
    # c is non-decreasing: a chunk's end is its largest c, and the previous chunk's end is the
    # largest r before the chunk (or the carry)
    cend = tl.max(tl.reshape(c, (CHUNKS, BLOCK_C)), 1)
    chunk_r = tl.max(tl.reshape(r, (CHUNKS, BLOCK_C)), 1)
    before = tl.max(tl.where(offs_k[None, :] < offs_k[:, None], chunk_r[None, :], NEG_BIG), 1)
    offs_t = t0 + offs_k
    cprev = tl.where(offs_t == 0, first, tl.maximum(before, carry))
    t_ok = offs_t < NT
    tl.store(CEND + pid * NT + offs_t, cend, mask=t_ok)
    tl.store(CPREV + pid * NT + offs_t, cprev, mask=t_ok)
    tl.store(DECAY + pid * NT + offs_t, tl.exp(cprev - cend), mask=t_ok)


@triton.jit
def _exact_weights(x, y, b, cq, cc, near, M, scale, FP32_DOT: tl.constexpr):
    """``m exp(q_i . k_j / sqrt(d) + b_j - cq_i - c_i)`` where ``near``, else 0: the exact softmax
    weights of a local window at the estimate's scale (``x``, ``y`` the query and key tiles as
    loaded, ``scale = 1 / sqrt(d)``, ``cq`` the queries' feature scales, ``cc`` their key scales)."""
    yt = tl.trans(y)
    dots = mm_exact_a(x, yt, yt, tl.zeros((x.shape[0], y.shape[0]), tl.float32), 1, FP32_DOT)
    logit = tl.where(near, dots * scale + b[None, :] - cq[:, None] - cc[:, None], float("-inf"))
    return tl.where(near, M * tl.exp(logit), 0.0)


@triton.jit
def _rescale(ck, cq, near):
    """``exp(c_j - c_i)`` for the pairs ``near`` (rows: the queries' ``cq``, columns: the keys' ``ck``;
    at most 1, since ``c`` is a running maximum), else 0."""
    return tl.where(near, tl.exp(tl.where(near, ck[None, :] - cq[:, None], 0.0)), 0.0)


@triton.jit
def _state_tiles(
    ST, SZ, LAG, LAG_Z, pid_nh, idx, in_buffer, from_lag, NW, offs_m, offs_dv, m_ok, M, DV, LAGGED: tl.constexpr
):
    """A state tile (a feature block by the value columns) and its sums: chunk ``idx`` of head
    ``pid_nh``'s window buffers ``ST``, ``SZ``. ``LAGGED``: from the buffers where ``in_buffer``, from
    ``LAG``, ``LAG_Z`` (one state per head) where ``from_lag``, else zeros."""
    ptrs = offs_m[:, None] * DV + offs_dv[None, :]
    base = pid_nh * NW + idx
    st = _pick(
        ST,
        LAG,
        base * M * DV + ptrs,
        pid_nh * M * DV + ptrs,
        m_ok[:, None] & (offs_dv[None, :] < DV),
        in_buffer,
        from_lag,
        LAGGED,
    )
    z = _pick(SZ, LAG_Z, base * M + offs_m, pid_nh * M + offs_m, m_ok, in_buffer, from_lag, LAGGED)
    return st, z


@triton.jit
def _pick(P, LAG, off, lag_off, mask, in_buffer, from_lag, LAGGED: tl.constexpr):
    """``P[off]`` (0 where not ``mask``); ``LAGGED``: ``P[off]`` where ``in_buffer``, ``LAG[lag_off]``
    where ``from_lag``, else 0."""
    if LAGGED:
        # the flags broadcast as blocks (the interpreter rejects a scalar flag and-ed with a block)
        in_p = mask & ((off * 0 + in_buffer.to(tl.int32)) != 0)
        in_lag = mask & ((off * 0 + from_lag.to(tl.int32)) != 0)
        x = tl.load(P + off, mask=in_p, other=0.0) + tl.load(LAG + lag_off, mask=in_lag, other=0.0)
    else:
        x = tl.load(P + off, mask=mask, other=0.0)
    return x


@triton.jit
def _pair_dots(do, v, FP32_DOT: tl.constexpr):
    """``dout_i . v_j`` (rows: the queries of ``do``, columns: the keys of ``v``; exact products)."""
    vt = tl.trans(v)
    return mm_exact_a(do, vt, vt, tl.zeros((do.shape[0], v.shape[0]), tl.float32), 1, FP32_DOT)


@triton.jit
def _weight_grad(do, v, inv_den, t, FP32_DOT: tl.constexpr):
    """``dA_ij = (dout_i . v_j) / den_i - t_i``: the gradient of the loss in each unnormalised weight
    (rows: the queries of ``do``, columns: the keys of ``v``)."""
    return _pair_dots(do, v, FP32_DOT) * inv_den[:, None] - t[:, None]


@triton.jit
def _window_keys(
    K,
    V,
    BIAS,
    C,
    n,
    h,
    pid_nh,
    offs_p,
    offs_d,
    offs_dv,
    L,
    D,
    DV,
    sk_n,
    sk_h,
    sk_s,
    sv_n,
    sv_h,
    sv_s,
    half_inv_sqrt_d,
    HAS_BIAS: tl.constexpr,
):
    """The keys at ``offs_p`` (a neighbouring chunk; positions out of ``[0, L)`` masked) for the local
    window: ``(y, v, b, |y|^2 / (2 sqrt d), c, ok)``."""
    p_ok = (offs_p >= 0) & (offs_p < L)
    yp, vp, bp = key_tiles(
        K, V, BIAS, n, h, offs_p, p_ok, offs_d, offs_dv, L, D, DV, sk_n, sk_h, sk_s, sv_n, sv_h, sv_s, HAS_BIAS
    )
    ypf = yp.to(tl.float32)
    ccp = tl.load(C + pid_nh * L + offs_p, mask=p_ok, other=0.0)
    return yp, vp, bp, tl.sum(ypf * ypf, 1) * half_inv_sqrt_d, ccp, p_ok


@triton.jit
def _key_features(y, sqy, b, cc, ok, wt, m_ok, FP32_DOT: tl.constexpr):
    """Softmax key features ``exp(s_k[j] + b_j - c_j)`` of a feature block (0 where not ``ok``)."""
    phi, _ = features_tile(y, sqy, wt, m_ok, (cc - b)[:, None], 0, FP32_DOT, 1.0, 0.0)
    return tl.where(ok[:, None], phi, 0.0)


@direct_launch
@triton.jit
def _chunk_out_kernel(
    Q,
    K,
    V,
    W,
    BIAS,
    C,
    CPREV,
    ST,
    SZ,
    LAG,
    LAG_Z,
    OUT,
    OUT_LO,
    CQ,
    DEN,
    DO,
    T,
    sq_n,
    sq_h,
    sq_l,
    sk_n,
    sk_h,
    sk_s,
    sv_n,
    sv_h,
    sv_s,
    so_n,
    so_h,
    so_l,
    sd_n,
    sd_h,
    sd_l,
    H,
    L,
    D,
    DV,
    M,
    NT,
    T0,
    NW,
    half_inv_sqrt_d,
    RELU_SCALE,
    EPS,
    HAS_BIAS: tl.constexpr,
    KERNEL: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    STATE_PASSES: tl.constexpr,
    MIXED_PASSES: tl.constexpr,
    FP32_DOT: tl.constexpr,
    MODE: tl.constexpr,
    WINDOW: tl.constexpr,
):
    """Forward output of chunk ``T0 + program_id(0)``; ``ST``, ``SZ`` hold the states of a window of
    ``NW`` chunks from ``T0``. ``MODE`` 0: the output as ``hi + lo`` in the output dtype
    (float32-accurate for the backward), the scales ``CQ`` and denominators ``DEN``; 1: the same
    without ``lo`` (from one-pass products: see ``_out_launch``); 2 (in the backward): ``T = dout .
    out / den``, float32-accurate, and ``DEN`` again for the backward's kernels. Mode 2 never forms
    the output: ``dout_i . num_i`` is ``sum_m phi_q[i, m] (S_t dout_i)_m`` plus ``sum_j A_ij (dout_i .
    v_j)``, products with ``dout`` exact in the operand dtype (fewer split passes than ``phi_q S_t``
    and ``A v`` of two float32 operands).

    ``WINDOW > 0`` (softmax, at most ``BLOCK_C``): the pairs ``0 <= i - j < WINDOW`` get the exact
    weight (:func:`_exact_weights`) instead of their estimate. The queries then take the state of
    the keys before the previous chunk, ``S_{t-1}`` (``LAG``, ``LAG_Z``: the previous window's last,
    for the first chunk of a window), and weigh the previous chunk's keys pair by pair, as the own
    chunk's, so that no estimate is ever taken out of a sum again."""
    pid_w = tl.program_id(0)
    pid_t = T0 + pid_w
    pid_nh = tl.program_id(1)
    n = pid_nh // H
    h = pid_nh % H
    offs_c = pid_t * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    c_ok = offs_c < L
    x = row_tile(Q + n * sq_n + h * sq_h, offs_c, c_ok, offs_d, D, sq_l)
    y, vt, b = key_tiles(
        K, V, BIAS, n, h, offs_c, c_ok, offs_d, offs_dv, L, D, DV, sk_n, sk_h, sk_s, sv_n, sv_h, sv_s, HAS_BIAS
    )
    xf = x.to(tl.float32)
    sqx = tl.sum(xf * xf, 1) * half_inv_sqrt_d
    yf = y.to(tl.float32)
    sqy = tl.sum(yf * yf, 1) * half_inv_sqrt_d
    cc = tl.load(C + pid_nh * L + offs_c, mask=c_ok, other=0.0)
    # the state's chunk: the own one, or with a window the previous one (none before chunk 1)
    if WINDOW > 0:
        s_idx = pid_w - 1
        cprev = tl.load(CPREV + pid_nh * NT + tl.maximum(pid_t - 1, 0))
    else:
        s_idx = pid_w
        cprev = tl.load(CPREV + pid_nh * NT + pid_t)
    if MODE == 2:
        do = row_tile(DO + n * sd_n + h * sd_h, offs_c, c_ok, offs_dv, DV, sd_l)
        num = tl.zeros((BLOCK_C,), tl.float32)  # dout_i . num_i
    else:
        num = tl.zeros((BLOCK_C, BLOCK_DV), tl.float32)
    den = tl.zeros((BLOCK_C,), tl.float32)
    pp = tl.zeros((BLOCK_C, BLOCK_C), tl.float32)
    if WINDOW > 0:  # the previous chunk's keys, their estimates pp_p
        offs_p = offs_c - BLOCK_C
        yp, vp, bp, sqyp, ccp, p_ok = _window_keys(
            K,
            V,
            BIAS,
            C,
            n,
            h,
            pid_nh,
            offs_p,
            offs_d,
            offs_dv,
            L,
            D,
            DV,
            sk_n,
            sk_h,
            sk_s,
            sv_n,
            sv_h,
            sv_s,
            half_inv_sqrt_d,
            HAS_BIAS,
        )
        pp_p = tl.zeros((BLOCK_C, BLOCK_C), tl.float32)
        krow_p = tl.zeros((BLOCK_C,), tl.float32)
    cq = tl.full((BLOCK_C,), NEG_BIG, tl.float32)
    # sums over the features of S_t, z_t and each key's features: the query floor's terms
    ssum = tl.zeros((BLOCK_DV,), tl.float32)
    zsum = 0.0
    krow = tl.zeros((BLOCK_C,), tl.float32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < M
        wt = load_wt(W, offs_d, offs_m, D, M)
        proj = logits_tile(x, wt, FP32_DOT)
        if KERNEL == 0:
            s = tl.where(m_ok[None, :], proj - sqx[:, None], float("-inf"))
            new = tl.maximum(cq, tl.max(s, 1))
            alpha = tl.exp(cq - new)
            phiq = tl.exp(s - new[:, None])
            if MODE == 2:
                num = num * alpha
            else:
                num = num * alpha[:, None]
            den = den * alpha
            pp = pp * alpha[:, None]
            cq = new
            phik, projk = features_tile(y, sqy, wt, m_ok, (cc - b)[:, None], KERNEL, FP32_DOT, RELU_SCALE, EPS)
            if WINDOW > 0:
                phik_p = _key_features(yp, sqyp, bp, ccp, p_ok, wt, m_ok, FP32_DOT)
                pp_p = mm_mixed(phiq, tl.trans(phik_p), pp_p * alpha[:, None], x, MIXED_PASSES, FP32_DOT)
                krow_p += tl.sum(phik_p, 1)
        else:
            phiq = tl.where(m_ok[None, :], tl.maximum(proj, 0.0) * RELU_SCALE + EPS, 0.0)
            phik, projk = features_tile(y, sqy, wt, m_ok, 0.0, KERNEL, FP32_DOT, RELU_SCALE, EPS)
            phik = phik * tl.exp(b)[:, None]
        phik = tl.where(c_ok[:, None], phik, 0.0)
        pp = mm_mixed(phiq, tl.trans(phik), pp, x, MIXED_PASSES, FP32_DOT)
        st, z = _state_tiles(
            ST,
            SZ,
            LAG,
            LAG_Z,
            pid_nh,
            s_idx,
            s_idx >= 0,
            (s_idx < 0) & (pid_t > 0),
            NW,
            offs_m,
            offs_dv,
            m_ok,
            M,
            DV,
            WINDOW > 0,
        )
        if MODE == 1 and MIXED_PASSES == 1:
            # a one-pass product reads the state rounded to the operand dtype (as the forward may
            # store it: see BF16_FORWARD_STATES), and so do the floor's sums below
            st = st.to(x.dtype).to(tl.float32)
        if MODE == 2:
            g = mm_exact_a_f32(do, tl.trans(st), tl.zeros((BLOCK_C, BLOCK_M), tl.float32), STATE_PASSES, FP32_DOT)
            num += tl.sum(phiq * g, 1)
        else:
            num = mm_mixed(phiq, st, num, x, MIXED_PASSES, FP32_DOT)
        den += tl.sum(phiq * z[None, :], 1)
        if KERNEL == 0:
            ssum += tl.sum(st, 0)
            zsum += tl.sum(z, 0)
            krow += tl.sum(phik, 1)
    if KERNEL == 0:  # every query feature carries the floor EPS
        if MODE == 2:
            num += EPS * tl.sum(do.to(tl.float32) * ssum[None, :], 1)
        else:
            num += EPS * ssum[None, :]
        den += EPS * zsum
        pp += EPS * krow[None, :]
        if WINDOW > 0:
            pp_p += EPS * krow_p[None, :]
    # inter-chunk part to each query's scale, intra-chunk part with exp(c_j - c_i), j <= i
    e_q = tl.exp(cprev - cc)
    if MODE == 2:
        num = num * e_q
    else:
        num = num * e_q[:, None]
    den = den * e_q
    offs_j = pid_t * BLOCK_C + tl.arange(0, BLOCK_C)
    keep = (offs_j[None, :] <= offs_c[:, None]) & (offs_j[None, :] < L)
    pe = tl.where(keep, pp * tl.exp(cc[None, :] - cc[:, None]), 0.0)
    if WINDOW > 0:
        scale = 2.0 * half_inv_sqrt_d
        near = keep & (offs_c[:, None] - offs_j[None, :] < WINDOW)
        pe = tl.where(near, _exact_weights(x, y, b, cq, cc, near, M, scale, FP32_DOT), pe)
        pair_p = p_ok[None, :] & c_ok[:, None]
        near_p = pair_p & (offs_c[:, None] - offs_p[None, :] < WINDOW)
        pe_p = tl.where(
            near_p, _exact_weights(x, yp, bp, cq, cc, near_p, M, scale, FP32_DOT), pp_p * _rescale(ccp, cc, pair_p)
        )
        if MODE == 2:
            num += tl.sum(pe_p * _pair_dots(do, vp, FP32_DOT), 1)
        else:
            num = mm_exact_b(pe_p, vp, num, STATE_PASSES, FP32_DOT)
        den += tl.sum(pe_p, 1)
    if MODE == 2:
        num += tl.sum(pe * _pair_dots(do, vt, FP32_DOT), 1)
    else:
        num = mm_exact_b(pe, vt, num, STATE_PASSES, FP32_DOT)
    den += tl.sum(pe, 1)
    inv_den = 1.0 / tl.where(den == 0.0, 1.0, den)
    if KERNEL != 0:
        cq = tl.zeros((BLOCK_C,), tl.float32)
    if MODE == 2:
        tl.store(T + pid_nh * L + offs_c, num * inv_den * inv_den, mask=c_ok)
        tl.store(DEN + pid_nh * L + offs_c, den, mask=c_ok)
    else:
        out = num * inv_den[:, None]
        omask = c_ok[:, None] & (offs_dv[None, :] < DV)
        out_hi = out.to(OUT.dtype.element_ty)
        o_ptrs = n * so_n + h * so_h + offs_c[:, None] * so_l + offs_dv[None, :]
        tl.store(OUT + o_ptrs, out_hi, mask=omask)
        if MODE == 0:
            tl.store(OUT_LO + o_ptrs, (out - out_hi.to(tl.float32)).to(OUT_LO.dtype.element_ty), mask=omask)
        tl.store(CQ + pid_nh * L + offs_c, cq, mask=c_ok)
        tl.store(DEN + pid_nh * L + offs_c, den, mask=c_ok)


@triton.jit
def _state_product(
    a,
    STATES,
    LAG,
    pid_nh,
    idx,
    NW,
    in_buffer,
    from_lag,
    offs_m,
    offs_dv,
    m_ok,
    M,
    DV,
    BLOCK_C: tl.constexpr,
    STATE_PASSES: tl.constexpr,
    FP32_DOT: tl.constexpr,
    LAGGED: tl.constexpr,
):
    """``(a X^T, X^T)`` for the float32 state tile ``X`` (a feature block by the value columns) of
    chunk ``idx`` of head ``pid_nh``'s window buffer (``LAGGED``: see :func:`_pick`) and ``a``
    ``(BLOCK_C, BLOCK_DV)`` in the operand dtype (``X`` split into parts of it)."""
    ptrs = offs_m[None, :] * DV + offs_dv[:, None]
    mask = m_ok[None, :] & (offs_dv[:, None] < DV)
    xt = _pick(
        STATES, LAG, (pid_nh * NW + idx) * M * DV + ptrs, pid_nh * M * DV + ptrs, mask, in_buffer, from_lag, LAGGED
    )
    acc = tl.zeros((BLOCK_C, xt.shape[1]), tl.float32)
    return mm_exact_a_f32(a, xt, acc, STATE_PASSES, FP32_DOT), xt


@triton.jit
def _row_t(OUT, OUT_LO, T, do, den, ptrs, mask, t_ptrs, row_mask, HAS_T: tl.constexpr):
    """``t_i = dout_i . num_i / den_i^2 = dout_i . out_i / den_i``: from ``T`` when ``HAS_T``, else
    from the output kept as ``out = hi + lo``."""
    if HAS_T:
        t = tl.load(T + t_ptrs, mask=row_mask, other=0.0)
    else:
        out = tl.load(OUT + ptrs, mask=mask, other=0.0).to(tl.float32) + tl.load(
            OUT_LO + ptrs, mask=mask, other=0.0
        ).to(tl.float32)
        t = tl.sum(do.to(tl.float32) * out, 1) / tl.where(den == 0.0, 1.0, den)
    return t


@direct_launch
@triton.jit
def _rstate_kernel(
    Q,
    DO,
    OUT,
    OUT_LO,
    T,
    W,
    C,
    CPREV,
    DECAY,
    CQ,
    DEN,
    RB,
    RZ,
    CARRY,
    CARRY_Z,
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
    NT,
    T0,
    STEPS,
    NW,
    half_inv_sqrt_d,
    RELU_SCALE,
    EPS,
    KERNEL: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    STATE_PASSES: tl.constexpr,
    FP32_DOT: tl.constexpr,
    HAS_T: tl.constexpr,
    HAS_CARRY: tl.constexpr,
    UNROLL: tl.constexpr,
):
    """States of later queries for one feature block, chunk by chunk from the last: ``RB[t]``,
    ``RZ[t]`` get the state before chunk ``t``'s own contribution, then
    ``state <- state * DECAY[t] + B_t`` with ``B_t = sum_i exp(c_prev - c_i) phi_q[i] (dout_i / den_i)^T``
    and ``z <- z * DECAY[t] + u_t`` with ``u_t = -sum_i exp(c_prev - c_i) phi_q[i] t_i``.

    Runs chunks ``T0 .. T0 + STEPS`` (``RB``, ``RZ`` hold a window of ``NW`` chunks from ``T0``); the
    state stays on chip between chunks, so ``B_t`` never goes through memory. ``HAS_CARRY``: the state
    starts from ``CARRY``, ``CARRY_Z`` (the later window's final state) and ends there.

    Replaces a chunk-parallel kernel that wrote each ``B_t`` and a reverse scan that read it back:
    op fwd+bwd on the H100 (bf16, B=4, 8 heads, m=256, d_v=64) at 4096 / 16384 / 65536 positions
    2.68 / 8.70 / 34.78 ms before, 2.42 / 7.70 / 30.92 with (4, 2) warps / stages, 7.49 / 30.04 at
    16384 / 65536 with (4, 3) (kept; (4, 1) 7.74 / 31.02, (8, 2) 7.86 / 31.44, (8, 3) 7.72 / 30.87).
    """
    pid_m = tl.program_id(0)
    pid_nh = tl.program_id(1)
    n = pid_nh // H
    h = pid_nh % H
    offs_d = tl.arange(0, BLOCK_D)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_ok = offs_m < M
    s_mask = m_ok[:, None] & (offs_dv[None, :] < DV)
    wt = load_wt(W, offs_d, offs_m, D, M)
    st, sz = _carry_in(CARRY, CARRY_Z, pid_nh, offs_m, offs_dv, s_mask, m_ok, M, DV, HAS_CARRY, BLOCK_M, BLOCK_DV)
    for i in range(0, STEPS, UNROLL):  # UNROLL chunks per step, as in _state_kernel
        for u in tl.static_range(UNROLL):
            pid_w = STEPS - 1 - i - u
            acc, zsum, decay = _rstate_step(
                Q, DO, OUT, OUT_LO, T, C, CPREV, DECAY, CQ, DEN, n, h, pid_nh, T0 + pid_w, T0, offs_d, offs_dv,
                m_ok, wt, sq_n, sq_h, sq_l, sd_n, sd_h, sd_l, L, D, DV, NT, half_inv_sqrt_d,
                RELU_SCALE, EPS, KERNEL, BLOCK_C, BLOCK_M, BLOCK_DV, STATE_PASSES, FP32_DOT, HAS_T,
            )  # fmt: skip
            base = pid_nh * NW + pid_w
            ok = m_ok & (pid_w + tl.zeros_like(offs_m) >= 0)
            tl.store(RB + base * M * DV + offs_m[:, None] * DV + offs_dv[None, :], st, mask=ok[:, None] & s_mask)
            tl.store(RZ + base * M + offs_m, sz, mask=ok)
            st = st * decay + acc
            sz = sz * decay + zsum
    _carry_out(CARRY, CARRY_Z, st, sz, pid_nh, offs_m, offs_dv, s_mask, m_ok, M, DV, HAS_CARRY)


@triton.jit
def _rstate_step(
    Q,
    DO,
    OUT,
    OUT_LO,
    T,
    C,
    CPREV,
    DECAY,
    CQ,
    DEN,
    n,
    h,
    pid_nh,
    pid_t,
    start,
    offs_d,
    offs_dv,
    m_ok,
    wt,
    sq_n,
    sq_h,
    sq_l,
    sd_n,
    sd_h,
    sd_l,
    L,
    D,
    DV,
    NT,
    half_inv_sqrt_d,
    RELU_SCALE,
    EPS,
    KERNEL: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    STATE_PASSES: tl.constexpr,
    FP32_DOT: tl.constexpr,
    HAS_T: tl.constexpr,
):
    """Chunk ``pid_t``'s contribution to the later queries' state of one feature block: ``(B_t, u_t,
    decay)`` (see :func:`_rstate_kernel`); for a chunk before ``start`` 0, 0 and 1."""
    offs_c = pid_t * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = (offs_c < L) & (offs_c >= start * BLOCK_C)
    x = row_tile(Q + n * sq_n + h * sq_h, offs_c, c_ok, offs_d, D, sq_l)
    do = row_tile(DO + n * sd_n + h * sd_h, offs_c, c_ok, offs_dv, DV, sd_l)
    cq = tl.load(CQ + pid_nh * L + offs_c, mask=c_ok, other=0.0)
    cc = tl.load(C + pid_nh * L + offs_c, mask=c_ok, other=0.0)
    den = tl.load(DEN + pid_nh * L + offs_c, mask=c_ok, other=1.0)
    t = _row_t(
        OUT,
        OUT_LO,
        T,
        do,
        den,
        n * sd_n + h * sd_h + offs_c[:, None] * sd_l + offs_dv[None, :],
        c_ok[:, None] & (offs_dv[None, :] < DV),
        pid_nh * L + offs_c,
        c_ok,
        HAS_T,
    )
    t_in = tl.maximum(pid_t, 0)  # a chunk before the window reads chunk 0's (unused) values
    cprev = tl.load(CPREV + pid_nh * NT + t_in)
    decay = tl.where(pid_t >= start, tl.load(DECAY + pid_nh * NT + t_in), 1.0)
    acc, phiq = query_state_grad_tile(
        x,
        do,
        cq,
        den,
        tl.where(c_ok, tl.exp(cprev - cc), 0.0),
        tl.zeros((BLOCK_M, BLOCK_DV), tl.float32),
        wt,
        m_ok,
        half_inv_sqrt_d,
        RELU_SCALE,
        EPS,
        KERNEL,
        STATE_PASSES,
        FP32_DOT,
    )
    return acc, -tl.sum(phiq * t[:, None], 0), decay


@direct_launch
@triton.jit
def _chunk_grad_kernel(
    Q,
    K,
    V,
    DO,
    OUT,
    OUT_LO,
    T,
    W,
    BIAS,
    C,
    CPREV,
    CEND,
    CQ,
    DEN,
    STATES,
    SUMS,
    LAG,
    LAG_Z,
    DQ,
    DK,
    DVO,
    sq_n,
    sq_h,
    sq_l,
    sk_n,
    sk_h,
    sk_s,
    sv_n,
    sv_h,
    sv_s,
    sd_n,
    sd_h,
    sd_l,
    sg_n,
    sg_h,
    sg_l,
    sgv_n,
    sgv_h,
    sgv_l,
    H,
    L,
    D,
    DV,
    M,
    NT,
    T0,
    NW,
    half_inv_sqrt_d,
    RELU_SCALE,
    EPS,
    HAS_BIAS: tl.constexpr,
    KERNEL: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    STATE_PASSES: tl.constexpr,
    MIXED_PASSES: tl.constexpr,
    GRADW_PASSES: tl.constexpr,
    FP32_DOT: tl.constexpr,
    SIDE: tl.constexpr,
    HAS_T: tl.constexpr,
    WINDOW: tl.constexpr,
):
    """The gradients of chunk ``T0 + program_id(0)``: ``SIDE`` 0 gives ``dq`` from the carried states
    ``S_t``, ``z_t``, 1 gives ``dk`` and ``dv`` from the states of later queries ``R_t``, ``u_t``
    (``STATES``, ``SUMS``: a window's, ``NW`` chunks from ``T0``). Two launches, so that the two
    kinds of states never need to exist at once.

    ``WINDOW > 0``: the local window of :func:`_chunk_out_kernel`. The near pairs take the exact
    weights' gradients instead of the estimates'. The queries take ``S_{t-1}`` and the previous
    chunk's keys pair by pair (``SIDE`` 0), the keys ``R_{t+1}`` and the next chunk's queries pair by
    pair (``SIDE`` 1); ``LAG``, ``LAG_Z`` hold the neighbouring window's state for a window's first
    (``SIDE`` 0) or last (``SIDE`` 1) chunk."""
    pid_w = tl.program_id(0)
    pid_t = T0 + pid_w
    pid_nh = tl.program_id(1)
    n = pid_nh // H
    h = pid_nh % H
    offs_c = pid_t * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    c_ok = offs_c < L
    x, do, sqx, cq, den, inv_den = query_rows(
        Q, DO, CQ, DEN, n, h, pid_nh, offs_c, c_ok, offs_d, offs_dv, L, D, DV,
        sq_n, sq_h, sq_l, sd_n, sd_h, sd_l, half_inv_sqrt_d,
    )  # fmt: skip
    y, vt, b = key_tiles(
        K, V, BIAS, n, h, offs_c, c_ok, offs_d, offs_dv, L, D, DV, sk_n, sk_h, sk_s, sv_n, sv_h, sv_s, HAS_BIAS
    )
    yf = y.to(tl.float32)
    sqy = tl.sum(yf * yf, 1) * half_inv_sqrt_d
    cc = tl.load(C + pid_nh * L + offs_c, mask=c_ok, other=0.0)
    t = _row_t(
        OUT,
        OUT_LO,
        T,
        do,
        den,
        n * sd_n + h * sd_h + offs_c[:, None] * sd_l + offs_dv[None, :],
        c_ok[:, None] & (offs_dv[None, :] < DV),
        pid_nh * L + offs_c,
        c_ok,
        HAS_T,
    )
    # the states' chunks: the own one, or with a window the previous (queries) or next (keys) one
    if WINDOW > 0:
        if SIDE == 0:
            s_idx = pid_w - 1
            in_buffer = s_idx >= 0
            from_lag = (s_idx < 0) & (pid_t > 0)
        else:
            s_idx = pid_w + 1
            in_buffer = s_idx < tl.num_programs(0)
            from_lag = (s_idx >= tl.num_programs(0)) & (pid_t + 1 < NT)
        cprev = tl.load(CPREV + pid_nh * NT + tl.maximum(pid_t - 1, 0))
        cend = tl.load(CEND + pid_nh * NT + tl.minimum(pid_t + 1, NT - 1))
    else:
        s_idx = pid_w
        in_buffer = True
        from_lag = False
        cprev = tl.load(CPREV + pid_nh * NT + pid_t)
        cend = tl.load(CEND + pid_nh * NT + pid_t)
    e_q = tl.exp(cprev - cc)  # inter-chunk factor of each query
    e_k = tl.where(c_ok, tl.exp(cc - cend), 0.0)  # factor of each key towards later queries
    offs_j = pid_t * BLOCK_C + tl.arange(0, BLOCK_C)
    keep = (offs_j[None, :] <= offs_c[:, None]) & (offs_j[None, :] < L) & c_ok[:, None]
    ee = tl.where(keep, tl.exp(cc[None, :] - cc[:, None]), 0.0)
    # dA_ij = (dout_i . v_j) / den_i - t_i, times exp(c_j - c_i), for j <= i
    dae = _weight_grad(do, vt, inv_den, t, FP32_DOT) * ee
    if WINDOW > 0:
        # estimated pairs only here; the exact pairs' gradients come after the feature loop (fewer
        # tiles live through it)
        scale = 2.0 * half_inv_sqrt_d
        dae = tl.where(offs_c[:, None] - offs_j[None, :] < WINDOW, 0.0, dae)
        if SIDE == 0:
            offs_p = offs_c - BLOCK_C
            yp, vp, bp, sqyp, ccp, p_ok = _window_keys(
                K,
                V,
                BIAS,
                C,
                n,
                h,
                pid_nh,
                offs_p,
                offs_d,
                offs_dv,
                L,
                D,
                DV,
                sk_n,
                sk_h,
                sk_s,
                sv_n,
                sv_h,
                sv_s,
                half_inv_sqrt_d,
                HAS_BIAS,
            )
            pair_p = p_ok[None, :] & c_ok[:, None]
            near_p = pair_p & (offs_c[:, None] - offs_p[None, :] < WINDOW)
            dae_p = tl.where(near_p, 0.0, _weight_grad(do, vp, inv_den, t, FP32_DOT) * _rescale(ccp, cc, pair_p))
        else:
            offs_nx = offs_c + BLOCK_C
            n_ok = offs_nx < L
            xn, don, sqxn, cqn, denn, inv_denn = query_rows(
                Q, DO, CQ, DEN, n, h, pid_nh, offs_nx, n_ok, offs_d, offs_dv, L, D, DV,
                sq_n, sq_h, sq_l, sd_n, sd_h, sd_l, half_inv_sqrt_d,
            )  # fmt: skip
            ccn = tl.load(C + pid_nh * L + offs_nx, mask=n_ok, other=0.0)
            tn = _row_t(
                OUT,
                OUT_LO,
                T,
                don,
                denn,
                n * sd_n + h * sd_h + offs_nx[:, None] * sd_l + offs_dv[None, :],
                n_ok[:, None] & (offs_dv[None, :] < DV),
                pid_nh * L + offs_nx,
                n_ok,
                HAS_T,
            )
            # rows: the next chunk's queries i; columns: this chunk's keys j
            pair_n = n_ok[:, None] & c_ok[None, :]
            near_n = pair_n & (offs_nx[:, None] - offs_c[None, :] < WINDOW)
            e_n = tl.where(near_n, 0.0, _rescale(cc, ccn, pair_n))  # the estimated pairs' factors
            dae_n = _weight_grad(don, vt, inv_denn, tn, FP32_DOT) * e_n
            pp_n = tl.zeros((BLOCK_C, BLOCK_C), tl.float32)
    pp = tl.zeros((BLOCK_C, BLOCK_C), tl.float32)
    dx = tl.zeros((BLOCK_C, BLOCK_D), tl.float32)
    dy = tl.zeros((BLOCK_C, BLOCK_D), tl.float32)
    dv_inter = tl.zeros((BLOCK_C, BLOCK_DV), tl.float32)
    rsq = tl.zeros((BLOCK_C,), tl.float32)
    rsk = tl.zeros((BLOCK_C,), tl.float32)
    base = pid_nh * NW + s_idx
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < M
        wt = load_wt(W, offs_d, offs_m, D, M)
        phiq, projq = features_tile(x, sqx, wt, m_ok, cq[:, None], KERNEL, FP32_DOT, RELU_SCALE, EPS)
        if KERNEL == 0:
            phik, projk = features_tile(y, sqy, wt, m_ok, (cc - b)[:, None], KERNEL, FP32_DOT, RELU_SCALE, EPS)
        else:
            phik, projk = features_tile(y, sqy, wt, m_ok, 0.0, KERNEL, FP32_DOT, RELU_SCALE, EPS)
            phik = phik * tl.exp(b)[:, None]
        phik = tl.where(c_ok[:, None], phik, 0.0)
        phiq_f = query_floor(phiq, m_ok, KERNEL, EPS)  # the features; phiq stays their derivative
        w = load_w(W, offs_m, offs_d, D, M)
        if SIDE == 0:
            # query side: dphi_q = dAE phit_k + e_q (S_t dout / den - t z_t)
            g, _ = _state_product(
                do,
                STATES,
                LAG,
                pid_nh,
                s_idx,
                NW,
                in_buffer,
                from_lag,
                offs_m,
                offs_dv,
                m_ok,
                M,
                DV,
                BLOCK_C,
                STATE_PASSES,
                FP32_DOT,
                WINDOW > 0,
            )
            z = _pick(SUMS, LAG_Z, base * M + offs_m, pid_nh * M + offs_m, m_ok, in_buffer, from_lag, WINDOW > 0)
            dphiq = (g * inv_den[:, None] - t[:, None] * z[None, :]) * e_q[:, None]
            dphiq = mm_mixed(dae, phik, dphiq, x, MIXED_PASSES, FP32_DOT)
            if WINDOW > 0:
                phik_p = _key_features(yp, sqyp, bp, ccp, p_ok, wt, m_ok, FP32_DOT)
                dphiq = mm_mixed(dae_p, phik_p, dphiq, x, MIXED_PASSES, FP32_DOT)
            if KERNEL == 0:
                dsq = dphiq * phiq
                rsq += tl.sum(dsq, 1)
            else:
                dsq = tl.where((projq > 0.0) & m_ok[None, :], dphiq * RELU_SCALE, 0.0)
            dx = mm_w(dsq, w, dx, GRADW_PASSES, FP32_DOT)
        else:
            # key side: dphit_k = dAE^T phi_q + e_k (v R_t^T + u_t); pp for the intra-chunk dv
            pp = mm_mixed(phiq_f, tl.trans(phik), pp, x, MIXED_PASSES, FP32_DOT)
            gk, rtt = _state_product(
                vt,
                STATES,
                LAG,
                pid_nh,
                s_idx,
                NW,
                in_buffer,
                from_lag,
                offs_m,
                offs_dv,
                m_ok,
                M,
                DV,
                BLOCK_C,
                STATE_PASSES,
                FP32_DOT,
                WINDOW > 0,
            )
            u = _pick(SUMS, LAG_Z, base * M + offs_m, pid_nh * M + offs_m, m_ok, in_buffer, from_lag, WINDOW > 0)
            dphik = (gk + u[None, :]) * e_k[:, None]
            dphik = mm_mixed(tl.trans(dae), phiq_f, dphik, x, MIXED_PASSES, FP32_DOT)
            if WINDOW > 0:
                phin, _ = features_tile(xn, sqxn, wt, m_ok, cqn[:, None], KERNEL, FP32_DOT, RELU_SCALE, EPS)
                phin = tl.where(n_ok[:, None], query_floor(phin, m_ok, KERNEL, EPS), 0.0)
                dphik = mm_mixed(tl.trans(dae_n), phin, dphik, x, MIXED_PASSES, FP32_DOT)
                pp_n = mm_mixed(phin, tl.trans(phik), pp_n, x, MIXED_PASSES, FP32_DOT)
            dv_inter = mm_mixed(phik, tl.trans(rtt), dv_inter, x, MIXED_PASSES, FP32_DOT)
            if KERNEL == 0:
                dsk = dphik * phik
                rsk += tl.sum(dsk, 1)
            else:
                dsk = tl.where((projk > 0.0) & m_ok[None, :], dphik * RELU_SCALE * tl.exp(b)[:, None], 0.0)
            dy = mm_w(dsk, w, dy, GRADW_PASSES, FP32_DOT)
    g_ptrs = n * sg_n + h * sg_h + offs_c[:, None] * sg_l + offs_d[None, :]
    g_mask = c_ok[:, None] & (offs_d[None, :] < D)
    if SIDE == 0:
        if KERNEL == 0:
            dx = dx - rsq[:, None] * x.to(tl.float32) * (2.0 * half_inv_sqrt_d)
        if WINDOW > 0:
            # exact pairs: dq_i += sum_j dA_ij A_ij k_j / sqrt(d) (A the exact weight)
            near = keep & (offs_c[:, None] - offs_j[None, :] < WINDOW)
            g = _weight_grad(do, vt, inv_den, t, FP32_DOT) * _exact_weights(x, y, b, cq, cc, near, M, scale, FP32_DOT)
            dx = mm_exact_b(g * scale, y, dx, STATE_PASSES, FP32_DOT)
            near_p = p_ok[None, :] & c_ok[:, None] & (offs_c[:, None] - offs_p[None, :] < WINDOW)
            g = _weight_grad(do, vp, inv_den, t, FP32_DOT) * _exact_weights(
                x, yp, bp, cq, cc, near_p, M, scale, FP32_DOT
            )
            dx = mm_exact_b(g * scale, yp, dx, STATE_PASSES, FP32_DOT)
        tl.store(DQ + g_ptrs, dx.to(DQ.dtype.element_ty), mask=g_mask)
    else:
        pe = pp * ee * inv_den[:, None]
        if WINDOW > 0:
            near = keep & (offs_c[:, None] - offs_j[None, :] < WINDOW)
            ex = _exact_weights(x, y, b, cq, cc, near, M, scale, FP32_DOT)
            pe = tl.where(near, ex * inv_den[:, None], pe)
        dv = mm_exact_b(tl.trans(pe), do, dv_inter * e_k[:, None], STATE_PASSES, FP32_DOT)
        if KERNEL == 0:
            dy = dy - rsk[:, None] * yf * (2.0 * half_inv_sqrt_d)
        if WINDOW > 0:
            # exact pairs: dk_j += sum_i dA_ij A_ij q_i / sqrt(d), own chunk and the next one's queries
            g = _weight_grad(do, vt, inv_den, t, FP32_DOT) * ex
            dy = mm_exact_b(tl.trans(g * scale), x, dy, STATE_PASSES, FP32_DOT)
            near_n = n_ok[:, None] & c_ok[None, :] & (offs_nx[:, None] - offs_c[None, :] < WINDOW)
            ex = _exact_weights(xn, y, b, cqn, ccn, near_n, M, scale, FP32_DOT)
            e_n = tl.where(near_n, 0.0, _rescale(cc, ccn, n_ok[:, None] & c_ok[None, :]))
            dv = mm_exact_b(tl.trans((ex + pp_n * e_n) * inv_denn[:, None]), don, dv, STATE_PASSES, FP32_DOT)
            g = _weight_grad(don, vt, inv_denn, tn, FP32_DOT) * ex
            dy = mm_exact_b(tl.trans(g * scale), xn, dy, STATE_PASSES, FP32_DOT)
        tl.store(DK + g_ptrs, dy.to(DK.dtype.element_ty), mask=g_mask)
        tl.store(
            DVO + n * sgv_n + h * sgv_h + offs_c[:, None] * sgv_l + offs_dv[None, :],
            dv.to(DVO.dtype.element_ty),
            mask=c_ok[:, None] & (offs_dv[None, :] < DV),
        )


# ----------------------------------------------------------------------------------------------
# launchers


def _strides(*tensors: torch.Tensor) -> list[int]:
    """The strides of the first three dimensions of each tensor, in order (the kernels' stride arguments)."""
    return [st for t in tensors for st in t.stride()[:3]]


def _sizes(h: int, length: int, sz: dict) -> tuple:
    """Heads, positions, head, value and feature dims, chunks: the size arguments of every chunk kernel."""
    return h, length, sz["d"], sz["dv"], sz["m"], cdiv(length, CHUNK)


def _consts(sz: dict) -> tuple:
    """The scalar arguments every chunk kernel takes after its sizes."""
    return sz["half"], sz["rscale"], sz["eps"]


#: Smallest head and value tile of the gradient kernel with a local window. On an H100 (Triton 3.6) its
#: key side gave wrong ``dv`` in bfloat16 with tiles of 32 (relative error 0.36-0.75 at d = 32, d_v =
#: 16 or 32, m = 64 or 80; every other gradient, float32 and float16, and tiles of 64 and 128 were
#: right), like the miscompilations of narrow tiles in :data:`randattn.ops._triton_utils.MIN_TILE`:
#: narrower heads are padded (masked) up to this side there.
WINDOW_MIN_TILE = 64


def _tiles(sz: dict, window: int = 0) -> dict:
    """The feature map and tile sizes every chunk kernel takes (the gradient kernel with a local
    ``window``: head and value tiles of at least :data:`WINDOW_MIN_TILE`)."""
    low = WINDOW_MIN_TILE if window else 0
    return dict(
        KERNEL=sz["KERNEL"],
        BLOCK_C=CHUNK,
        BLOCK_D=max(sz["BLOCK_D"], low),
        BLOCK_M=sz["BLOCK_M"],
        BLOCK_DV=max(sz["BLOCK_DV"], low),
    )


def _windows(
    nh: int, nt: int, m: int, dv: int, keep: bool, q_bytes: int, kv_bytes: int = 0, state_bytes: int = 4
) -> int:
    """Chunks per window of states: all ``nt`` when the states are kept or fit the window's budget;
    else the most chunks, a multiple of :data:`STABILISER_CHUNKS` (at least one, at most ``nt``),
    whose states (``state_bytes`` an element) fit it. The budget: :data:`STATE_WINDOW_BYTES` or
    :data:`STATE_WINDOW_PER_Q` times ``q_bytes`` (the bytes of the op's ``q``), whichever is more,
    plus :data:`STATE_WINDOW_KV` times ``kv_bytes`` (the forward's: the bytes of ``k`` and ``v``)."""
    per_chunk = nh * m * dv * state_bytes
    budget = max(STATE_WINDOW_BYTES, STATE_WINDOW_PER_Q * q_bytes) + STATE_WINDOW_KV * kv_bytes
    if keep or nt * per_chunk <= budget:
        return nt
    return min(nt, max(STABILISER_CHUNKS, budget // per_chunk // STABILISER_CHUNKS * STABILISER_CHUNKS))


def _bytes(x: torch.Tensor) -> int:
    """Bytes of the elements of ``x`` (a view counts its own elements only)."""
    return x.numel() * x.element_size()


#: Chunks per program of the stabiliser kernel.
STABILISER_CHUNKS = 16


class _KnownStates:
    """The carried states window by window from known stabilisers (``c``, ``cprev``, ``cend``,
    ``decay``): one :func:`_state_kernel` launch per window. Holds one window's buffers ``a``
    ``(N H, W, m, d_v)`` and ``za`` ``(N H, W, m)`` and the state carried between windows;
    :meth:`window` turns chunks ``t0 .. t0 + steps`` into their carried states in ``a``, ``za`` (at
    the scale of each previous chunk's end); windows must come in order. ``a`` holds the states in
    ``dtype`` (rounded once from the float32 state on chip, which carries on unrounded)."""

    def __init__(self, k, v, w, key_bias, sz, nw, c, cprev, cend, decay, dtype=torch.float32):
        nh, nt = cend.shape
        self.args = (k, v, w, key_bias, sz)
        self.c, self.cprev, self.cend, self.decay = c, cprev, cend, decay
        f32 = dict(device=k.device, dtype=torch.float32)
        self.a = torch.empty(nh, nw, sz["m"], sz["dv"], device=k.device, dtype=dtype)
        self.za = torch.empty(nh, nw, sz["m"], **f32)
        self.carry = _zero_carry(nh, sz, k.device) if nw < nt else None

    def window(self, t0: int, steps: int) -> None:
        k, v, w, key_bias, sz = self.args
        n, h, length, _ = k.shape
        block_m = min(sz["BLOCK_M"], SEQ_BLOCK_M)
        _state_kernel[(cdiv(sz["m"], block_m), n * h)](
            k,
            v,
            w,
            key_bias.contiguous() if key_bias is not None else self.c,
            self.cend,
            self.decay,
            self.a,
            self.za,
            self.a if self.carry is None else self.carry[0],
            self.za if self.carry is None else self.carry[1],
            *_strides(k, v),
            *_sizes(h, length, sz),
            t0,
            steps,
            self.a.shape[1],
            *_consts(sz),
            HAS_BIAS=key_bias is not None,
            **(_tiles(sz) | {"BLOCK_M": block_m}),
            STATE_PASSES=PRECISION.fwd_state,
            FP32_DOT=PRECISION.fp32_dot,
            HAS_CARRY=self.carry is not None,
            UNROLL=STATE_UNROLL,
            **launch_opts("state", sz),
        )


class _States(_KnownStates):
    """The carried states ``S_t`` window by window (steps 1-3 of the module docstring), with the
    stabilisers of the whole sequence (``c``, ``cprev``, ``cend``, ``decay``) filled window by window
    (softmax; the ReLU features need none: ``c = 0``, ``decay = 1``)."""

    def __init__(self, k, v, w, key_bias, sz, nw, dtype=torch.float32):
        n, h, length, _ = k.shape
        nh, nt = n * h, cdiv(length, CHUNK)
        self.nmb = nmb = cdiv(sz["m"], sz["BLOCK_M"])
        f32 = dict(device=k.device, dtype=torch.float32)
        self.softmax = sz["KERNEL"] == 0
        if self.softmax:
            self.mb = torch.empty(nh, nt, nmb, **f32)
            self.rp = torch.empty(nh, nw * CHUNK, nmb, **f32)
            stabilisers = (torch.empty(nh, length, **f32), *(torch.empty(nh, nt, **f32) for _ in range(3)))
        else:
            # separate tensors: the custom op returns each of them, and its outputs may not alias
            stabilisers = (torch.zeros(nh, length, **f32), *(torch.zeros(nh, nt, **f32) for _ in range(2)))
            stabilisers += (torch.ones(nh, nt, **f32),)
        super().__init__(k, v, w, key_bias, sz, nw, *stabilisers, dtype=dtype)

    def window(self, t0: int, steps: int) -> None:
        if self.softmax:
            self._stabilisers(t0, steps)
        super().window(t0, steps)

    def _stabilisers(self, t0: int, steps: int) -> None:
        k, _, w, key_bias, sz = self.args
        n, h, length, _ = k.shape
        nh, nt, nw = n * h, self.decay.shape[1], self.a.shape[1]
        tiles = _tiles(sz)
        _chunk_max_kernel[(self.nmb, steps, nh)](
            k,
            w,
            key_bias.contiguous() if key_bias is not None else self.c,
            self.mb,
            self.rp,
            *k.stride()[:3],
            h,
            length,
            sz["d"],
            sz["m"],
            nt,
            self.nmb,
            t0,
            nw,
            sz["half"],
            HAS_BIAS=key_bias is not None,
            KERNEL=tiles["KERNEL"],
            BLOCK_C=CHUNK,
            BLOCK_D=tiles["BLOCK_D"],
            BLOCK_M=tiles["BLOCK_M"],
            FP32_DOT=PRECISION.fp32_dot,
            **launch_opts("chunk_max", sz),
        )
        # c = cummax(max(r, STABILISER_FLOOR)): the floor before the first kept key (its exp factors
        # are 0 or 1, never NaN). The (empty) state of chunk 0 takes the scale of position 0, the
        # smallest of that chunk, so every factor exp(cprev - c_i) is at most 1 (chunk 0's end can
        # stand more than 88 above position 0: exp would overflow to inf, and inf times the empty
        # state is NaN). c depends on earlier positions only, so a window's stabilisers need no later one.
        _stabiliser_kernel[(cdiv(steps, STABILISER_CHUNKS), nh)](
            self.rp,
            self.mb,
            self.c,
            self.cend,
            self.cprev,
            self.decay,
            length,
            nt,
            self.nmb,
            t0,
            nw,
            BLOCK_NMB=next_pow2(self.nmb),
            BLOCK_C=CHUNK,
            CHUNKS=STABILISER_CHUNKS,
            BLOCK_T=256,
            num_warps=4,
            num_stages=1,
        )


class _Lag:
    """The local window's neighbouring state between windows of chunks.

    With a window the queries of chunk ``t`` read the state before chunk ``t - 1`` and the keys the
    later queries' state after chunk ``t + 1``: for a window's first (last) chunk that state is the
    previous (next) window's, which :meth:`keep` copies out of the window buffers ``a``, ``za``
    before they are overwritten. Without a window (or with one window of chunks) nothing is kept and
    the kernels get the buffers themselves as unread stand-ins (``nt``: the sequence's chunks).
    """

    def __init__(self, a: torch.Tensor, za: torch.Tensor, window: int, nt: int) -> None:
        self.window, self.a, self.za = window, a, za
        if window and a.shape[1] < nt:
            self.state, self.sums = torch.zeros_like(a[:, 0]), torch.zeros_like(za[:, 0])
        else:
            self.state, self.sums = a, za

    def keep(self, index: int) -> None:
        """Keep chunk ``index`` of the window buffers as the next window's neighbouring state."""
        if self.state is not self.a:
            self.state.copy_(self.a[:, index])
            self.sums.copy_(self.za[:, index])


def _zero_carry(nh: int, sz: dict, device) -> tuple[torch.Tensor, torch.Tensor]:
    """A state and its sums carried between windows, starting empty."""
    f32 = dict(device=device, dtype=torch.float32)
    return torch.zeros(nh, sz["m"], sz["dv"], **f32), torch.zeros(nh, sz["m"], **f32)


def _window_starts(nt: int, nw: int, reverse: bool = False) -> list[tuple[int, int]]:
    """``(first chunk, chunks)`` of each window, in scan order."""
    starts = [(t0, min(nw, nt - t0)) for t0 in range(0, nt, nw)]
    return starts[::-1] if reverse else starts


def _split_output(out: torch.Tensor, out_lo: torch.Tensor, dtype: torch.dtype):
    """``(hi, lo)`` in ``dtype`` with ``hi + lo`` the float32 output (split on the host after the interpreter)."""
    if out.dtype == dtype:
        return out, out_lo
    hi = out.to(dtype)
    return hi, (out - hi.float()).to(dtype)


def _forward(q, k, v, projection, kernel_fn, key_bias, cached=True, window=0, needs_grad=True):
    """``needs_grad=False``: nothing is kept for a backward (no states, no lo half of the output)."""
    q, k, v = rows_contiguous(q), rows_contiguous(k), rows_contiguous(v)
    n, h, length, _ = q.shape
    nh, nt = n * h, cdiv(length, CHUNK)
    sz = launch_sizes(q, v, projection, kernel_fn)
    w = kernel_projection(projection, q.dtype, "causal", cached)
    keep = needs_grad and _keeps_states(nh, length, sz["m"], sz["dv"])
    state_dtype = _forward_state_dtype(q.dtype, keep)
    nw = _windows(nh, nt, sz["m"], sz["dv"], keep, _bytes(q), _bytes(k) + _bytes(v), state_dtype.itemsize)
    states = _States(k, v, w, key_bias, sz, nw, state_dtype)
    f32 = dict(device=q.device, dtype=torch.float32)
    out = heads_last(n, h, length, sz["dv"], device=q.device, dtype=store_dtype(q.dtype))
    # the output's lo half only beside kept states; else the backward recomputes dout . out itself
    out_lo = heads_last(n, h, length, sz["dv"], device=q.device, dtype=store_dtype(q.dtype)) if keep else out
    cq = torch.empty(nh, length, **f32)
    den = torch.empty(nh, length, **f32)
    lag = _Lag(states.a, states.za, window, nt)
    for t0, steps in _window_starts(nt, states.a.shape[1]):
        states.window(t0, steps)
        mode = 0 if keep else 1
        _out_launch(q, k, v, w, key_bias, states, sz, t0, steps, out, out_lo, cq, den, mode=mode, lag=lag)
        lag.keep(steps - 1)
    if keep:
        out, out_lo = _split_output(out, out_lo, q.dtype)
        st, szs = states.a, states.za
    else:
        out, out_lo = out.to(q.dtype), out.new_empty(0, dtype=q.dtype)
        st, szs = states.a.new_empty(0), states.za.new_empty(0)
    return out, out_lo, cq, den, states.c, states.cprev, states.cend, states.decay, st, szs


#: Whether the forward stores its states in bfloat16 where its output product reads them rounded to
#: bfloat16 anyway (bfloat16 inputs, states not kept, one-pass output product): half the bytes
#: written by the walk and read by the output kernel, windows twice as long.
#: ``RANDATTN_TRITON_FLOAT32_STATES=1`` keeps them float32 (for comparisons).
BF16_FORWARD_STATES = os.environ.get("RANDATTN_TRITON_FLOAT32_STATES", "0") != "1"


def _forward_state_dtype(dtype: torch.dtype, keep: bool) -> torch.dtype:
    """The dtype of the forward's window of states (see :data:`BF16_FORWARD_STATES`): float32 where
    the backward reads them (kept) or the output product splits them."""
    if BF16_FORWARD_STATES and dtype == torch.bfloat16 and not keep and PRECISION.fwd_mixed == 1:
        return torch.bfloat16
    return torch.float32


def _out_launch(q, k, v, w, key_bias, states, sz, t0, steps, out, out_lo, cq, den, lag, dout=None, t=None, mode=0):
    """``_chunk_out_kernel`` for chunks ``t0 .. t0 + steps`` (see its ``MODE``; 2 needs ``dout`` and
    ``t``; ``lag``: the local window and the previous window's last state, a :class:`_Lag`)."""
    n, h, length, _ = q.shape
    if dout is None:
        dout = t = out
    _chunk_out_kernel[(steps, n * h)](
        q,
        k,
        v,
        w,
        key_bias.contiguous() if key_bias is not None else states.c,
        states.c,
        states.cprev,
        states.a,
        states.za,
        lag.state,
        lag.sums,
        out,
        out_lo,
        cq,
        den,
        dout,
        t,
        *_strides(q, k, v, out, dout),
        *_sizes(h, length, sz),
        t0,
        states.a.shape[1],
        *_consts(sz),
        HAS_BIAS=key_bias is not None,
        **_tiles(sz),
        STATE_PASSES=PRECISION.state if mode == 2 else PRECISION.fwd_state,
        # the backward's t_i = dout_i . out_i / den_i needs mode 0's output and mode 2's sums
        # float32-accurate (one pass there gave dq 1.6-2.8x the reference's error on the H100; full
        # passes: equal to it); mode 1's output is only rounded to the input dtype, like the non-causal forward's, and
        # its denominators are written again by mode 2 (one pass there gave dk 3.3x the reference's
        # error on the H100: ReLU, bf16, d = d_v = m = 16)
        MIXED_PASSES=PRECISION.fwd_mixed if mode == 1 else PRECISION.mixed,
        FP32_DOT=PRECISION.fp32_dot,
        MODE=mode,
        WINDOW=lag.window,
        **launch_opts("chunk_out", sz),
    )


def _backward(dout, q, k, v, out, out_lo, projection, kernel_fn, key_bias, *saved, grads=None, cached=True, window=0):
    cq, den, c, cprev, cend, decay, st, szs = saved
    q, k, v, dout = rows_contiguous(q), rows_contiguous(k), rows_contiguous(v), rows_contiguous(dout)
    has_t = out_lo.numel() == 0  # no lo half of the output: t = dout . out / den recomputed below
    if has_t:
        out = dout  # no output kept (see _saved_output): a stand-in for the kernels' unread pointer
    elif out.stride() != dout.stride():
        out, out_lo, dout = out.contiguous(), out_lo.contiguous(), dout.contiguous()
    n, h, length, _ = q.shape
    nh = n * h
    nt = cdiv(length, CHUNK)
    sz = launch_sizes(q, v, projection, kernel_fn)
    w = kernel_projection(projection, q.dtype, "causal", cached)
    f32 = dict(device=q.device, dtype=torch.float32)
    dq, dk, dv = gradient_buffers(q, k, v, grads)
    if dq.stride() != dk.stride():
        raise ValueError(f"dq and dk must have one layout, got strides {dq.stride()} and {dk.stride()}")

    def grad_launch(side, states, sums, lag, t0, steps):
        """``dq`` from the carried states (side 0), or ``dk``, ``dv`` from the later queries' (side 1),
        for the window of chunks ``t0 .. t0 + steps`` whose states ``states``, ``sums`` hold."""
        _chunk_grad_kernel[(steps, nh)](
            q,
            k,
            v,
            dout,
            out,
            out_lo,
            t,
            w,
            key_bias.contiguous() if key_bias is not None else c,
            c,
            cprev,
            cend,
            cq,
            den,
            states,
            sums,
            lag.state,
            lag.sums,
            dq,
            dk,
            dv,
            *_strides(q, k, v, dout, dq, dv),
            *_sizes(h, length, sz),
            t0,
            states.shape[1],
            *_consts(sz),
            HAS_BIAS=key_bias is not None,
            **_tiles(sz, lag.window),
            STATE_PASSES=PRECISION.state,
            MIXED_PASSES=PRECISION.mixed,
            GRADW_PASSES=PRECISION.grad_w_passes(sz["m"], sz["fp32"]),
            FP32_DOT=PRECISION.fp32_dot,
            SIDE=side,
            HAS_T=has_t,
            WINDOW=lag.window,
            **launch_opts("chunk_grad", sz),
        )

    t = torch.empty(nh, length, **f32) if has_t else c
    if st.numel():  # kept by the forward (with the output's lo half): one window
        nw = nt
        grad_launch(0, st, szs, _Lag(st, szs, window, nt), 0, nt)
    else:  # the same values again, window by window, and t from the float32 output
        nw = _windows(nh, nt, sz["m"], sz["dv"], False, _bytes(q))
        states = _KnownStates(k, v, w, key_bias, sz, nw, c, cprev, cend, decay)
        lag = _Lag(states.a, states.za, window, nt)
        # the forward's denominators came from one-pass products: the t pass writes them again
        den = torch.empty_like(den)
        for t0, steps in _window_starts(nt, nw):
            states.window(t0, steps)
            _out_launch(q, k, v, w, key_bias, states, sz, t0, steps, out, out, t, den, lag, dout, t, mode=2)
            grad_launch(0, states.a, states.za, lag, t0, steps)
            lag.keep(steps - 1)
        del states, lag  # freed before the later queries' states exist
    del st, szs
    rb = torch.empty(nh, nw, sz["m"], sz["dv"], **f32)
    rz = torch.empty(nh, nw, sz["m"], **f32)
    carry = _zero_carry(nh, sz, q.device) if nw < nt else None
    block_m = min(sz["BLOCK_M"], SEQ_BLOCK_M)
    lag = _Lag(rb, rz, window, nt)
    for t0, steps in _window_starts(nt, nw, reverse=True):
        _rstate_kernel[(cdiv(sz["m"], block_m), nh)](
            q,
            dout,
            out,
            out_lo,
            t,
            w,
            c,
            cprev,
            decay,
            cq,
            den,
            rb,
            rz,
            rb if carry is None else carry[0],
            rz if carry is None else carry[1],
            *_strides(q, dout),
            *_sizes(h, length, sz),
            t0,
            steps,
            nw,
            *_consts(sz),
            **(_tiles(sz) | {"BLOCK_M": block_m}),
            STATE_PASSES=PRECISION.state,
            FP32_DOT=PRECISION.fp32_dot,
            HAS_T=has_t,
            HAS_CARRY=carry is not None,
            UNROLL=STATE_UNROLL,
            **launch_opts("rstate", sz),
        )
        grad_launch(1, rb, rz, lag, t0, steps)
        lag.keep(0)
    return finish_gradients((dq, dk, dv), q, k, v, grads)


# ----------------------------------------------------------------------------------------------
# custom ops


@torch.library.custom_op("randattn::causal_fwd", mutates_args=())
def _causal_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    projection: torch.Tensor,
    kernel_fn: str,
    key_bias: torch.Tensor | None,
    window: int,
) -> tuple[
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
]:
    return _forward(q, k, v, projection, kernel_fn, key_bias, cached=False, window=window)


@_causal_fwd.register_fake
def _(q, k, v, projection, kernel_fn, key_bias, window):
    n, h, length, _ = q.shape
    m, dv = projection.shape[0], v.shape[-1]
    nt = -(-length // CHUNK)
    f32 = dict(device=q.device, dtype=torch.float32)
    keep = _keeps_states(n * h, length, m, dv)
    return (
        heads_last(n, h, length, dv, device=q.device, dtype=q.dtype),
        heads_last(n, h, length, dv, device=q.device, dtype=q.dtype) if keep else q.new_empty(0),
        torch.empty(n * h, length, **f32),
        torch.empty(n * h, length, **f32),
        torch.empty(n * h, length, **f32),
        torch.empty(n * h, nt, **f32),
        torch.empty(n * h, nt, **f32),
        torch.empty(n * h, nt, **f32),
        torch.empty(n * h, nt, m, dv, **f32) if keep else torch.empty(0, **f32),
        torch.empty(n * h, nt, m, **f32) if keep else torch.empty(0, **f32),
    )


@torch.library.custom_op("randattn::causal_bwd", mutates_args=())
def _causal_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    out_lo: torch.Tensor,
    projection: torch.Tensor,
    kernel_fn: str,
    key_bias: torch.Tensor | None,
    cq: torch.Tensor,
    den: torch.Tensor,
    c: torch.Tensor,
    cprev: torch.Tensor,
    cend: torch.Tensor,
    decay: torch.Tensor,
    st: torch.Tensor,
    szs: torch.Tensor,
    window: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    saved = (cq, den, c, cprev, cend, decay, st, szs)
    return _backward(dout, q, k, v, out, out_lo, projection, kernel_fn, key_bias, *saved, cached=False, window=window)


@_causal_bwd.register_fake
def _(dout, q, k, v, out, out_lo, projection, kernel_fn, key_bias, cq, den, c, cprev, cend, decay, st, szs, window):
    n, h, length, d = q.shape
    return (
        heads_last(n, h, length, d, device=q.device, dtype=q.dtype),
        heads_last(n, h, length, d, device=k.device, dtype=k.dtype),
        heads_last(n, h, length, v.shape[-1], device=v.device, dtype=v.dtype),
    )


def _setup_context(ctx, inputs, output):
    q, k, v, projection, kernel_fn, key_bias, window = inputs
    ctx.kernel_fn, ctx.window = kernel_fn, window
    ctx.save_for_backward(q, k, v, _saved_output(output[0], output[1]), projection, key_bias, *output[1:])
    ctx.mark_non_differentiable(*output[1:])


def _backward_rule(ctx, dout, *unused):
    q, k, v, out, projection, key_bias, out_lo, *saved = ctx.saved_tensors
    dq, dk, dv = torch.ops.randattn.causal_bwd(
        dout, q, k, v, out, out_lo, projection, ctx.kernel_fn, key_bias, *saved, ctx.window
    )
    return dq, dk, dv, None, None, None, None


_causal_fwd.register_autograd(_backward_rule, setup_context=_setup_context)


def forward_saving(q, k, v, projection, kernel_fn, key_bias, needs_grad=True, window=0):
    """The forward kernels: ``(out, saved)`` with what :func:`backward_from` needs (the output among
    it only beside kept states, see :func:`_saved_output`; nothing kept without ``needs_grad``);
    ``window``: the local window (0: none)."""
    out, out_lo, *rest = _forward(q, k, v, projection, kernel_fn, key_bias, window=window, needs_grad=needs_grad)
    return out, (_saved_output(out, out_lo), out_lo, *rest)


def _saved_output(out: torch.Tensor, out_lo: torch.Tensor) -> torch.Tensor:
    """What the backward keeps of the output: all of it beside kept states (``t`` comes from its two
    halves), else nothing (``t`` comes from the recomputed states; the empty ``out_lo`` stands in),
    so that a layer's output is freed once the layers after it are done with it."""
    return out if out_lo.numel() else out_lo


def backward_from(dout, q, k, v, projection, kernel_fn, key_bias, saved, grads=None, window=0):
    """The backward kernels: ``(dq, dk, dv)``, written into ``grads`` (three views) when given."""
    out, out_lo, *rest = saved
    return _backward(dout, q, k, v, out, out_lo, projection, kernel_fn, key_bias, *rest, grads=grads, window=window)


@functools.cache
def windowed(window: int) -> types.SimpleNamespace:
    """This op with a local window of ``window`` keys (``1 <= window <= CHUNK``): an object with its
    :func:`forward_saving` and :func:`backward_from`, for the ``autograd.Function`` classes of
    :mod:`randattn.ops.eager`."""
    if not 1 <= window <= CHUNK:
        raise ValueError(f"the kernels' local window holds 1 to {CHUNK} keys, got {window}")
    return types.SimpleNamespace(
        forward_saving=functools.partial(forward_saving, window=window),
        backward_from=functools.partial(backward_from, window=window),
    )


def causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    projection: torch.Tensor,
    kernel_fn: str,
    key_bias: torch.Tensor | None,
    window: int = 0,
) -> torch.Tensor:
    """Causal random-feature attention with the chunk-parallel Triton kernels.

    Same contract as :func:`randattn.ops.causal.reference.causal_attention`; differentiable in
    ``q``, ``k`` and ``v`` (not in ``projection`` or ``key_bias``).

    Args:
        q, k: ``(N, H, L, d)``; v: ``(N, H, L, d_v)`` (one floating dtype).
        projection: ``(m, d)`` float32.
        kernel_fn: ``"softmax"`` or ``"relu"``.
        key_bias: ``(N, L)`` float32 additive key bias or ``None``.
        window: softmax only, ``0 <= window <= CHUNK``: the local window of
            :func:`randattn.ops.causal.reference.windowed_causal_attention` (0: none).

    Returns:
        ``(N, H, L, d_v)`` in ``q.dtype``; a query whose keys up to it are all masked gets zeros.
        float16 inputs run the float32 kernels (see :func:`randattn.ops._triton_utils.kernel_dtype`).
    """
    dtype = kernel_dtype(q.dtype)
    args = (q.to(dtype), k.to(dtype), v.to(dtype), projection.float(), kernel_fn, key_bias)
    if window and kernel_fn != "softmax":
        raise ValueError(f"the local window needs the softmax kernel, got {kernel_fn!r}")
    if torch.compiler.is_compiling():
        out = torch.ops.randattn.causal_fwd(*args, window)[0]
    else:
        op = windowed(window) if window else sys.modules[__name__]
        out = KernelAttention.apply(op, *args)
    return out.to(q.dtype)
