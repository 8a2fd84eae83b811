"""Benchmark the attention kernels on a GPU, and check their accuracy against the 2x rule.

Benchmark (default): batch 4, embed 512, 8 heads, m = 256, L = 1024 ... 65536, non-causal and causal,
bf16 autocast and fp32. Rows: ``RandMultiHeadAttention`` with the Triton kernels and with the
reference backend, ``nn.MultiheadAttention`` (need_weights=False) and the in/out projections alone.
Forward and backward are timed separately (medians of CUDA-event timings, see
:mod:`randattn.benchmark.timing`); ``total`` is their sum. The attention core is ``total`` minus the
projections, compared with its floor: FLOPs of the linear-attention products at the matrix rate, or
the bytes of ``q, k, v, out`` (and gradients) at the copy bandwidth, whichever is larger.

``--accuracy``: worst ratio (kernel error / reference error, both against float64) over output and
gradients, per precision setting (:class:`randattn.ops._triton_utils.Precision`), dtype and mode.

``--graphs``: steps issued back to back, as a training loop runs, eager and recorded in CUDA
graphs (``torch.compile(mode="reduce-overhead")``), for randattn and ``nn.MultiheadAttention``.

``--interleaved``: for short sequences, whose speed is set by the host: randattn and
``nn.MultiheadAttention`` run in turns in one process (12 rounds of 10 forward+backward steps), and
their ratio is printed.

Usage::

    python scripts/bench_kernels.py --out results.json
    python scripts/bench_kernels.py --accuracy
    python scripts/bench_kernels.py --interleaved --lengths 1024 2048 4096 --dtypes bfloat16
    python scripts/bench_kernels.py --graphs --lengths 1024 2048 4096 8192 --dtypes bfloat16
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from randattn import RandMultiHeadAttention  # noqa: E402
from randattn.benchmark.timing import measure  # noqa: E402

BATCH, EMBED, HEADS, FEATURES = 4, 512, 8, 256
LENGTHS = (1024, 2048, 4096, 8192, 16384, 32768, 65536)
#: H100 ceilings used for the floor (measured: 2.93 TB/s copy, 750 TFLOP/s bf16 matmul; fp32 on the
#: CUDA cores, 67 TFLOP/s datasheet).
COPY_BYTES_PER_S = 2.9e12
MATMUL_FLOPS = {"bfloat16": 750e12, "float32": 67e12}


class Projections(nn.Module):
    """The in/out projections of one attention layer alone (what every attention layer pays)."""

    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        self.in_proj = nn.Linear(embed_dim, 3 * embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)

    def forward(self, query, key, value, need_weights=False):
        q, _, _ = self.in_proj(query).chunk(3, dim=-1)
        return self.out_proj(q), None


class CausalMHA(nn.Module):
    """``nn.MultiheadAttention`` with a causal mask (``is_causal=True``)."""

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        self.mha = mha

    def forward(self, query, key, value, need_weights=False):
        length = query.shape[1]
        mask = torch.ones(length, length, dtype=torch.bool, device=query.device).triu(1)
        return self.mha(query, key, value, need_weights=False, attn_mask=mask, is_causal=True)


class Stack(nn.Module):
    """``depth`` attention layers with residual connections (``x <- x + attn(x)``): what a model of
    many layers holds between its forward and backward passes."""

    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, query, key, value, need_weights=False):
        x = query
        for layer in self.layers:
            x = x + layer(x, x, x, need_weights=False)[0]
        return x, None


def floor_ms(length: int, dtype: str, passes: str) -> float:
    """Floor of the attention core: max(FLOPs / matrix rate, bytes / copy bandwidth), in ms."""
    dh = EMBED // HEADS
    unit = 2.0 * BATCH * HEADS * length * FEATURES * dh  # one (L x m x d) product
    flops = (4 if passes == "fwd" else 12) * unit
    elem = 2 if dtype == "bfloat16" else 4
    tensors = 4 if passes == "fwd" else 11
    nbytes = tensors * BATCH * length * EMBED * elem
    return 1e3 * max(flops / MATMUL_FLOPS[dtype], nbytes / COPY_BYTES_PER_S)


def build(impl: str, causal: bool, device, depth: int = 1) -> nn.Module:
    if depth > 1:
        return Stack([build(impl, causal, device) for _ in range(depth)])
    if impl == "proj":
        return Projections(EMBED).to(device)
    if impl == "mha":
        mha = nn.MultiheadAttention(EMBED, HEADS, batch_first=True).to(device)
        return CausalMHA(mha) if causal else mha
    # "rand_triton_w64": the same layer with local_window=64 (causal)
    name, _, window = impl.partition("_w")
    backend = {"rand": "auto", "rand_triton": "triton", "rand_reference": "reference"}[name]
    return RandMultiHeadAttention(EMBED, HEADS, batch_first=True, num_random_features=FEATURES, causal=causal,
                                  backend=backend, device=device, local_window=int(window) if window else None)


def skip_reason(impl: str, causal: bool, dtype: str, length: int) -> str | None:
    if impl == "mha" and dtype == "float32" and length > 16384:
        return "slow (see anchors)"
    if impl == "mha" and causal and length > 16384:
        return "slow (see anchors)"
    if impl.startswith("rand_reference_w") and length > 16384:
        return "slow (plain PyTorch)"
    return None


def bench(args) -> list[dict]:
    device = torch.device("cuda")
    rows = []
    for causal in args.modes:
        for dtype in args.dtypes:
            for length in args.lengths:
                proj_total = None
                proj_fwd = None
                for impl in args.impls:
                    reason = skip_reason(impl, causal, dtype, length)
                    row = dict(impl=impl, causal=causal, dtype=dtype, L=length, depth=args.depth)
                    if reason:
                        row["failure"] = reason
                        rows.append(row)
                        continue
                    torch.manual_seed(0)
                    model = build(impl, causal, device, args.depth)
                    x = torch.randn(BATCH, length, EMBED, device=device, requires_grad=True)
                    t0 = time.time()
                    rec = measure(model, x, dtype=dtype)
                    row.update(rec)
                    row["wall_s"] = time.time() - t0
                    if rec["fwd_ms"] is not None and rec["bwd_ms"] is not None:
                        row["total_ms"] = rec["fwd_ms"] + rec["bwd_ms"]
                    if impl == "proj" and "total_ms" in row:
                        proj_total, proj_fwd = row["total_ms"], row["fwd_ms"]
                    if impl != "proj" and proj_total is not None and "total_ms" in row:
                        row["core_fwd_ms"] = row["fwd_ms"] - proj_fwd
                        row["core_total_ms"] = row["total_ms"] - proj_total
                        row["floor_fwd_ms"] = args.depth * floor_ms(length, dtype, "fwd")
                        row["floor_total_ms"] = args.depth * floor_ms(length, dtype, "total")
                        row["total_over_proj"] = row["total_ms"] / proj_total
                    rows.append(row)
                    print(format_row(row), flush=True)
                    del model, x
                    torch.cuda.empty_cache()
    return rows


def _f(v, fmt="{:8.2f}"):
    return fmt.format(v) if isinstance(v, (int, float)) else f"{'-':>8s}"


def format_row(r: dict) -> str:
    mode = "causal" if r["causal"] else "noncaus"
    if r.get("failure"):
        return f"{mode:7s} {r['dtype'][:4]:4s} {r['L']:6d} {r['impl']:15s} {r['failure']}"
    return (f"{mode:7s} {r['dtype'][:4]:4s} {r['L']:6d} {r['impl']:15s} fwd {_f(r.get('fwd_ms'))} "
            f"bwd {_f(r.get('bwd_ms'))} tot {_f(r.get('total_ms'))} MiB {_f(r.get('fwd_mib'), '{:7.0f}')}/"
            f"{_f(r.get('bwd_mib'), '{:7.0f}')} core {_f(r.get('core_fwd_ms'))}/{_f(r.get('core_total_ms'))} "
            f"floor {_f(r.get('floor_fwd_ms'))}/{_f(r.get('floor_total_ms'))} x_proj {_f(r.get('total_over_proj'))}")


def accuracy(args) -> None:
    import _triton_checks as checks

    from randattn.ops._triton_utils import GPU_PRECISION, PRECISION

    gen = torch.Generator().manual_seed(0)
    for setting in args.settings.split(","):
        if setting.isdigit():
            PRECISION.set(setting)
            dtypes = (torch.bfloat16, torch.float16)
        else:
            PRECISION.fp32_dot = setting
            dtypes = (torch.float32,)
        worst = {}
        for causal in (False, True):
            for dtype in dtypes:
                for shape in ((2, 4, 1024, 1024, 64, 64, 256),):
                    n, h, length, s_len, d, dv, m = shape
                    for kernel_fn in ("softmax", "relu"):
                        inputs = checks.make_inputs(n, h, length, s_len, d, dv, m, dtype, gen, mask="bool")
                        exact = checks.run_fp64(*inputs, kernel_fn, causal)
                        ref = checks.run("reference", *inputs, kernel_fn, causal)
                        tri = checks.run("triton", *inputs, kernel_fn, causal)
                        for name, e, r, t in zip(("out", "dq", "dk", "dv"), exact, ref, tri):
                            ratio = checks.rel_err(t, e) / max(checks.rel_err(r, e), 1e-30)
                            key = ("causal" if causal else "noncausal", str(dtype)[6:], name)
                            worst[key] = max(worst.get(key, 0.0), ratio)
        line = " ".join(f"{k[0][:4]}/{k[1][:4]}/{k[2]}={v:.2f}" for k, v in sorted(worst.items()))
        print(f"ACCURACY {setting}: max={max(worst.values()):.2f} :: {line}", flush=True)
    PRECISION.set(GPU_PRECISION)
    PRECISION.fp32_dot = "tf32x3"


def op_inputs(length: int, dtype: torch.dtype):
    """Random ``q, k, v`` (leaves needing gradients) ``(BATCH, HEADS, length, EMBED / HEADS)``, a
    projection of ``FEATURES`` rows and an output gradient, on the GPU: the op-level timings' inputs."""
    from randattn.features import draw_projection

    dh = EMBED // HEADS
    q, k, v = (torch.randn(BATCH, HEADS, length, dh, device="cuda", dtype=dtype, requires_grad=True)
               for _ in range(3))
    return q, k, v, draw_projection(FEATURES, dh, device="cuda"), torch.randn_like(q)


