"""Pieces shared by the Triton kernels of both attention ops.

Precision scheme (fp32 accumulation everywhere):

* float32 inputs: every ``tl.dot`` runs with ``PRECISION.fp32_dot`` (``"tf32x3"`` by default: three
  tf32 tensor-core products, within 1.5x the float32 reference's error on an H100 and 18x faster than
  ``"ieee"``); plain tf32 is not accurate enough. Products with the projection, which is exact in
  bfloat16, take three bfloat16 parts of the float32 operand (non-causal op) or two tf32 parts
  (causal op; :func:`mm_w`, :data:`BF16_W_OPS`). float16 inputs run the float32 kernels.
* bfloat16 / float16 inputs: tensor-core operands are in the input dtype. An operand that is already
  exact in that dtype (the loaded ``q``, ``k``, ``v``, ``dout`` tiles, and the projection) is used as
  is; a float32 operand (features, states) is split into ``hi + lo`` parts of the input dtype, and the
  number of split products kept is set per kind of product (:class:`Precision`).

The projection is scaled by ``d ** -0.25`` and rounded to bfloat16 on the host (as every feature map
uses it, :func:`randattn.features.feature_projection`), so ``q W'^T = x W^T`` with ``x = q d^{-1/4}``,
and the feature logits of bfloat16 inputs are exact products: one tensor-core pass, float32 sums.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import weakref

import torch
import triton
import triton.language as tl

from ..features import RELU_EPS, SOFTMAX_QUERY_FLOOR, scaled_projection
from .feature_maps import STABILISER_FLOOR

__all__ = [
    "Precision",
    "PRECISION",
    "KERNEL_CODES",
    "LAUNCH",
    "env_settings",
    "launch_opts",
    "launch_sizes",
    "prepare_projection",
    "kernel_projection",
    "interpreting",
    "fixed_grid_size",
    "cdiv",
    "next_pow2",
    "heads_last",
    "store_dtype",
    "gradient_buffers",
    "finish_gradients",
    "query_state_grad_tile",
    "key_tiles",
    "key_bias",
    "query_rows",
]

#: Kernel function codes passed to the kernels as a compile-time constant.
KERNEL_CODES = {"softmax": 0, "relu": 1}

#: Stand-in for ``-inf`` as the initial running maximum (keeps ``exp(old - new)`` finite).
NEG_BIG = tl.constexpr(STABILISER_FLOOR)


@dataclasses.dataclass
class Precision:
    """Number of split products per kind of matrix product for bfloat16/float16 inputs.

    Products with an operand exact in the input dtype (features times ``v`` or ``dout``, states times
    ``v`` or ``dout``): 1 rounds the float32 operand to the input dtype, 2 adds its low part.
    Products of two float32 operands (features times states or features): 1 rounds both, 2 adds
    ``a_lo b_hi``, 3 adds ``a_hi b_lo``.

    Attributes:
        fwd_state, fwd_mixed: those two counts in the forward kernels (the causal forward's output
            product uses ``mixed`` where its backward reads that output: beside kept states).
        state, mixed: the same in the backward kernels (which also recompute forward quantities).
        grad_w: products of the feature gradients with the projection (``dq``, ``dk``; these are
            differences of two nearly equal terms, so their error is amplified; the projection is
            exact, so 2 is the float32-accurate count). Used as given above
            :data:`GRAD_W_ONE_PASS_MIN_FEATURES` features only (:meth:`grad_w_passes`).
        fp32_dot: ``input_precision`` of float32 dots (``"ieee"`` or ``"tf32x3"``).
    """

    fwd_state: int = 2
    fwd_mixed: int = 3
    state: int = 2
    mixed: int = 3
    grad_w: int = 2
    fp32_dot: str = "tf32x3"

    @classmethod
    def parse(cls, code: str, fp32_dot: str = "tf32x3") -> Precision:
        """From five digits ``fwd_state fwd_mixed state mixed grad_w``, e.g. ``"21232"``."""
        f_s, f_m, s, m, g = (int(c) for c in code)
        return cls(f_s, f_m, s, m, g, fp32_dot)

    def grad_w_passes(self, num_features: int, fp32: bool = False) -> int:
        """``grad_w`` for a launch with ``num_features`` features: at least 2 below
        :data:`GRAD_W_ONE_PASS_MIN_FEATURES`; 3 for float32 operands (the bfloat16 parts of a float32
        operand times a bfloat16 ``W'``, :func:`mm_w`)."""
        if fp32:
            return 3
        return self.grad_w if num_features >= GRAD_W_ONE_PASS_MIN_FEATURES else max(self.grad_w, 2)

    def set(self, code: str) -> None:
        """Change this setting in place from five digits (see :meth:`parse`)."""
        new = self.parse(code, self.fp32_dot)
        self.fwd_state, self.fwd_mixed, self.state, self.mixed, self.grad_w = (
            new.fwd_state,
            new.fwd_mixed,
            new.state,
            new.mixed,
            new.grad_w,
        )


#: Settings on a GPU: the forward product of the features with the states rounds once (its error stays
#: well within the rule: 1.6x the reference's, measured on an H100), and so do the products of the
#: feature gradients with the (exact) projection (``dq``, ``dk`` 1.42-1.47x the reference's error on
#: an H100 at 1024 tokens, d = 64, m = 256, against 1.00 with two passes; the op's forward plus
#: backward 4-8% faster); everything else is split fully. In the interpreter every product is split
#: fully (it rounds float32 to bfloat16 by truncation).
GPU_PRECISION = "21231"
#: Fewest features for which ``grad_w = 1`` is used (else 2): with one pass, the ``dk`` error's ratio
#: to the reference's grows as the features get fewer (H100, bfloat16, causal, 12 draws each: worst
#: 2.16 and median 1.69 at m = 16, d = 16; 1.69 / 1.50 at m = 48; 1.73 / 1.46 at m = 80; 1.55 / 1.47
#: at m = 256), while two passes give 1.00 at every size. Few features make the product cheap anyway.
GRAD_W_ONE_PASS_MIN_FEATURES = 129
FULL_PRECISION = "23232"

#: The precision used by the kernels (module-level so that benchmarks can compare settings).
PRECISION = Precision.parse(
    os.environ.get(
        "RANDATTN_TRITON_PRECISION", FULL_PRECISION if os.environ.get("TRITON_INTERPRET") == "1" else GPU_PRECISION
    ),
    os.environ.get("RANDATTN_TRITON_FP32_DOT", "tf32x3"),
)


def env_bytes(variable: str, default: int) -> int:
    """A byte count from the environment variable ``variable`` (``default`` if unset)."""
    value = os.environ.get(variable)
    if value is None or value.strip() == "":
        return default
    try:
        count = int(value)
    except ValueError:
        count = -1
    if count < 0:
        raise ValueError(f"{variable} must be a whole number of bytes >= 0, got {value!r}")
    return count


def env_settings(variable: str) -> dict[str, tuple[int, ...]]:
    """Per-kernel settings of a tuning run from ``variable="name=n[,n...];..."`` (empty if unset)."""
    settings = {}
    for item in filter(None, os.environ.get(variable, "").split(";")):
        name, value = item.split("=")
        settings[name] = tuple(int(x) for x in value.split(","))
    return settings


#: Launch settings per kernel: ``(num_warps, num_stages)``; ``"*"`` is the default. Overridable with
#: ``RANDATTN_TRITON_LAUNCH="name=warps,stages;..."`` for tuning runs.
LAUNCH: dict[str, tuple[int, int]] = {
    "*": (4, 2),
    "chunk_grad": (4, 1),
    "chunk_out": (4, 1),
    "chunk_max": (4, 1),
    "rstate": (4, 3),
    "state": (4, 4),
}
LAUNCH.update(env_settings("RANDATTN_TRITON_LAUNCH"))  # type: ignore[arg-type]

#: Feature-block width (columns of ``W'`` per tile) and rows per tile of the kernels.
BLOCK_FEATURES = int(os.environ.get("RANDATTN_TRITON_BLOCK_M", "64"))


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for launch arithmetic on the host (plain Python: no Triton call per use)."""
    return -(-a // b)


def next_pow2(x: int) -> int:
    """Smallest power of two >= ``x`` (``x >= 1``)."""
    return 1 << (x - 1).bit_length()


#: Smallest tile side of the head and feature dimensions. Tiles of 16 are legal for the tensor cores,
#: but Triton 3.6 miscompiles some of them on an H100: causal bfloat16 kernels with value tiles of 16
#: and key tiles of 32 or 64 read and write out of bounds (an illegal memory access, or outputs off
#: by orders of magnitude); smaller dimensions are padded (masked) up to this side instead.
MIN_TILE = 32


def pow2_block(x: int) -> int:
    """Smallest power of two >= ``x``, at least :data:`MIN_TILE`."""
    return max(MIN_TILE, next_pow2(x))


def value_block(d: int, dv: int) -> int:
    """Value tile side: :func:`pow2_block` of ``dv``, raised to the key tile's side, at most to 64.

    On an H100 (Triton 3.6) the causal bfloat16 output kernel made an illegal memory access with
    value tiles narrower than that: key / value tiles of 64 / 32 and 128 / 32, like 32 / 16 (see
    :data:`MIN_TILE`); equal sides up to 64 and 128 / 64 are correct.
    """
    return max(pow2_block(dv), min(pow2_block(d), 64))


def feature_block(m: int, d: int) -> int:
    """Features per block: :func:`pow2_block` of ``m``, raised to the key tile's side (``d``'s) up to 64,
    capped at :data:`BLOCK_FEATURES`.

    On an H100 (Triton 3.6) feature tiles narrower than the key tile went wrong like narrow value
    tiles (:func:`value_block`): causal bfloat16 at d = 64, m = 32 (feature tiles of 32) gave ``dq``
    off by a factor of 100 or more, and an illegal memory access with recomputed states (ReLU).
    """
    return min(BLOCK_FEATURES, max(pow2_block(m), min(pow2_block(d), 64)))


@functools.lru_cache(maxsize=256)
def _launch_sizes(d: int, dv: int, m: int, fp32: bool, kernel_fn: str) -> dict:
    return dict(
        d=d,
        dv=dv,
        m=m,
        fp32=fp32,
        BLOCK_D=pow2_block(d),
        BLOCK_DV=value_block(d, dv),
        BLOCK_M=feature_block(m, d),
        KERNEL=KERNEL_CODES[kernel_fn],
        half=0.5 * d**-0.5,
        rscale=relu_scale(m),
        # the kernels' EPS: added to every ReLU feature, or to every softmax query feature
        eps=RELU_EPS if kernel_fn == "relu" else SOFTMAX_QUERY_FLOOR,
    )


def launch_sizes(q: torch.Tensor, v: torch.Tensor, projection: torch.Tensor, kernel_fn: str) -> dict:
    """Sizes and constants of a launch: head dims ``d``, ``dv``, features ``m``, tile sizes, kernel code,
    ``half = d^{-1/2} / 2`` and the ReLU scale (cached per shape; the dict must not be changed)."""
    return _launch_sizes(q.shape[-1], v.shape[-1], projection.shape[0], q.dtype == torch.float32, kernel_fn)


def rows_contiguous(x: torch.Tensor) -> torch.Tensor:
    """``x`` with unit stride along its last dimension (copied only when needed)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def launch_opts(name: str, sizes: dict | None = None) -> dict:
    """``num_warps`` and ``num_stages`` of kernel ``name`` (see :data:`LAUNCH`).

    ``sizes`` (the launch's block sizes, with ``fp32`` true for float32 operands) caps ``num_stages``
    at 1 for float32 tiles of head dim 128: pipelined loads of those tiles needed more shared memory
    than an H100 has (measured there: 246,016 and 262,400 of 232,448 bytes for the query-gradient
    kernel). The ReLU kernel's non-causal kernels at head dim 128 run unpipelined too (H100, bfloat16,
    L=65536: forward 2.90 ms against 2.98 pipelined); its causal state kernels (``state``,
    ``rstate``) keep their stages (fwd+bwd 31.3 ms against 32.2 capped). Tiles of head dim 256
    (bfloat16) run unpipelined with 8 warps (float32 accumulators of 64 x 256).
    """
    warps, stages = LAUNCH.get(name, LAUNCH["*"])
    if sizes is not None:
        widest = max(sizes["BLOCK_D"], sizes["BLOCK_DV"])
        relu_capped = sizes["KERNEL"] == KERNEL_CODES["relu"] and name not in ("state", "rstate")
        if widest >= 256:  # bfloat16 only (see randattn.functional.kernel_max_head_dim)
            warps, stages = 8, 1
        elif widest >= 128 and (sizes["fp32"] or relu_capped):
            stages = 1
    return {"num_warps": warps, "num_stages": stages}


