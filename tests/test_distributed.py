"""Data parallelism (DDP, FSDP2), seeded redraws and context parallelism, on gloo with CPU processes.

Every distributed check compares with one process holding the whole batch or sequence.
"""

from __future__ import annotations

import copy
import gc
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from randattn import RandMultiHeadAttention, convert_mha
from randattn.distributed import (
    communication_bytes,
    communication_table,
    context_parallel_attention,
    context_parallel_self_attention,
    redraw_all,
    redraw_seed,
    ring_attention_bytes,
)
from randattn.distributed.communication import table_rst
from randattn.functional import rand_attention

TABLE_FILE = Path(__file__).resolve().parents[1] / "docs" / "_data" / "decoding" / "communication_table.txt"
TOL = 1e-5


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, check: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        CHECKS[check](rank, world)
        # wrappers that hold the group (DDP's reducer, FSDP's state) sit in reference cycles: free them
        # while the group exists, not at interpreter exit after it (gloo aborts tearing down then)
        gc.collect()
        dist.barrier()  # no rank tears down its gloo threads while another still communicates
    finally:
        dist.destroy_process_group()


def _spawn(check: str, world: int) -> None:
    mp.spawn(_entry, args=(world, _free_port(), check), nprocs=world, join=True)


def _same_on_all_ranks(t: torch.Tensor) -> bool:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return all(torch.equal(p, parts[0]) for p in parts)


# ------------------------------------------------------------------------------------ data parallel
class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.TransformerEncoderLayer(32, 4, dim_feedforward=48, dropout=0.0, batch_first=True)
        self.head = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x, is_causal=False).mean(dim=1))


def _tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return convert_mha(_Tiny(), seed=5, backend="reference")


def _global_batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, 10, 32, generator=g), torch.randn(4, 3, generator=g)


def _reference_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    x, y = _global_batch()
    nn.functional.mse_loss(model(x), y).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def _check_data_parallel(rank: int, world: int) -> None:
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    base = _tiny_model()
    expected = _reference_grads(copy.deepcopy(base))
    x, y = _global_batch()
    per_rank = x.shape[0] // world
    xs, ys = x[rank * per_rank : (rank + 1) * per_rank], y[rank * per_rank : (rank + 1) * per_rank]

    ddp = DistributedDataParallel(copy.deepcopy(base))
    nn.functional.mse_loss(ddp(xs), ys).backward()
    for name, p in ddp.module.named_parameters():
        assert _rel_err(p.grad, expected[name]) <= TOL, f"DDP gradient of {name}"

    fsdp = copy.deepcopy(base)
    fully_shard(fsdp.encoder)
    fully_shard(fsdp)
    nn.functional.mse_loss(fsdp(xs), ys).backward()
    for name, p in fsdp.named_parameters():
        grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        assert _rel_err(grad, expected[name]) <= TOL, f"FSDP2 gradient of {name}"

    # Redraw without communication: replicas built from different global generators disagree, then
    # agree after redraw_all, under DDP and FSDP2, and equal a single process's draw.
    torch.manual_seed(100 + rank)
    drifting = RandMultiHeadAttention(32, 4)
    assert not _same_on_all_ranks(drifting.projection)
    for wrapped in (ddp, fsdp, drifting):
        assert redraw_all(wrapped, step=7, base_seed=3) == 1
    single = copy.deepcopy(base)
    redraw_all(single, step=7, base_seed=3)
    for layer in (ddp.module.encoder.self_attn, fsdp.encoder.self_attn, drifting):
        assert _same_on_all_ranks(layer.projection)
        assert torch.equal(layer.projection, single.encoder.self_attn.projection)
    before = drifting.projection.clone()
    redraw_all(drifting, step=8, base_seed=3)
    assert not torch.equal(before, drifting.projection)
    # the redrawn FSDP2 model still trains identically to one process
    fsdp.zero_grad()
    nn.functional.mse_loss(fsdp(xs), ys).backward()
    single.zero_grad()
    expected = _reference_grads(single)
    for name, p in fsdp.named_parameters():
        assert _rel_err(p.grad.full_tensor(), expected[name]) <= TOL, f"FSDP2 gradient of {name} after redraw"


# ------------------------------------------------------------------------------ context parallel
LENGTHS = (5, 9, 4, 6)  # uneven blocks, one per rank