def tune(args) -> None:
    """Time the attention op alone (fwd+bwd, bf16) for the current settings at the given lengths."""
    import triton.testing

    from randattn.functional import rand_attention

    for causal in args.modes:
        for length in args.lengths:
            q, k, v, w, dout = op_inputs(length, getattr(torch, args.dtypes[0]))

            def fwd(q=q, k=k, v=v, w=w, causal=causal):
                return rand_attention(q, k, v, w, kernel_fn=args.kernel, causal=causal, backend="triton",
                                      local_window=args.local_window)

            def fwd_bwd(fwd=fwd, dout=dout, inputs=(q, k, v)):
                # gradients returned, not accumulated into .grad: the op's own work only
                torch.autograd.grad(fwd(), inputs, dout)

            f = triton.testing.do_bench(fwd, warmup=25, rep=200, return_mode="median")
            fb = triton.testing.do_bench(fwd_bwd, warmup=25, rep=200, return_mode="median")
            print(f"TUNE {args.dtypes[0]} {args.kernel} causal={causal} L={length} fwd {f:.3f} ms fwd+bwd {fb:.3f} ms "
                  f"floor {floor_ms(length, args.dtypes[0], 'fwd'):.3f}/{floor_ms(length, args.dtypes[0], 'total'):.3f}",
                  flush=True)