def kernel_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels run in: float16 inputs run the float32 kernels.

    The float16 range cannot hold the unnormalised states and gradients (``dout / den`` sums overflow
    65504 at long sequences), so float16 inputs are widened (exactly) to float32.
    """
    return torch.float32 if dtype == torch.float16 else dtype


def interpreting() -> bool:
    """Whether the kernels run in the Triton interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


#: Prepared projections: ``(id(tensor), dtype) -> (weakref to it, version, W')``.
_PREPARED: dict[tuple[int, torch.dtype], tuple] = {}
_PREPARED_MAX = 64


def prepare_projection(projection: torch.Tensor, dtype: torch.dtype, cached: bool = True) -> torch.Tensor:
    """The scaled projection ``W' = W d^{-1/4}`` the kernels read: rounded to bfloat16 (see
    :func:`randattn.features.feature_projection`), stored in the operand dtype (bfloat16, or float32
    for float32 inputs: exact either way).

    The result is kept for the same projection tensor while it is alive and unchanged (same version
    counter), so the forward and backward of a layer prepare it once. With ``cached=False`` (the
    custom ops, which ``torch.compile`` calls) it is neither kept nor looked up: a CUDA graph records
    the preparation and replays it, so a redrawn projection reaches the replays, and no tensor of the
    graph's memory pool outlives its step in the cache.
    """
    try:
        version = projection._version if cached else None
    except RuntimeError:  # inference tensors have no version counter
        version = None
    key = (id(projection), dtype)
    entry = _PREPARED.get(key)
    if version is not None and entry is not None and entry[0]() is projection and entry[1] == version:
        return entry[2]
    result = scaled_projection(projection).to(dtype).contiguous()
    if version is not None:
        if len(_PREPARED) >= _PREPARED_MAX:
            _PREPARED.pop(next(iter(_PREPARED)))
        _PREPARED[key] = (weakref.ref(projection), version, result)
    return result


