"""Compile every Triton kernel for sm_90 on a machine without a GPU (catches compile errors early).

Usage: python scripts/compile_check.py
"""

from __future__ import annotations

import inspect
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from randattn.ops.causal import triton as causal_mod
from randattn.ops.launch import DirectLauncher
from randattn.ops.noncausal import triton as noncausal_mod

INTS = {"H", "L", "S", "D", "DV", "M", "NT", "NMB", "NSPLIT", "KEYS_PER_SPLIT", "ROWS_PER_SPLIT"}


def compile_kernel(kernel, constexprs: dict, dtype: str) -> None:
    params = inspect.signature(kernel.fn).parameters
    sig = {}
    pointer = True
    for name, _p in params.items():
        if not name.isupper() or name in INTS:
            pointer = False
        if name in constexprs:
            sig[name] = "constexpr"
        elif pointer:
            sig[name] = "*" + (
                dtype if name in ("K", "V", "Q", "DO", "OUT", "DQ", "DK", "DVO", "W_HI", "W_LO") else "fp32"
            )
        elif name in ("half_inv_sqrt_d", "RELU_SCALE", "EPS"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    for name, _val in constexprs.items():
        sig[name] = "constexpr"
    src = ASTSource(kernel, sig, constexprs)
    out = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    md = out.metadata
    print(f"{kernel.fn.__name__:32s} {dtype:5s} ok  shared={md.shared} regs?={getattr(md, 'num_regs', '?')}")


def main() -> int:
    base = dict(KERNEL=0, BLOCK_D=64, BLOCK_M=64, BLOCK_DV=64, FP32_DOT="ieee")
    failed = 0
    for mod in (noncausal_mod, causal_mod):
        for name, kernel in vars(mod).items():
            kernel = getattr(kernel, "fn", kernel) if isinstance(kernel, DirectLauncher) else kernel
            if not isinstance(kernel, triton.runtime.jit.JITFunction) or not name.endswith("_kernel"):
                continue
            params = inspect.signature(kernel.fn).parameters
            for dtype in ("bf16", "fp32"):
                ce = {k: v for k, v in base.items() if k in params}
                for k in params:
                    if k.startswith("BLOCK_") and k not in ce:
                        ce[k] = 64
                    if k.endswith("_PASSES"):
                        ce[k] = 2
                    if k in ("HAS_BIAS",):
                        ce[k] = True
                try:
                    compile_kernel(kernel, ce, dtype)
                except Exception as exc:  # noqa: BLE001
                    failed += 1
                    print(f"{name} {dtype} FAILED: {type(exc).__name__}: {str(exc)[:2000]}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
