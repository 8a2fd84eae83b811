"""Direct repeat launches of the Triton kernels.

Triton's launch path (``kernel[grid](...)``) binds the arguments, builds the specialisation and its
cache key, reads its settings and checks the kernel's globals on every call: tens of microseconds
of host time per launch. At short sequences that host time, not the GPU, sets the speed of a layer
(six launches per forward and backward).

:func:`direct_launch` wraps a ``@triton.jit`` kernel. Its first launch for a given *signature* goes
through Triton's path; the compiled kernel that Triton returns is kept and later launches of the
same signature call it directly. The signature holds everything Triton specialises a compilation
on, exactly:

- every non-tensor argument's value (integers: Triton specialises on ``== 1`` and divisibility by
  16; constexprs; floats are kept too, though Triton does not specialise on them);
- every tensor argument's dtype and whether its address is 16-byte aligned (Triton's pointer
  specialisation);
- ``num_warps``, ``num_stages`` and the current device.

So a different shape, stride, alignment or setting never reuses a kernel compiled for another one:
it takes Triton's path once and is kept as well. The direct path needs CUDA tensors, Triton 3.4 or
later (``triton.knobs``) and no launch hooks (set by profilers such as Proton, see
:func:`hook_active`); otherwise, in the
interpreter (``TRITON_INTERPRET=1``), or with ``RANDATTN_DIRECT_LAUNCH=0``, every launch goes
through Triton's path.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import triton

__all__ = ["DirectLauncher", "direct_launch", "hook_active", "DIRECT_LAUNCH"]

#: Whether repeat launches may skip Triton's launch path (``RANDATTN_DIRECT_LAUNCH=0`` turns it off).
DIRECT_LAUNCH = (
    os.environ.get("RANDATTN_DIRECT_LAUNCH", "1") != "0"
    and os.environ.get("TRITON_INTERPRET") != "1"
    and triton.__version__.split(".")[0] == "3"
    and hasattr(triton, "knobs")
)

#: Signatures kept per kernel; the table starts afresh when full (e.g. ever-changing lengths).
MAX_SIGNATURES = 1024


def hook_active(hook) -> bool:
    """Whether a launch hook of ``triton.knobs.runtime`` is set: a callable, or a hook chain
    (Triton 3.5 and later) holding at least one."""
    if hook is None:
        return False
    calls = getattr(hook, "calls", None)
    return calls is None or len(calls) > 0


def _direct_ok(first) -> bool:
    """Whether a launch whose first argument is ``first`` may take the direct path."""
    if not (DIRECT_LAUNCH and isinstance(first, torch.Tensor) and first.is_cuda):
        return False
    runtime = triton.knobs.runtime
    return not (hook_active(runtime.launch_enter_hook) or hook_active(runtime.launch_exit_hook))


def _current_device() -> int:
    return torch.cuda.current_device()


def _current_stream(device: int) -> int:
    return torch._C._cuda_getCurrentRawStream(device)


class DirectLauncher:
    """A ``@triton.jit`` kernel launched as ``launcher[grid](*args, num_warps=..., num_stages=..., **constexprs)``.

    Positional arguments come first in the kernel's parameter order; the rest (constexprs) by name.
    ``fn`` is the wrapped kernel.
    """

    def __init__(self, fn) -> None:
        self.fn = fn
        self.__name__ = getattr(fn, "__name__", type(fn).__name__)
        self.__doc__ = getattr(fn, "__doc__", None)
        self._names: list[str] | None = None
        self._defaults: dict = {}
        self._kernels: dict[tuple, Any] = {}

    def __getitem__(self, grid):
        def launch(*args, num_warps: int = 4, num_stages: int = 3, **constexprs):
            return self.launch(grid, args, constexprs, num_warps, num_stages)

        return launch

    def _param_names(self) -> list[str]:
        if self._names is None:
            import inspect

            params = inspect.signature(self.fn.fn).parameters
            self._names = list(params)
            self._defaults = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}
        return self._names

    def values(self, args: tuple, constexprs: dict) -> list:
        """All parameters in the kernel's order (as Triton's launcher takes them)."""
        names = self._param_names()
        rest = names[len(args) :]
        unknown = set(constexprs) - set(rest)
        if unknown:
            raise TypeError(f"{self.__name__} got unexpected arguments {sorted(unknown)}")
        values = list(args)
        for name in rest:
            if name in constexprs:
                values.append(constexprs[name])
            elif name in self._defaults:
                values.append(self._defaults[name])
            else:
                raise TypeError(f"{self.__name__} is missing argument {name!r}")
        return values

    @staticmethod
    def signature(values: list, device: int, num_warps: int, num_stages: int) -> tuple:
        """The key of a compiled kernel: see the module docstring."""
        tensor = torch.Tensor
        return (device, num_warps, num_stages) + tuple(
            [(v.dtype, v.data_ptr() % 16 == 0) if isinstance(v, tensor) else (v.__class__, v) for v in values]
        )

    def launch(self, grid: tuple, args: tuple, constexprs: dict, num_warps: int, num_stages: int):
        if not _direct_ok(args[0] if args else None):
            return self.fn[grid](*args, num_warps=num_warps, num_stages=num_stages, **constexprs)
        values = self.values(args, constexprs)
        device = _current_device()
        key = self.signature(values, device, num_warps, num_stages)
        kernel = self._kernels.get(key)
        if kernel is None:
            kernel = self.fn[grid](*args, num_warps=num_warps, num_stages=num_stages, **constexprs)
            if hasattr(kernel, "result"):  # asynchronous compilation
                kernel = kernel.result()
            if all(hasattr(kernel, a) for a in ("run", "function", "packed_metadata")):
                if len(self._kernels) >= MAX_SIGNATURES:
                    self._kernels.clear()
                self._kernels[key] = kernel
            return kernel
        g = tuple(grid) + (1, 1)
        stream = _current_stream(device)
        kernel.run(g[0], g[1], g[2], stream, kernel.function, kernel.packed_metadata, None, None, None, *values)
        return kernel


def direct_launch(fn) -> DirectLauncher:
    """Decorator (outside ``@triton.jit``): launch the kernel through :class:`DirectLauncher`."""
    return DirectLauncher(fn)