#: Ops whose float32 kernels split the float32 operand of their products with ``W'`` into three
#: bfloat16 parts (``W'`` read in bfloat16) instead of two tf32 parts (``W'`` read in float32); see
#: :func:`mm_w`. All kernels of an op read ``W'`` alike, so that the features of a row are the same
#: in each. H100, float32, op fwd+bwd ms, tf32 / bfloat16 parts: non-causal 16384 5.16-5.25 /
#: 5.00-5.08, 65536 19.93-20.19 / 19.51-19.67 (float16 inputs 22.58-22.92 / 22.15-22.25); causal
#: 16384 18.97 / 18.53, but its forward 4.10-4.13 / 5.66-5.72 ms (the output kernel 4.65 / 6.36), so
#: the causal op keeps tf32 parts.
#: ``RANDATTN_TRITON_BF16_W="noncausal,causal"`` sets them (comparisons).
BF16_W_OPS = frozenset(os.environ.get("RANDATTN_TRITON_BF16_W", "noncausal").split(","))


def kernel_projection(projection: torch.Tensor, dtype: torch.dtype, op: str, cached: bool = True) -> torch.Tensor:
    """:func:`prepare_projection` for the kernels of ``op`` (``"noncausal"`` or ``"causal"``) with
    operand dtype ``dtype``: float32 kernels of an op in :data:`BF16_W_OPS` read ``W'`` in bfloat16
    (exact either way) when float32 dots are ``tf32x3``."""
    if dtype == torch.float32 and op in BF16_W_OPS and PRECISION.fp32_dot == "tf32x3":
        dtype = torch.bfloat16
    return prepare_projection(projection, dtype, cached)


