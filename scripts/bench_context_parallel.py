"""Weak scaling of context-parallel random-feature attention over NCCL (one process per GPU).

Each rank holds a fixed number of positions (``--local-len``, default 65536) of one sequence, so the
total length grows with the number of GPUs. For each scheme (non-causal and causal) it measures one
forward + backward of :func:`randattn.distributed.context_parallel_self_attention` (slowest rank),
the peak memory per GPU, and the time of the collectives alone (the same calls on tensors of the
same shapes). ``--verify`` first checks outputs and gradients against one process holding the whole
(short) sequence.

Run once per GPU count and compare with ``P = 1`` (weak-scaling efficiency ``t_1 / t_P``)::

    torchrun --standalone --nproc-per-node=1 scripts/bench_context_parallel.py --verify
    torchrun --standalone --nproc-per-node=2 scripts/bench_context_parallel.py --verify
    torchrun --standalone --nproc-per-node=4 scripts/bench_context_parallel.py --verify

Rank 0 prints a table and writes ``context_parallel_p{P}.json`` to ``$OUT`` (when set) and to
``--out-dir`` (default ``docs/_data/decoding``). On a machine without GPUs, ``--device cpu`` uses gloo.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
import torch.distributed as dist

from randattn import RandMultiHeadAttention
from randattn.decoding import block_state
from randattn.distributed import (
    all_gather,
    all_reduce_sum,
    communication_bytes,
    context_parallel_attention,
    context_parallel_self_attention,
)
from randattn.functional import rand_attention

DEFAULT_OUT_DIR = Path(__file__).resolve().parents[1] / "docs" / "_data" / "decoding"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _slowest(seconds: float, device: torch.device) -> float:
    t = torch.tensor([seconds], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _timed(fn, repeats: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    dist.barrier()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(device)
    return _slowest((time.perf_counter() - start) / repeats, device)


def verify(device: torch.device, rank: int, world: int) -> dict:
    """Outputs and gradients of a short sharded sequence against one process, float32."""
    g = torch.Generator().manual_seed(0)
    local, n, h, d, m = 96, 2, 4, 32, 64
    total = local * world
    q, k, v = (torch.randn(n, h, total, d, generator=g).to(device) for _ in range(3))
    w = torch.randn(n, h, total, d, generator=g).to(device)
    proj = torch.randn(m, d, generator=g).to(device)
    worst = 0.0
    for causal in (False, True):
        full = [t.clone().requires_grad_() for t in (q, k, v)]
        ref = rand_attention(*full, proj, causal=causal, backend="reference")
        ref_grads = torch.autograd.grad((ref * w).sum(), full)
        sl = slice(rank * local, (rank + 1) * local)
        part = [t[:, :, sl].clone().requires_grad_() for t in (q, k, v)]
        out = context_parallel_attention(*part, proj, causal=causal)
        grads = torch.autograd.grad((out * w[:, :, sl]).sum(), part)
        out = out.detach()
        errs = [(out - ref[:, :, sl]).norm() / ref[:, :, sl].norm()]
        errs += [(a - b[:, :, sl]).norm() / b[:, :, sl].norm() for a, b in zip(grads, ref_grads)]
        worst = max(worst, max(e.item() for e in errs))
    worst = _slowest(worst, device)
    return {"max_relative_error": worst, "passed": worst <= 1e-5}


def measure(args: argparse.Namespace, device: torch.device, world: int, causal: bool) -> dict:
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    layer = RandMultiHeadAttention(
        args.embed_dim,
        args.num_heads,
        batch_first=True,
        causal=causal,
        num_random_features=args.num_features,
        seed=0,
        device=device,
        dtype=dtype,
    )
    x = torch.randn(args.batch_size, args.local_len, args.embed_dim, device=device, dtype=dtype, requires_grad=True)

    def fwd_bwd():
        out = context_parallel_self_attention(layer, x)
        out.float().square().mean().backward()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = _timed(fwd_bwd, args.repeats, args.warmup, device)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None

    # the collectives alone, on tensors of the shapes one forward + backward communicates
    n, h, m, dv = args.batch_size, args.num_heads, layer.num_random_features, layer.head_dim
    state = torch.randn(n, h, m, dv + 1, device=device, requires_grad=True)

    def comm():
        if causal:
            meta = torch.zeros(n * h + 1, device=device, dtype=torch.float64)
            all_gather(meta)
            all_gather(state).sum().backward()
        else:
            stab = torch.zeros(n, h, device=device)
            dist.all_reduce(stab, op=dist.ReduceOp.MAX)
            all_reduce_sum(state).sum().backward()

    comm_seconds = _timed(comm, args.repeats, args.warmup, device)
    # one block state alone: the local work that replaces exchanging keys and values
    k = torch.randn(n, h, args.local_len, layer.head_dim, device=device, dtype=dtype)
    state_seconds = _timed(lambda: block_state(k, k, layer.projection), args.repeats, args.warmup, device)
    sent = communication_bytes(
        batch_size=n, num_heads=h, num_features=m, value_dim=dv, world_size=max(world, 2), causal=causal
    )
    return {
        "causal": causal,
        "fwd_bwd_ms": seconds * 1e3,
        "comm_ms": comm_seconds * 1e3,
        "block_state_ms": state_seconds * 1e3,
        "peak_memory_bytes": peak,
        "bytes_sent_per_rank_forward": sent if world > 1 else 0,
    }


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--local-len", type=int, default=65536, help="positions per rank")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--embed-dim", type=int, default=512)
    p.add_argument("--num-heads", type=int, default=8)
    p.add_argument("--num-features", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--verify", action="store_true", help="check against one process first")
    p.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    # NVLink multicast stays off (NCCL NVLS and symmetric-memory multicast), whatever the environment says.
    os.environ["NCCL_NVLS_ENABLE"] = "0"
    os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
    os.environ["NVSHMEM_DISABLE_NVLS"] = "1"
    if args.device == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    result: dict = {
        "world_size": world,
        "backend": dist.get_backend(),
        "environment": {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine(),
            "torch": torch.__version__,
        },
        "config": {
            k: getattr(args, k) for k in ("dtype", "local_len", "batch_size", "embed_dim", "num_heads", "num_features")
        },
    }
    result["config"]["total_len"] = args.local_len * world
    if args.verify:
        result["verify"] = verify(device, rank, world)
        if rank == 0:
            print(f"verify (P={world}): {result['verify']}", flush=True)
    rows = [measure(args, device, world, causal) for causal in (False, True)]
    result["rows"] = rows
    if rank == 0:
        for r in rows:
            peak = "-" if r["peak_memory_bytes"] is None else f"{r['peak_memory_bytes'] / 2**30:.2f} GiB"
            print(
                f"P={world} L_total={args.local_len * world:>8} causal={r['causal']!s:5}  fwd+bwd {r['fwd_bwd_ms']:8.2f} ms"
                f"   comm {r['comm_ms']:7.3f} ms   block state {r['block_state_ms']:7.3f} ms   peak {peak}",
                flush=True,
            )
        text = json.dumps(result, indent=1) + "\n"
        targets = [args.out_dir] + ([Path(os.environ["OUT"])] if os.environ.get("OUT") else [])
        for folder in targets:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"context_parallel_p{world}.json").write_text(text)
            print(f"wrote {folder / f'context_parallel_p{world}.json'}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
