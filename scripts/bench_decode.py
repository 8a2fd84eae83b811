"""Per-token decoding time vs position: random-feature recurrent state against a growing KV cache.

For each position ``p`` (default 128 .. 65536) and batch size, measures the time of one decoding step
of one attention layer (in-projection, attention, out-projection) once ``p`` tokens are behind it:

- ``randattn``: :func:`randattn.decoding.step` of a causal ``RandMultiHeadAttention`` on a state of
  fixed size ``(N, H, m, d)``;
- ``randattn_cuda_graph`` (CUDA only): the same step replayed as one captured CUDA graph, possible
  because the state never changes size;
- ``mha_kv_cache``: the same projections as ``nn.MultiheadAttention`` with a preallocated KV cache,
  the new token attending to the ``p + 1`` cached keys with ``F.scaled_dot_product_attention``.

Prints a table and writes JSON to ``$OUT/decode.json`` (when ``$OUT`` is set) and to ``--out``
(default ``docs/_data/decoding/decode.json``).

Usage (GPU, about a minute)::

    PYTHONUNBUFFERED=1 python scripts/bench_decode.py
    python scripts/bench_decode.py --device cpu --max-position 4096 --batch-sizes 1   # quick check
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from randattn import RandMultiHeadAttention
from randattn.decoding import DecodingState, init_state, step

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "docs" / "_data" / "decoding" / "decode.json"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_steps(fn, steps: int, warmup: int, device: torch.device) -> float:
    """Mean seconds of ``fn()`` over ``steps`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / steps


class KVCacheLayer:
    """One ``nn.MultiheadAttention``-style layer decoding with a preallocated KV cache."""

    def __init__(self, layer: RandMultiHeadAttention, batch: int, max_len: int):
        self.w_q, self.w_k, self.w_v = layer.in_proj_weight.detach().chunk(3)
        self.b_q, self.b_k, self.b_v = layer.in_proj_bias.detach().chunk(3)
        self.out_proj = layer.out_proj
        self.h, self.d = layer.num_heads, layer.head_dim
        w = layer.in_proj_weight
        shape = (batch, self.h, max_len, self.d)
        self.k = torch.randn(shape, device=w.device, dtype=w.dtype)
        self.v = torch.randn(shape, device=w.device, dtype=w.dtype)

    def release(self) -> None:
        """Free the cache memory before the next batch size allocates its own."""
        self.k = self.v = torch.empty(0)

    def step(self, x: torch.Tensor, pos: int) -> torch.Tensor:
        """``x (N, 1, E)`` at position ``pos`` (the cache holds ``pos`` earlier tokens)."""
        q = F.linear(x, self.w_q, self.b_q).view(x.shape[0], 1, self.h, self.d).transpose(1, 2)
        k = F.linear(x, self.w_k, self.b_k).view(x.shape[0], 1, self.h, self.d).transpose(1, 2)
        v = F.linear(x, self.w_v, self.b_v).view(x.shape[0], 1, self.h, self.d).transpose(1, 2)
        self.k[:, :, pos : pos + 1] = k
        self.v[:, :, pos : pos + 1] = v
        out = F.scaled_dot_product_attention(q, self.k[:, :, : pos + 1], self.v[:, :, : pos + 1])
        return self.out_proj(out.transpose(1, 2).flatten(2))


def graphed_randattn_step(layer: RandMultiHeadAttention, x: torch.Tensor, state: DecodingState):
    """Capture one single-token :func:`step` (and the state update in place) in a CUDA graph.

    The recurrent state has a fixed size, so a decoding step is one static graph whatever the position;
    a KV cache grows by one entry per token and cannot be captured once. Returns the graph.
    """
    static = DecodingState(*(t.clone() for t in state[:3]), state.position)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step(layer, x, static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _, new = step(layer, x, static)
        for dst, src in zip(static[:3], new[:3]):
            dst.copy_(src)
    return graph


def environment(device: torch.device) -> dict:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()})"
    return {"device": name, "torch": torch.__version__, "python": platform.python_version()}


@torch.no_grad()
def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    positions = [p for p in args.positions if p <= args.max_position]
    rows = []
    for batch in args.batch_sizes:
        torch.manual_seed(0)
        layer = RandMultiHeadAttention(
            args.embed_dim,
            args.num_heads,
            batch_first=True,
            causal=True,
            num_random_features=args.num_features,
            seed=0,
            device=device,
            dtype=dtype,
        ).eval()
        x = torch.randn(batch, 1, args.embed_dim, device=device, dtype=dtype)
        state = init_state(layer, batch)
        cache = KVCacheLayer(layer, batch, max(positions) + args.steps + args.warmup + 1)
        done = 0
        for pos in positions:
            # advance the recurrent state to `pos` tokens in chunks (prefill), then time single tokens
            while done < pos:
                size = min(args.prefill_chunk, pos - done)
                chunk = torch.randn(batch, size, args.embed_dim, device=device, dtype=dtype)
                _, state = step(layer, chunk, state)
                done += size
            rand_s = _time_steps(partial(step, layer, x, state), args.steps, args.warmup, device)
            mha_s = _time_steps(partial(cache.step, x, pos), args.steps, args.warmup, device)
            graph_s = None
            if device.type == "cuda" and not args.no_cuda_graph:
                try:
                    graph = graphed_randattn_step(layer, x, state)
                    graph_s = _time_steps(graph.replay, args.steps, args.warmup, device)
                    del graph
                except Exception as err:  # report and keep measuring the eager paths
                    print(f"CUDA graph capture failed: {type(err).__name__}: {err}", flush=True)
            state_bytes = sum(t.numel() * t.element_size() for t in state[:3])
            cache_bytes = 2 * batch * layer.num_heads * pos * layer.head_dim * torch.finfo(dtype).bits // 8
            row = {
                "batch_size": batch,
                "position": pos,
                "randattn_ms": rand_s * 1e3,
                "mha_kv_cache_ms": mha_s * 1e3,
                "randattn_cuda_graph_ms": None if graph_s is None else graph_s * 1e3,
                "randattn_state_bytes": state_bytes,
                "kv_cache_bytes": cache_bytes,
            }
            rows.append(row)
            print(
                f"N={batch:>3} pos={pos:>6}  randattn {row['randattn_ms']:8.3f} ms   "
                f"mha+kv-cache {row['mha_kv_cache_ms']:8.3f} ms   "
                f"randattn graph {'-' if graph_s is None else f'{graph_s * 1e3:8.3f}'} ms   state {state_bytes / 2**20:8.2f} MiB   "
                f"kv cache {cache_bytes / 2**20:9.2f} MiB",
                flush=True,
            )
        cache.release()
    return {
        "environment": environment(device),
        "config": {
            "embed_dim": args.embed_dim,
            "num_heads": args.num_heads,
            "num_features": layer.num_random_features,
            "dtype": args.dtype,
            "steps": args.steps,
            "warmup": args.warmup,
        },
        "rows": rows,
    }


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--embed-dim", type=int, default=512)
    p.add_argument("--num-heads", type=int, default=8)
    p.add_argument("--num-features", type=int, default=256)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    p.add_argument("--positions", type=int, nargs="+", default=[128, 1024, 2048, 4096, 8192, 16384, 32768, 65536])
    p.add_argument("--max-position", type=int, default=65536)
    p.add_argument("--steps", type=int, default=100, help="timed single-token steps per point")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--prefill-chunk", type=int, default=1024)
    p.add_argument("--no-cuda-graph", action="store_true", help="skip the CUDA-graph randattn column")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    result = run(args)
    text = json.dumps(result, indent=1) + "\n"
    targets = [args.out] + ([Path(os.environ["OUT"]) / "decode.json"] if os.environ.get("OUT") else [])
    for path in targets:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