def heads_last(n: int, h: int, length: int, dim: int, *, device, dtype) -> torch.Tensor:
    """An ``(N, H, L, dim)`` tensor stored as ``(N, L, H, dim)``.

    Outputs and input gradients use this layout so that merging the heads back into ``(N, L, H * dim)``
    (for the out-projection, or the gradient of the in-projection) is a view, not a copy.
    """
    return torch.empty(n, length, h, dim, device=device, dtype=dtype).transpose(1, 2)


def store_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype kernels write: the interpreter rounds float32 to bfloat16 by truncation, so there
    bfloat16 results are written as float32 and rounded on the host."""
    return torch.float32 if dtype == torch.bfloat16 and interpreting() else dtype


def gradient_buffers(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grads=None):
    """Where the backward kernels write ``dq, dk, dv``: the given views (e.g. slices of a packed
    ``(N, L, 3E)`` gradient) when the kernels can store their dtype, else new heads-last tensors."""
    dtype = store_dtype(q.dtype)
    if grads is not None and all(g.dtype == dtype for g in grads):
        return grads
    n, h, length, d = q.shape
    s_len, dv = v.shape[2], v.shape[3]
    return (
        heads_last(n, h, length, d, device=q.device, dtype=dtype),
        heads_last(n, h, s_len, d, device=k.device, dtype=dtype),
        heads_last(n, h, s_len, dv, device=v.device, dtype=dtype),
    )


def finish_gradients(buffers, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grads=None):
    """``dq, dk, dv`` in the inputs' dtypes, copied into ``grads`` when those were given."""
    if grads is None:
        return tuple(b.to(t.dtype) for b, t in zip(buffers, (q, k, v)))
    for g, b in zip(grads, buffers):
        if g is not b:
            g.copy_(b)
    return tuple(grads)