KERNELS = {
    False: ("key_state", "query_out", "query_grad", "query_state_grad", "key_grad"),
    True: ("chunk_max", "chunk_out", "state", "rstate", "chunk_grad"),
}
CANDIDATES = ((4, 1), (4, 2), (4, 3), (8, 1), (8, 2), (8, 3))


def sweep_launch(args) -> None:
    """Launch settings, one kernel at a time (the others fixed): op fwd+bwd time (bf16, first length)
    for each ``(num_warps, num_stages)``, and the result's largest relative difference from the
    current setting's (a setting that computes something else is marked, never chosen)."""
    for causal in args.modes:
        _sweep_mode(causal, args.lengths[0])


def _sweep_mode(causal: bool, length: int) -> None:
    import triton.testing

    from randattn.functional import rand_attention
    from randattn.ops._triton_utils import LAUNCH

    q, k, v, w, dout = op_inputs(length, torch.bfloat16)

    def results():
        for t in (q, k, v):
            t.grad = None
        out = rand_attention(q, k, v, w, causal=causal, backend="triton")
        out.backward(dout)
        return [out.detach().float()] + [t.grad.float() for t in (q, k, v)]

    def fwd_bwd():
        rand_attention(q, k, v, w, causal=causal, backend="triton").backward(dout)

    baseline = results()
    for name in KERNELS[causal]:
        current = LAUNCH.get(name, LAUNCH["*"])
        best = (float("inf"), current)
        for setting in CANDIDATES:
            LAUNCH[name] = setting
            try:
                diff = max(((a - b).norm() / b.norm()).item() for a, b in zip(results(), baseline))
                ms = triton.testing.do_bench(fwd_bwd, warmup=10, rep=100, return_mode="median")
            except Exception as exc:  # out of resources: too much shared memory for this setting
                print(f"SWEEP causal={causal} L={length} {name} {setting}: failed ({type(exc).__name__})",
                      flush=True)
                continue
            ok = diff < 1e-2  # bf16 roundings that flip differ by far less; wrong results by O(1)
            print(f"SWEEP causal={causal} L={length} {name} {setting}: fwd+bwd {ms:.3f} ms, "
                  f"max rel diff {diff:.1e}{'' if ok else '  WRONG'}{'  (current)' if setting == current else ''}",
                  flush=True)
            if ok and ms < best[0]:
                best = (ms, setting)
        LAUNCH[name] = best[1]
        print(f"SWEEP causal={causal} {name}: keep {best[1]} ({best[0]:.3f} ms)", flush=True)


