"""Direct repeat launches (:mod:`randattn.ops.launch`): a kernel compiled for one signature is never
launched for another, and the direct path launches with the arguments Triton's path would bind."""

from __future__ import annotations

import pytest
import torch

from randattn.ops import launch as launch_mod
from randattn.ops.launch import DirectLauncher


class FakeCompiled:
    """Stands in for a compiled kernel: records direct launches."""

    function = "fn-handle"
    packed_metadata = "meta"

    def __init__(self, calls):
        self.calls = calls

    def run(self, *args):
        self.calls.append(("direct", args))


class FakeJit:
    """Stands in for a ``@triton.jit`` kernel: records launches through the normal path."""

    def __init__(self):
        self.calls = []

        def kernel(A, B, n, eps, HAS_BIAS, BLOCK: int = 32, PASSES: int = 2):  # noqa: N803
            pass

        self.fn = kernel

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.calls.append(("triton", grid, args, kwargs))
            return FakeCompiled(self.calls)

        return run


@pytest.fixture
def direct(monkeypatch):
    """Take the direct path on CPU tensors (device 0, stream 7)."""
    monkeypatch.setattr(launch_mod, "_direct_ok", lambda first: isinstance(first, torch.Tensor))
    monkeypatch.setattr(launch_mod, "_current_device", lambda: 0)
    monkeypatch.setattr(launch_mod, "_current_stream", lambda device: 7)


def _kinds(fake):
    return [c[0] for c in fake.calls]


def test_first_launch_goes_through_triton_then_direct_with_all_parameters(direct):
    fake = FakeJit()
    k = DirectLauncher(fake)
    a, b = torch.zeros(64), torch.zeros(64)
    for _ in range(3):
        k[(2, 3)](a, b, 64, 0.5, True, BLOCK=64, num_warps=4, num_stages=2)
    assert _kinds(fake) == ["triton", "direct", "direct"]
    kind, grid, args, kwargs = fake.calls[0]
    assert grid == (2, 3) and args == (a, b, 64, 0.5, True)
    assert kwargs == {"BLOCK": 64, "num_warps": 4, "num_stages": 2}
    _, direct_args = fake.calls[1]
    # grid padded to 3, stream, handle, metadata, no launch metadata or hooks, then every parameter in
    # order with the default of the one not given
    assert direct_args[:9] == (2, 3, 1, 7, "fn-handle", "meta", None, None, None)
    assert direct_args[9:11] == (a, b) and direct_args[11:] == (64, 0.5, True, 64, 2)


@pytest.mark.parametrize(
    "change",
    ["int", "int_type", "dtype", "alignment", "constexpr", "warps", "stages"],
)
def test_any_specialised_change_takes_triton_path_again(direct, change):
    fake = FakeJit()
    k = DirectLauncher(fake)
    base = torch.zeros(64)
    call = dict(a=base, n=64, flag=True, block=64, warps=4, stages=2)
    k[(1,)](call["a"], base, call["n"], 0.5, call["flag"], BLOCK=call["block"], num_warps=4, num_stages=2)
    changed = dict(call)
    if change == "int":
        changed["n"] = 80  # still divisible by 16, different value
    elif change == "int_type":
        changed["flag"] = 1  # 1 == True, but an int is specialised differently from a bool
    elif change == "dtype":
        changed["a"] = torch.zeros(64, dtype=torch.float64)
    elif change == "alignment":
        changed["a"] = base[1:]  # 4 bytes past a 16-byte boundary
        assert changed["a"].data_ptr() % 16 != 0
    elif change == "constexpr":
        changed["block"] = 128
    elif change == "warps":
        changed["warps"] = 8
    else:
        changed["stages"] = 3
    for _ in range(2):
        k[(1,)](
            changed["a"],
            base,
            changed["n"],
            0.5,
            changed["flag"],
            BLOCK=changed["block"],
            num_warps=changed["warps"],
            num_stages=changed["stages"],
        )
    assert _kinds(fake) == ["triton", "triton", "direct"]