_GRID_SIZES: dict[torch.device, int] = {}


def fixed_grid_size(device: torch.device) -> int:
    """Number of programs that fills the device (streaming multiprocessors; 8 in the interpreter)."""
    size = _GRID_SIZES.get(device)
    if size is None:
        size = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8
        _GRID_SIZES[device] = size
    return size


def relu_scale(num_features: int) -> float:
    """Factor ``1 / sqrt(m)`` of the ReLU features."""
    return 1.0 / math.sqrt(num_features)


#: The interpreter's bfloat16 ``tl.dot`` is wrong (seen with Triton 3.9): there, bfloat16 operands are
#: widened to float32 first, which gives the same exact products.
_WIDEN_BF16 = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")

# ----------------------------------------------------------------------------------------------
# jit helpers


@triton.jit
def dot_lowp(a, b, acc):
    """``acc + a @ b`` for bfloat16/float16 operands with float32 accumulation."""
    if _WIDEN_BF16 and a.dtype == tl.bfloat16:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def mm_exact_a(a, b_hi, b_lo, acc, PASSES: tl.constexpr, FP32_DOT: tl.constexpr):
    """``acc + a @ b`` where ``a`` is exact in the operand dtype and ``b = b_hi + b_lo``."""
    if a.dtype == tl.float32:
        acc = tl.dot(a, b_hi, acc, input_precision=FP32_DOT)
    else:
        acc = dot_lowp(a, b_hi, acc)
        if PASSES >= 2:
            acc = dot_lowp(a, b_lo, acc)
    return acc


@triton.jit
def mm_exact_a_f32(a, b, acc, PASSES: tl.constexpr, FP32_DOT: tl.constexpr):
    """``acc + a @ b`` where ``a`` is exact in the operand dtype and ``b`` is float32 (split here)."""
    b_hi = b.to(a.dtype)
    return mm_exact_a(a, b_hi, (b - b_hi.to(tl.float32)).to(a.dtype), acc, PASSES, FP32_DOT)


@triton.jit
def mm_exact_b(a, b, acc, PASSES: tl.constexpr, FP32_DOT: tl.constexpr):
    """``acc + a @ b`` where ``a`` is float32 and ``b`` is exact in the operand dtype."""
    if b.dtype == tl.float32:
        acc = tl.dot(a, b, acc, input_precision=FP32_DOT)
    else:
        a_hi = a.to(b.dtype)
        acc = dot_lowp(a_hi, b, acc)
        if PASSES >= 2:
            a_lo = (a - a_hi.to(tl.float32)).to(b.dtype)
            acc = dot_lowp(a_lo, b, acc)
    return acc