def diagnose(args) -> None:
    """Forward/backward error of the causal kernels at one shape (bf16) under the current settings."""
    import _triton_checks as checks

    gen = torch.Generator().manual_seed(0)
    for kernel_fn in ("softmax", "relu"):
        inputs = checks.make_inputs(2, 2, 2048, 2048, 32, 32, 64, torch.bfloat16, gen, mask="bool")
        exact = checks.run_fp64(*inputs, kernel_fn, True)
        tri = checks.run("triton", *inputs, kernel_fn, True)
        errs = " ".join(f"{n}={checks.rel_err(t, e):.2e}" for n, t, e in zip(("out", "dq", "dk", "dv"), tri, exact))
        print(f"DIAG {kernel_fn} {errs}", flush=True)


def profile(args) -> None:
    """Per-kernel CUDA time of one forward+backward of the op (bf16) at each length."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from randattn.functional import rand_attention

    for causal in args.modes:
        for length in args.lengths:
            q, k, v, w, dout = op_inputs(length, getattr(torch, args.dtypes[0]))
            for _ in range(3):
                with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
                    out = rand_attention(q, k, v, w, kernel_fn=args.kernel, causal=causal, backend="triton",
                                         local_window=args.local_window)
                    torch.autograd.grad(out, (q, k, v), dout)
                    torch.cuda.synchronize()
            print(f"PROFILE causal={causal} L={length}")
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=40))


def interleaved_host(args) -> None:
    """Short sequences: randattn (kernels) and ``nn.MultiheadAttention`` measured in turns in one
    process (:func:`randattn.benchmark.timing.interleaved`), so that the host's drift cancels in
    their ratio."""
    from randattn.benchmark.timing import interleaved

    for causal, length in itertools.product(args.modes, args.lengths):
        x = torch.randn(BATCH, length, EMBED, device="cuda", requires_grad=True)
        models = {impl: build(impl, causal, "cuda") for impl in ("rand_triton", "mha")}
        r = interleaved(models, x, dtype=args.dtypes[0])
        cells = " | ".join(
            f"{name}: fwd issue {m['fwd_issue_us']:.0f} us, bwd issue {m['bwd_issue_us']:.0f} us, "
            f"fwd+bwd {m['total_us']:.0f} us"
            for name, m in r.items()
        )
        ratio = r["rand_triton"]["total_us"] / r["mha"]["total_us"]
        print(f"INTERLEAVED causal={causal} L={length} {cells} | randattn / MHA {ratio:.2f}", flush=True)


def graph_steps(args) -> None:
    """Training-loop throughput (steps issued back to back, :func:`randattn.benchmark.timing.back_to_back`)
    of randattn (kernels) and ``nn.MultiheadAttention``, eager and recorded in CUDA graphs
    (``torch.compile(mode="reduce-overhead")``): without the host's share, the GPU times compare."""
    from randattn.benchmark.timing import back_to_back

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    for causal, length in itertools.product(args.modes, args.lengths):
        x = torch.randn(BATCH, length, EMBED, device="cuda", requires_grad=True)
        ms = {}
        for impl in ("rand_triton", "mha"):
            model = build(impl, causal, "cuda")
            ms[impl] = back_to_back(model, x, dtype=args.dtypes[0])
            try:
                compiled = torch.compile(model, mode="reduce-overhead", fullgraph=impl != "mha")
                ms[impl + "_graphs"] = back_to_back(compiled, x, dtype=args.dtypes[0], graphs=True)
            except Exception as exc:  # recorded, the other rows go on
                print(f"GRAPHS {impl} causal={causal} L={length} failed: {type(exc).__name__}: {exc}", flush=True)
                ms[impl + "_graphs"] = float("nan")
        print(
            f"GRAPHS causal={causal} L={length} ms/step: randattn eager {ms['rand_triton']:.3f}, "
            f"graphs {ms['rand_triton_graphs']:.3f} | MHA eager {ms['mha']:.3f}, graphs {ms['mha_graphs']:.3f} | "
            f"randattn / MHA eager {ms['rand_triton'] / ms['mha']:.2f}, "
            f"graphs {ms['rand_triton_graphs'] / ms['mha_graphs']:.2f}",
            flush=True,
        )