def _check_context_parallel(rank: int, world: int) -> None:
    _check_communication(rank, world)
    lengths = LENGTHS[:world]
    start, stop = sum(lengths[:rank]), sum(lengths[: rank + 1])
    total = sum(lengths)
    g = torch.Generator().manual_seed(2)
    n, h, d, m = 2, 2, 8, 16
    q, k, v = (1.5 * torch.randn(n, h, total, d, generator=g) for _ in range(3))
    projection = torch.randn(m, d, generator=g)
    weight = torch.randn(n, h, total, d, generator=g)
    mask = torch.rand(n, total, generator=g) < 0.25
    mask[:, 0] = False
    # (causal, kernel_fn, local_window); a window of 3 reaches back into the previous rank's block
    cases = [(False, "softmax", None), (False, "relu", None), (True, "softmax", None), (True, "relu", None)]
    for causal, kernel_fn, window in cases + [(True, "softmax", 3)]:
        for key_mask in (None, mask):
            full = [t.clone().requires_grad_() for t in (q, k, v)]
            ref = rand_attention(
                *full,
                projection,
                kernel_fn=kernel_fn,
                causal=causal,
                key_padding_mask=key_mask,
                backend="reference",
                local_window=window,
            )
            ref_grads = torch.autograd.grad((ref * weight).sum(), full)
            local = [t[:, :, start:stop].clone().requires_grad_() for t in (q, k, v)]
            out = context_parallel_attention(
                *local,
                projection,
                kernel_fn=kernel_fn,
                causal=causal,
                key_padding_mask=None if key_mask is None else key_mask[:, start:stop],
                chunk_size=3,
                local_window=window,
            )
            what = f"causal={causal} kernel_fn={kernel_fn} window={window} mask={key_mask is not None} rank={rank}"
            assert _rel_err(out, ref[:, :, start:stop]) <= TOL, f"output, {what}"
            grads = torch.autograd.grad((out * weight[:, :, start:stop]).sum(), local)
            for name, got, want in zip("qkv", grads, ref_grads):
                assert _rel_err(got, want[:, :, start:stop]) <= TOL, f"grad {name}, {what}"
    # a window wider than some block: every rank raises (none waits in a collective)
    with pytest.raises(ValueError, match="local_window"):
        context_parallel_attention(
            q[:, :, start:stop], k[:, :, start:stop], v[:, :, start:stop], projection, causal=True,
            local_window=max(lengths) + 1,
        )

    # module level: the rank's block of the layer's output; parameter gradients summed over ranks
    torch.manual_seed(4)
    for causal, window in ((False, None), (True, None), (True, 3)):
        layer = RandMultiHeadAttention(16, 2, causal=causal, seed=9, backend="reference", local_window=window)
        x = torch.randn(total, 3, 16, generator=g)  # (L, N, E)
        w = torch.randn(total, 3, 16, generator=g)
        ((layer(x, x, x, need_weights=False)[0] * w).sum()).backward()
        expected = {name: p.grad.clone() for name, p in layer.named_parameters()}
        ref = layer(x, x, x, need_weights=False)[0]
        layer.zero_grad()
        out = context_parallel_self_attention(layer, x[start:stop])
        assert _rel_err(out, ref[start:stop]) <= TOL, f"module output, causal={causal} window={window}"
        (out * w[start:stop]).sum().backward()
        for name, p in layer.named_parameters():
            grad = p.grad.clone()
            dist.all_reduce(grad)
            assert _rel_err(grad, expected[name]) <= TOL, f"module gradient of {name}, causal={causal}"


def _collective_bytes(local_len: int, causal: bool) -> list[tuple[str, int]]:
    """(collective, bytes of its input) of one forward + backward of context_parallel_attention."""
    names = ("all_reduce", "all_gather", "reduce_scatter_tensor")
    originals = {name: getattr(dist, name) for name in names}
    calls: list[tuple[str, int]] = []

    def recording(name):
        def call(*args, **kwargs):
            tensor = args[1] if name == "all_gather" else args[0]
            calls.append((name, tensor.numel() * tensor.element_size()))
            return originals[name](*args, **kwargs)

        return call

    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 3, local_len, 8, generator=g, requires_grad=True) for _ in range(3))
    for name in names:
        setattr(dist, name, recording(name))
    try:
        out = context_parallel_attention(q, k, v, torch.randn(16, 8, generator=g), causal=causal)
        out.sum().backward()
    finally:
        for name in names:
            setattr(dist, name, originals[name])
    return calls