@triton.jit
def tf32_round(a):
    """A float32 tile rounded to tf32 (the top 10 bits of the significand), to nearest, ties away
    from zero (a float32 operand left to the tensor cores doubled the logits' error on an H100)."""
    return ((a.to(tl.uint32, bitcast=True) + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.jit
def bf16_round(a):
    """A float32 tile rounded to bfloat16, to nearest, ties to even (the GPU's conversion; the
    interpreter's truncates), as float32."""
    bits = a.to(tl.uint32, bitcast=True)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)


@triton.jit
def _lo_scale(hi):
    """``254 / ulp(hi)`` for bfloat16 values ``hi`` (float32 tile): ``ulp(hi) = 2^(e - 134)`` for the
    biased exponent ``e`` of ``hi``; below 2^-106 (zeros too) the unit stays that of 2^-106, so the
    scale stays finite (the rest of such tiny values is then coarser)."""
    e = ((hi.to(tl.uint32, bitcast=True) >> 23) & 0xFF).to(tl.int32)
    k = tl.minimum(tl.maximum(134 - e, -126), 120)
    return ((k + 127).to(tl.uint32) << 23).to(tl.float32, bitcast=True) * 254.0


@triton.jit
def split_output(out):
    """``out`` (float32 tile) as ``(hi, code)``: ``hi`` rounded to bfloat16 (float32 tile) and the
    rest ``out - hi`` (at most half of ``hi``'s last place) as an int8 ``code`` in units of 1/254 of
    that place: :func:`joined_output` gives ``out`` back to 2^-8 of ``hi``'s last place, about
    2^-16 of ``out``."""
    hi = bf16_round(out)
    c = tl.minimum(tl.maximum((out - hi) * _lo_scale(hi), -127.0), 127.0)
    return hi, tl.where(c >= 0.0, c + 0.5, c - 0.5).to(tl.int8)


@triton.jit
def joined_output(hi, code):
    """The output of :func:`split_output` from its parts (``hi`` as float32)."""
    return hi + code.to(tl.float32) / _lo_scale(hi)


@triton.jit
def mm_w(a, w, acc, PASSES: tl.constexpr, FP32_DOT: tl.constexpr):
    """``acc + a @ w`` with the projection ``w`` (a tile of ``W'`` or ``W'^T``), exact in bfloat16 and
    hence in tf32.

    * float32 ``a`` and ``w`` (float32 kernels, ``tf32x3``): two tf32 products, ``lo @ w`` then
      ``hi @ w``, where ``hi`` is ``a`` rounded to tf32 and ``lo`` the rest, rounded to tf32 (to 2^-22
      of ``a``): ``tf32x3``'s third product, ``hi @ w_lo``, is zero here.
    * float32 ``a``, bfloat16 ``w`` and ``PASSES >= 3`` (float32 kernels given a bfloat16 ``W'``,
      :func:`kernel_projection`): ``a = hi + mid + lo`` in three bfloat16 parts (all of ``a``'s 24
      bits) and three exact bfloat16 products, smallest first: the tensor cores' bfloat16 rate is
      twice their tf32 rate (H100: op fwd+bwd 3% faster than two tf32 products, errors no larger).

    Both are summed from zero and added to ``acc`` with a float32 add, as ``tf32x3`` does: fed through
    the tensor cores' accumulation, the running sum ``acc`` doubled the error of the gradients
    through ``W'`` on an H100. Otherwise (bfloat16/float16 inputs) as :func:`mm_exact_b`."""
    if a.dtype == tl.float32 and w.dtype == tl.bfloat16 and PASSES >= 3:
        hi = a.to(tl.bfloat16)
        rest = a - hi.to(tl.float32)
        mid = rest.to(tl.bfloat16)
        lo = (rest - mid.to(tl.float32)).to(tl.bfloat16)
        prod = dot_lowp(lo, w, tl.zeros_like(acc))
        prod = dot_lowp(mid, w, prod)
        acc += dot_lowp(hi, w, prod)
    elif w.dtype == tl.float32 and FP32_DOT == "tf32x3":
        hi = tf32_round(a)
        prod = tl.dot(tf32_round(a - hi), w, tl.zeros_like(acc), input_precision="tf32")
        acc += tl.dot(hi, w, prod, input_precision="tf32")
    else:
        acc = mm_exact_b(a, w, acc, PASSES, FP32_DOT)
    return acc


@triton.jit
def mm_mixed(a, b, acc, like, PASSES: tl.constexpr, FP32_DOT: tl.constexpr):
    """``acc + a @ b`` of two float32 tiles; ``like`` is any tile in the operand dtype."""
    if like.dtype == tl.float32:
        acc = tl.dot(a, b, acc, input_precision=FP32_DOT)
    else:
        a_hi = a.to(like.dtype)
        b_hi = b.to(like.dtype)
        acc = dot_lowp(a_hi, b_hi, acc)
        if PASSES >= 2:
            acc = dot_lowp((a - a_hi.to(tl.float32)).to(like.dtype), b_hi, acc)
        if PASSES >= 3:
            acc = dot_lowp(a_hi, (b - b_hi.to(tl.float32)).to(like.dtype), acc)
    return acc


@triton.jit
def load_wt(w_ptr, offs_d, offs_m, D, M):
    """The tile ``(BLOCK_D, BLOCK_M)`` of ``W'^T`` from row-major ``(m, d)`` storage."""
    mask = (offs_d[:, None] < D) & (offs_m[None, :] < M)
    return tl.load(w_ptr + offs_m[None, :] * D + offs_d[:, None], mask=mask, other=0.0)


@triton.jit
def logits_tile(x, wt, FP32_DOT: tl.constexpr):
    """Feature logits ``x W'^T`` of a tile, float32-accurate in one product: ``x`` and ``W'`` (see
    :func:`prepare_projection`) are both exact in the operand dtype, so the tensor cores' products are
    exact and only the float32 sums round. (A float32 ``W'`` split in two or three bfloat16 parts took
    two or three products; the ReLU kernel's third part kept the signs of logits near the kink.)
    float32 ``x``: two tf32 products, or three bfloat16 ones with a bfloat16 ``W'`` (:func:`mm_w`)."""
    zero = tl.zeros((x.shape[0], wt.shape[1]), tl.float32)
    if x.dtype == tl.float32:
        proj = mm_w(x, wt, zero, 3, FP32_DOT)
    else:
        proj = mm_w(x, wt, zero, 1, FP32_DOT)
    return proj


@triton.jit
def load_w(w_ptr, offs_m, offs_d, D, M):
    """The tile ``(BLOCK_M, BLOCK_D)`` of ``W'``."""
    mask = (offs_m[:, None] < M) & (offs_d[None, :] < D)
    return tl.load(w_ptr + offs_m[:, None] * D + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def features_tile(x, sq, wt, m_ok, stab, KERNEL: tl.constexpr, FP32_DOT: tl.constexpr, RELU_SCALE, EPS):
    """Features of one tile: ``exp(x W'^T - sq - stab)`` (softmax) or ``relu(x W'^T)/sqrt(m) + eps``.

    ``stab`` is a per-row ``(B, 1)`` or scalar stabiliser. Returns ``(phi, proj)``; padded features are 0.
    """
    proj = logits_tile(x, wt, FP32_DOT)
    if KERNEL == 0:
        phi = tl.exp(proj - sq[:, None] - stab)
    else:
        phi = tl.maximum(proj, 0.0) * RELU_SCALE + EPS
    phi = tl.where(m_ok[None, :], phi, 0.0)
    return phi, proj


@triton.jit
def row_tile(P, offs_r, r_ok, offs_c, C, s_r):
    """The tile ``(len(offs_r), len(offs_c))`` of rows ``offs_r`` (stride ``s_r``) and columns
    ``offs_c`` (unit stride) from ``P``, the start of one head's rows; 0 where ``r_ok`` is false or
    the column is not below ``C``."""
    return tl.load(P + offs_r[:, None] * s_r + offs_c[None, :], mask=r_ok[:, None] & (offs_c[None, :] < C), other=0.0)


@triton.jit
def key_tiles(
    K,
    V,
    BIAS,
    n,
    h,
    offs_s,
    s_ok,
    offs_d,
    offs_dv,
    S,
    D,
    DV,
    sk_n,
    sk_h,
    sk_s,
    sv_n,
    sv_h,
    sv_s,
    HAS_BIAS: tl.constexpr,
):
    """Keys ``(len(offs_s), len(offs_d))``, values ``(len(offs_s), len(offs_dv))`` (0 out of range)
    and the float32 key bias ``(len(offs_s),)`` (``BIAS`` ``(N, S)`` when ``HAS_BIAS``, else 0) of
    positions ``offs_s`` of head ``(n, h)``."""
    y = row_tile(K + n * sk_n + h * sk_h, offs_s, s_ok, offs_d, D, sk_s)
    vt = row_tile(V + n * sv_n + h * sv_h, offs_s, s_ok, offs_dv, DV, sv_s)
    return y, vt, key_bias(BIAS, n, offs_s, s_ok, S, HAS_BIAS)


@triton.jit
def query_rows(
    Q,
    DO,
    CQ,
    DEN,
    n,
    h,
    pid_nh,
    offs,
    ok,
    offs_d,
    offs_dv,
    L,
    D,
    DV,
    sq_n,
    sq_h,
    sq_l,
    sd_n,
    sd_h,
    sd_l,
    half_inv_sqrt_d,
):
    """What a gradient kernel reads of query rows ``offs`` of head ``(n, h)``: the queries ``x`` and
    output gradients ``do`` (0 where not ``ok``), ``sq = |x|^2 / (2 sqrt(d))``, the forward's query
    scales ``cq`` and denominators ``den`` (1 where not ``ok``), and ``1 / den`` (1 for a zero ``den``)."""
    x = row_tile(Q + n * sq_n + h * sq_h, offs, ok, offs_d, D, sq_l)
    do = row_tile(DO + n * sd_n + h * sd_h, offs, ok, offs_dv, DV, sd_l)
    xf = x.to(tl.float32)
    sq = tl.sum(xf * xf, 1) * half_inv_sqrt_d
    cq = tl.load(CQ + pid_nh * L + offs, mask=ok, other=0.0)
    den = tl.load(DEN + pid_nh * L + offs, mask=ok, other=1.0)
    inv_den = 1.0 / tl.where(den == 0.0, 1.0, den)
    return x, do, sq, cq, den, inv_den


@triton.jit
def key_bias(BIAS, n, offs_s, s_ok, S, HAS_BIAS: tl.constexpr):
    """The float32 key bias of positions ``offs_s`` of batch row ``n`` (``BIAS`` ``(N, S)`` when
    ``HAS_BIAS``, else 0)."""
    if HAS_BIAS:
        b = tl.load(BIAS + n * S + offs_s, mask=s_ok, other=0.0)
    else:
        b = tl.zeros(offs_s.shape, tl.float32)
    return b


@triton.jit
def query_floor(phi, m_ok, KERNEL: tl.constexpr, EPS):
    """Softmax query features plus the floor ``EPS`` (padded features stay 0); ReLU features as they are."""
    if KERNEL == 0:
        phi = tl.where(m_ok[None, :], phi + EPS, 0.0)
    return phi


@triton.jit
def query_state_grad_tile(
    x,
    do,
    cq,
    den,
    w,
    acc,
    wt,
    m_ok,
    half_inv_sqrt_d,
    RELU_SCALE,
    EPS,
    KERNEL: tl.constexpr,
    STATE_PASSES: tl.constexpr,
    FP32_DOT: tl.constexpr,
):
    """One tile of the queries' part of the state gradient: the query features ``phi`` (with the
    floor, at the scales ``cq``) times the row weights ``w``, and ``acc + (phi / den)^T dout``.
    Returns ``(acc, phi)``."""
    xf = x.to(tl.float32)
    sq = tl.sum(xf * xf, 1) * half_inv_sqrt_d
    phi, _ = features_tile(x, sq, wt, m_ok, cq[:, None], KERNEL, FP32_DOT, RELU_SCALE, EPS)
    phi = query_floor(phi, m_ok, KERNEL, EPS) * w[:, None]
    p = phi / tl.where(den == 0.0, 1.0, den)[:, None]
    return mm_exact_b(tl.trans(p), do, acc, STATE_PASSES, FP32_DOT), phi