def host(args) -> None:
    """Where the time of a short sequence goes: module forward+backward (bf16 autocast) profiled on the
    host and the GPU, and the wall time per call against the summed GPU time of its kernels."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for causal, length in itertools.product(args.modes, args.lengths):
        for impl in ("rand_triton", "mha"):
            model = build(impl, causal, "cuda")
            x = torch.randn(BATCH, length, EMBED, device="cuda", requires_grad=True)

            def step(model=model, x=x):
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    out = model(x, x, x, need_weights=False)[0]
                out.float().sum().backward()

            for _ in range(5):
                step()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(20):
                step()
            torch.cuda.synchronize()
            wall = (time.perf_counter() - t0) / 20 * 1e3
            with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                step()
                torch.cuda.synchronize()
            events = prof.key_averages()
            gpu_ms = sum(e.self_device_time_total for e in events) / 1e3
            print(f"HOST causal={causal} L={length} {impl}: wall {wall:.3f} ms per fwd+bwd, GPU kernels {gpu_ms:.3f} ms")
            for key in ("self_cpu_time_total", "self_device_time_total"):
                print(events.table(sort_by=key, row_limit=16, max_name_column_width=55))


def _live_at_peak(snapshot: dict) -> tuple[int, list[dict]]:
    """Replay the allocator trace of a memory snapshot: the peak of allocated bytes and the blocks
    alive at that moment (each with its size and allocation frames)."""
    live: dict[int, dict] = {}
    total = peak = 0
    at_peak: list[dict] = []
    for trace in snapshot["device_traces"]:
        for event in trace:
            if event["action"] == "alloc":
                live[event["addr"]] = event
                total += event["size"]
                if total > peak:
                    peak, at_peak = total, list(live.values())
            elif event["action"] == "free_completed" and event["addr"] in live:
                total -= live.pop(event["addr"])["size"]
    return peak, at_peak


def memory(args) -> None:
    """Which tensors are alive at the backward's peak (module fwd+bwd, bf16 autocast, first length and mode)."""
    length, causal = args.lengths[0], args.modes[0]
    for impl in ("rand_triton", "mha"):
        torch.manual_seed(0)
        model = build(impl, causal, "cuda")
        x = torch.randn(BATCH, length, EMBED, device="cuda", requires_grad=True)

        def step(model=model, x=x):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = model(x, x, x, need_weights=False)[0]
            out.backward(torch.ones_like(out))
            model.zero_grad(set_to_none=True)
            x.grad = None

        step()
        torch.cuda.synchronize()
        torch.cuda.memory._record_memory_history(max_entries=100000, context="all", stacks="all")
        step()
        torch.cuda.synchronize()
        snapshot = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
        peak, blocks = _live_at_peak(snapshot)
        mode = "causal" if causal else "non-causal"
        print(f"MEMORY {impl} {mode} L={length}: {peak / 2**20:.1f} MiB allocated during the step at its peak "
              f"({len(blocks)} blocks)")
        for block in sorted(blocks, key=lambda b: -b["size"])[:20]:
            frames = [f"{Path(f['filename']).name}:{f['line']}:{f['name']}" for f in block.get("frames", [])
                      if "/torch/" not in f["filename"] and f["filename"].endswith(".py")][:3]
            if not frames:  # allocated by the autograd engine: name the C++ functions instead
                frames = [f["name"][:60] for f in block.get("frames", [])
                          if "Backward" in f["name"] or "at::native" in f["name"]][:3]
            print(f"  {block['size'] / 2**20:8.2f} MiB  {' <- '.join(frames) or '?'}")
        del model, x
        torch.cuda.empty_cache()


