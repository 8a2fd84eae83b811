"""Host work per call of the packed self-attention path: tensor operations and kernel launches.

At short sequences a layer's speed is its host time (every tensor operation and every launch costs
microseconds of Python and dispatch, more than the GPU needs for the work). These budgets pin the
number of tensor operations and the launches the kernels' path issues per forward and backward
(counted with the launches replaced by a recorder, so no kernel runs), so that added host work is a
deliberate change.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("triton")

from _triton_checks import DEVICE  # noqa: E402

from randattn.functional import packed_self_attention  # noqa: E402
from randattn.ops import launch as launch_mod  # noqa: E402


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


# (tensor ops, kernels) per pass; the non-causal forward at this length merges the key splits in the
# query-output kernel (two launches), the causal forward computes its stabilisers in a kernel; the
# causal backward gets dq, then dk and dv, from the carried states kept by the forward at this length
# (recomputed: one kernel, from the forward's stabilisers)
CAUSAL_STATES = ["_chunk_max_kernel", "_stabiliser_kernel", "_state_kernel"]
CAUSAL_GRADS = ["_chunk_grad_kernel", "_rstate_kernel", "_chunk_grad_kernel"]
BUDGET = {
    "noncausal": {"forward": (13, ["_key_state_kernel", "_query_out_kernel"]),
                  "backward": (11, ["_query_grad_kernel", "_query_state_grad_kernel", "_key_grad_kernel"])},
    "causal": {"forward": (19, CAUSAL_STATES + ["_chunk_out_kernel"]), "backward": (11, CAUSAL_GRADS)},
    "causal-recomputed": {"forward": (21, CAUSAL_STATES + ["_chunk_out_kernel"]),  # + 2 empty placeholders
                          "backward": (14, ["_state_kernel", "_chunk_out_kernel"] + CAUSAL_GRADS)},  # + t
}  # fmt: skip


@pytest.mark.parametrize("mode", list(BUDGET))
def test_tensor_ops_and_launches_per_pass(mode, monkeypatch):
    from randattn.ops.causal import triton as causal_kernels

    causal = mode != "noncausal"
    if mode == "causal-recomputed":
        monkeypatch.setattr(causal_kernels, "KEEP_STATES_MAX_BYTES", 0)
    launched: list[str] = []
    monkeypatch.setattr(
        launch_mod.DirectLauncher, "launch", lambda self, grid, *rest: launched.append(self.__name__)
    )
    qkv = torch.randn(2, 256, 3 * 32, device=DEVICE, requires_grad=True)
    projection = torch.randn(16, 8, device=DEVICE)
    dout = torch.ones(2, 256, 4, 8, device=DEVICE).transpose(1, 2)  # heads-last, as from the out-projection
    # a first call prepares the projection (kept per tensor version, as for a layer's buffer)
    packed_self_attention(qkv, 4, projection, causal=causal, backend="triton").backward(dout)
    launched.clear()
    qkv.grad = None
    counts = {}
    with CountOps() as c:
        out = packed_self_attention(qkv, 4, projection, causal=causal, backend="triton")
    counts["forward"] = (c.ops, list(launched))
    launched.clear()
    with CountOps() as c:
        out.backward(dout)
    counts["backward"] = (c.ops, list(launched))
    for name, (ops, kernels) in counts.items():
        budget, expected = BUDGET[mode][name]
        assert kernels == expected, f"{name}: launched {kernels}"
        assert sum(ops.values()) <= budget, f"{name}: {dict(ops)} (budget {budget})"
