"""
Context parallelism: bytes on the wire
======================================

A sequence too long for one GPU is split into consecutive blocks, one per rank. Ring attention, the
usual way to shard exact attention, passes every block of keys and values around the ring: each rank
sends a share of all keys and values, linear in the sequence length ``L``. Random-feature attention
needs from the other ranks only their ``(m, d)`` states per head
(:func:`randattn.distributed.context_parallel_attention`): an all-reduce for non-causal attention,
an all-gather of states folded into an exclusive prefix for causal attention. Neither depends on ``L``.

The numbers below are computed by :func:`randattn.distributed.communication_table` for the layer and
group printed first (see :doc:`/user_guide/scaling_out`). When
``scripts/bench_context_parallel.py`` has recorded weak-scaling runs on several GPUs, the last
section shows them.
"""

from pathlib import Path

import matplotlib.pyplot as plt

import randattn
from randattn.distributed import communication_table, format_bytes, load_weak_scaling, weak_scaling_rows
from randattn.distributed.communication import TABLE_CONFIG

print("layer and group:", TABLE_CONFIG)

lengths = [2**k for k in range(14, 23)]  # 16K .. 4M tokens
rows = communication_table(lengths)
for row in rows:
    print(
        f"L = {row['seq_len']:>8}: ring attention {format_bytes(row['ring']):>10}, "
        f"randattn non-causal {format_bytes(row['noncausal']):>10}, causal {format_bytes(row['causal']):>10}"
    )

fig, ax = plt.subplots(figsize=(7, 4.5))
ax.plot(lengths, [r["ring"] for r in rows], "s--", label="ring attention (bf16 K/V)")
ax.plot(lengths, [r["causal"] for r in rows], "o-", label="randattn causal (all-gather of states)")
ax.plot(lengths, [r["noncausal"] for r in rows], "^-", label="randattn non-causal (all-reduce of states)")
ax.set_xscale("log", base=2)
ax.set_yscale("log", base=2)
ax.set_xlabel("total sequence length L")
ax.set_ylabel("bytes sent per rank, one layer, forward")
ax.set_title(f"Communication per layer on {TABLE_CONFIG['world_size']} ranks")
ax.legend()
fig.tight_layout()

# %%
# Weak scaling on several GPUs
# ----------------------------
# Positions per GPU fixed (65 536, bf16), total length growing with the GPUs; efficiency is the
# one-GPU time over the ``P``-GPU time of one forward and backward.

folder = Path(randattn.__file__).resolve().parents[1] / "docs" / "_data" / "decoding"
scaling = weak_scaling_rows(load_weak_scaling(folder))
if not scaling:
    print("No multi-GPU run recorded yet (scripts/bench_context_parallel.py under torchrun).")
for row in scaling:
    eff = "-" if row["efficiency"] is None else f"{row['efficiency']:.0%}"
    peak = "-" if row["peak_memory_gib"] is None else f"{row['peak_memory_gib']:.2f} GiB"
    print(
        f"P = {row['world_size']}, L = {row['total_len']:>8}, causal = {row['causal']!s:5}: "
        f"fwd+bwd {row['fwd_bwd_ms']:8.2f} ms, collectives {row['comm_ms']:6.3f} ms, peak {peak}, efficiency {eff}"
    )