def launch(args) -> None:
    """Host time per call (no synchronisation inside the loop; the GPU work at these sizes is shorter
    than the host's, so this is the time the host needs to issue the work): module forward and
    forward+backward (bf16 autocast) for randattn and ``nn.MultiheadAttention``, the op's forward and
    backward functions, and single kernel launches."""
    from randattn.ops import eager
    from randattn.ops.noncausal import triton as nc

    def per_call_us(fn, n=200) -> float:
        for _ in range(10):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        host = (time.perf_counter() - t0) / n * 1e6
        torch.cuda.synchronize()
        return host

    length = args.lengths[0]
    x = torch.randn(BATCH, length, EMBED, device="cuda", requires_grad=True)
    for impl in ("rand_triton", "mha", "proj"):
        model = build(impl, False, "cuda")

        def fwd(model=model):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return model(x, x, x, need_weights=False)[0]

        def fwd_bwd(model=model):
            fwd(model).sum().backward()

        with torch.no_grad():
            print(f"LAUNCH {impl} L={length}: forward (no grad) {per_call_us(fwd):.0f} us")
        print(f"LAUNCH {impl} L={length}: forward+backward {per_call_us(fwd_bwd):.0f} us")
    model = build("rand_triton", False, "cuda")
    qkv = torch.randn(BATCH, length, 3 * EMBED, device="cuda", dtype=torch.bfloat16)
    q, k, v = eager.split_packed(qkv, HEADS)
    w = model.projection.float()
    out, saved = nc.forward_saving(q, k, v, w, "softmax", None)
    dout = torch.randn_like(out)
    print(f"LAUNCH op forward (3 kernels) {per_call_us(lambda: nc.forward_saving(q, k, v, w, 'softmax', None)):.0f} us")
    print(f"LAUNCH op backward (3 kernels) "
          f"{per_call_us(lambda: nc.backward_from(dout, q, k, v, w, 'softmax', None, saved)):.0f} us")
    state = saved[2]  # (output kept or empty, its int8 rest, state, ...)
    z = torch.empty(1, device="cuda")
    print(f"LAUNCH torch.empty {per_call_us(lambda: torch.empty(4, 8, device='cuda')):.1f} us, "
          f"tensor.sum {per_call_us(lambda: state.sum(1)):.1f} us, add_ {per_call_us(lambda: z.add_(1)):.1f} us")
    import cProfile
    import pstats

    def module_step(model=model):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            model(x, x, x, need_weights=False)[0].sum().backward()

    per_call_us(module_step)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(100):
        module_step()
    prof.disable()
    torch.cuda.synchronize()
    print("LAUNCH Python profile of 100 module forward+backward steps (host):")
    pstats.Stats(prof).sort_stats("tottime").print_stats(25)