def test_without_the_direct_path_every_launch_goes_through_triton(monkeypatch):
    monkeypatch.setattr(launch_mod, "_direct_ok", lambda first: False)
    fake = FakeJit()
    k = DirectLauncher(fake)
    a = torch.zeros(4)
    for _ in range(3):
        k[(1,)](a, a, 4, 0.5, False, num_warps=4, num_stages=2)
    assert _kinds(fake) == ["triton"] * 3


def test_cpu_tensors_never_take_the_direct_path():
    assert not launch_mod._direct_ok(torch.zeros(4))
    assert not launch_mod._direct_ok(None)


def test_launch_hooks_are_seen_as_set_only_when_they_hold_a_hook():
    class Chain:  # the shape of Triton's hook chains (3.5 and later)
        def __init__(self, calls):
            self.calls = calls

    assert not launch_mod.hook_active(None)
    assert not launch_mod.hook_active(Chain([]))
    assert launch_mod.hook_active(Chain([print]))
    assert launch_mod.hook_active(print)  # a plain callable (earlier versions)


def test_bad_arguments_are_named(direct):
    k = DirectLauncher(FakeJit())
    a = torch.zeros(4)
    with pytest.raises(TypeError, match="BLOKC"):
        k[(1,)](a, a, 4, 0.5, False, BLOKC=4, num_warps=4, num_stages=2)
    with pytest.raises(TypeError, match="HAS_BIAS"):
        k[(1,)](a, a, 4, 0.5, num_warps=4, num_stages=2)


def test_signature_table_is_bounded(direct, monkeypatch):
    monkeypatch.setattr(launch_mod, "MAX_SIGNATURES", 3)
    fake = FakeJit()
    k = DirectLauncher(fake)
    a = torch.zeros(4)
    for n in range(10):
        k[(1,)](a, a, n, 0.5, False, num_warps=4, num_stages=2)
    assert len(k._kernels) <= 3
    k[(1,)](a, a, 9, 0.5, False, num_warps=4, num_stages=2)
    assert _kinds(fake)[-1] == "direct"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_direct_launches_match_triton_launches(monkeypatch, causal):
    """Same results through both paths, for aligned and misaligned inputs, forward and backward."""
    from randattn.functional import rand_attention

    torch.manual_seed(0)
    n, h, length, d, m = 2, 4, 300, 64, 128
    base = torch.randn(n * h * length * d + 1, device="cuda", dtype=torch.bfloat16)
    aligned = base[:-1].view(n, h, length, d)
    misaligned = base[1:].view(n, h, length, d)  # 2 bytes past a 16-byte boundary
    assert misaligned.data_ptr() % 16 != 0
    w = torch.randn(m, d, device="cuda")
    dout = torch.randn(n, h, length, d, device="cuda", dtype=torch.bfloat16)

    def run(x):
        q, k, v = (x.detach().clone().requires_grad_() if i else x.detach().requires_grad_() for i in range(3))
        out = rand_attention(q, k, v, w, causal=causal, backend="triton")
        out.backward(dout)
        return [out.float(), q.grad.float(), k.grad.float(), v.grad.float()]

    import triton

    through_triton = []
    triton_run = triton.runtime.jit.JITFunction.run

    def counted(self, *args, **kwargs):
        through_triton.append(self.__name__)
        return triton_run(self, *args, **kwargs)

    monkeypatch.setattr(triton.runtime.jit.JITFunction, "run", counted)
    assert launch_mod.DIRECT_LAUNCH
    for x in (aligned, misaligned, aligned):
        monkeypatch.setattr(launch_mod, "DIRECT_LAUNCH", False)
        expected = run(x)
        monkeypatch.setattr(launch_mod, "DIRECT_LAUNCH", True)
        run(x)  # a signature seen for the first time goes through Triton's path
        through_triton.clear()
        got = run(x)
        assert through_triton == []  # every launch of this run was direct
        for e, g in zip(expected, got):
            assert torch.equal(e, g)