def _check_communication(rank: int, world: int) -> None:
    n, h, m, dv = 2, 3, 16, 8
    state = n * h * m * (dv + 1) * 4
    for causal in (False, True):
        short, long = _collective_bytes(5, causal), _collective_bytes(40, causal)
        assert short == long, f"communication depends on the length: {short} vs {long}"
        if causal:  # forward: all-gather of the state and of the stabilisers + length; backward: gradient of the state
            assert short == [("all_gather", state), ("all_gather", (n * h + 1) * 8), ("all_reduce", world * state)]
        else:  # forward: stabiliser MAX and state SUM; backward: gradient of the state
            assert short == [("all_reduce", n * h * 4), ("all_reduce", state), ("all_reduce", state)]


CHECKS = {"data_parallel": _check_data_parallel, "context_parallel": _check_context_parallel}


def test_data_parallel_ddp_fsdp2_and_seeded_redraw_two_ranks():
    _spawn("data_parallel", 2)


@pytest.mark.parametrize("world", [2, 4])
def test_context_parallel_matches_one_process(world):
    _spawn("context_parallel", world)


# ------------------------------------------------------------------------------- no process group
def test_context_parallel_needs_a_process_group():
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(RuntimeError, match="process group"):
        context_parallel_attention(q, q, q, torch.randn(4, 8))


def test_redraw_seed_is_deterministic_and_distinct():
    assert redraw_seed(1, 2, 3) == redraw_seed(1, 2, 3)
    seeds = {redraw_seed(b, s, i) for b in range(3) for s in range(3) for i in range(3)}
    assert len(seeds) == 27
    with pytest.raises(ValueError, match="step"):
        redraw_seed(0, -1, 0)


def test_communication_is_independent_of_length_and_ring_is_linear():
    rows = communication_table((65536, 131072, 4194304))
    assert len({r["causal"] for r in rows}) == 1 and len({r["noncausal"] for r in rows}) == 1
    assert rows[1]["ring"] == 2 * rows[0]["ring"] and rows[2]["ring"] == 64 * rows[0]["ring"]
    # 2 ranks, N=1, H=1, m=2, d_v=3: all-reduce of 8 float32 state + 1 stabiliser sends (2-1)/2 * 2 * 36 bytes
    assert communication_bytes(batch_size=1, num_heads=1, num_features=2, value_dim=3, world_size=2, causal=False) == 36
    # all-gather: one other rank receives 32 bytes of state + 16 bytes of stabiliser and length
    assert communication_bytes(batch_size=1, num_heads=1, num_features=2, value_dim=3, world_size=2, causal=True) == 48
    # one block of 4 positions, K and V of 2 bf16 values each, passed once
    assert ring_attention_bytes(8, batch_size=1, num_heads=1, head_dim=2, world_size=2) == 32
    with pytest.raises(ValueError, match="world_size"):
        ring_attention_bytes(9, batch_size=1, num_heads=1, head_dim=2, world_size=2)


def test_recorded_communication_table_is_current():
    assert TABLE_FILE.read_text() == table_rst(), (
        'regenerate with: python -c "from randattn.distributed.communication import table_rst; '
        "print(table_rst(), end='')\" > docs/_data/decoding/communication_table.txt"
    )


def test_weak_scaling_rows_from_records(tmp_path):
    import json

    from randattn.distributed import load_weak_scaling, weak_scaling_rows

    assert load_weak_scaling(tmp_path) == []
    for p, ms in ((2, 110.0), (1, 100.0)):
        rows = [
            {"causal": c, "fwd_bwd_ms": ms * (2 if c else 1), "comm_ms": 1.0, "peak_memory_bytes": 2**30}
            for c in (False, True)
        ]
        record = {"world_size": p, "config": {"total_len": 1024 * p}, "rows": rows}
        (tmp_path / f"context_parallel_p{p}.json").write_text(json.dumps(record))
    rows = weak_scaling_rows(load_weak_scaling(tmp_path))
    assert [(r["world_size"], r["causal"]) for r in rows] == [(1, False), (1, True), (2, False), (2, True)]
    assert rows[0]["efficiency"] == 1.0
    assert rows[3]["efficiency"] == pytest.approx(100 / 110)
    assert rows[3]["total_len"] == 2048 and rows[3]["peak_memory_gib"] == 1.0