def main() -> int:
    global EMBED
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    p.add_argument("--modes", nargs="+", default=["noncausal", "causal"])
    p.add_argument("--impls", nargs="+", default=["proj", "rand_triton", "rand_reference", "mha"])
    p.add_argument("--embed", type=int, default=EMBED, help="embedding dim (head dim = embed / 8)")
    p.add_argument("--depth", type=int, default=1, help="layers per model (residual stack; memory held across layers)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--accuracy", action="store_true")
    p.add_argument("--settings", default="21232,21231,tf32x3",
                   help="precision settings to compare: five digits (see Precision.parse) or a float32 dot mode")
    p.add_argument("--tune", action="store_true", help="time the op alone (bf16) with the current settings")
    p.add_argument("--kernel", default="softmax", choices=["softmax", "relu"], help="feature map of --tune, --profile")
    p.add_argument("--local-window", type=int, default=None, help="local_window of --tune, --profile (causal)")
    p.add_argument("--profile", action="store_true", help="per-kernel times of the op (bf16)")
    p.add_argument("--diagnose", action="store_true", help="causal errors at one shape (bf16)")
    p.add_argument("--host", action="store_true", help="host vs GPU time of the module at each length")
    p.add_argument("--graphs", action="store_true",
                   help="training-loop ms/step, eager and in CUDA graphs (torch.compile reduce-overhead)")
    p.add_argument("--interleaved", action="store_true",
                   help="randattn vs nn.MultiheadAttention in turns (short sequences: host-bound)")
    p.add_argument("--memory", action="store_true", help="tensors alive at the backward's peak, first length")
    p.add_argument("--launch", action="store_true", help="host time per call at the first length")
    p.add_argument("--sweep-launch", action="store_true", help="launch settings per kernel, first length")
    args = p.parse_args()
    args.modes = [m == "causal" for m in args.modes]
    EMBED = args.embed
    if args.accuracy:
        accuracy(args)
        return 0
    if args.tune:
        tune(args)
        return 0
    if args.profile:
        profile(args)
        return 0
    if args.diagnose:
        diagnose(args)
        return 0
    if args.host:
        host(args)
        return 0
    if args.graphs:
        graph_steps(args)
        return 0
    if args.interleaved:
        interleaved_host(args)
        return 0
    if args.memory:
        memory(args)
        return 0
    if args.launch:
        launch(args)
        return 0
    if args.sweep_launch:
        sweep_launch(args)
        return 0
    rows = bench(args)
    print("\nFINAL TABLE")
    for r in rows:
        print(format_row(r))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
