"""
Generating text one token at a time
===================================

A causal :class:`randattn.RandMultiHeadAttention` carries, per head, an ``m x d`` sum of key features
times values, an ``m``-vector of key sums and a running stabiliser
(:class:`randattn.decoding.DecodingState`). Each new token reads and updates that state, so
generating the ``n``-th token costs the same whatever ``n`` is, and needs no cache of past keys and
values.

This example trains a tiny character-level language model (:mod:`randattn.charlm`) on the sources
of the CPython standard library for a few seconds on the CPU, checks that the recurrent logits
equal those of the parallel forward, and samples text with :func:`randattn.decoding.generate`.
It then plots the per-token time recorded on a GPU by ``scripts/bench_decode.py``, against exact
attention re-reading a growing KV cache.
"""

import json
from pathlib import Path

import matplotlib.pyplot as plt
import torch

import randattn
from randattn.charlm import AttentionSpec, TrainConfig, load_stdlib_corpus, train_model
from randattn.decoding import generate, init_model_states, model_step

# %%
# Train a tiny causal model
# -------------------------
# Two blocks of width 64 with softmax-kernel random-feature attention (``m = 32``), 300 steps of
# 16 windows of 128 characters (the learned position embedding also limits generation to 128). The loss only has to fall far enough for the samples to look like
# Python.

corpus = load_stdlib_corpus(max_train_chars=1_000_000, max_val_chars=50_000)
config = TrainConfig(
    d_model=64,
    n_layers=2,
    n_heads=4,
    context=128,
    batch_size=16,
    steps=300,
    lr=5e-3,
    warmup=20,
    eval_every=100,
    eval_batches=2,
    final_eval_batches=4,
)
record = train_model(config, AttentionSpec("softmax", 32), corpus, progress=print)
model = record["model"].eval()
print(f"{record['parameters']} parameters, trained in {record['seconds']:.1f} s")

# %%
# The recurrence equals the parallel forward
# ------------------------------------------
# Feed a validation window through :func:`randattn.decoding.model_step` in uneven pieces and compare
# the logits with one call of the model on the whole window.

window = corpus.val[:128].unsqueeze(0)
with torch.no_grad():
    parallel = model(window)
    states = init_model_states(model, batch_size=1)
    pieces = []
    for start, stop in ((0, 1), (1, 50), (50, 51), (51, 128)):
        logits, states = model_step(model, window[:, start:stop], states)
        pieces.append(logits)
recurrent = torch.cat(pieces, dim=1)
rel = ((recurrent - parallel).norm() / parallel.norm()).item()
print(f"relative difference, recurrent vs parallel logits: {rel:.1e}")
assert rel < 1e-5

# %%
# Sample text
# -----------
# The prompt is consumed as one chunk; each further character is one recurrent step. A model this
# small and this briefly trained writes Python-flavoured noise: indentation, ``self.``, parentheses.

prompt = corpus.encode("import os\n\ndef ").unsqueeze(0)
ids = generate(model, prompt, 100, temperature=0.8, generator=torch.Generator().manual_seed(0))
print(corpus.decode(torch.cat([prompt[0], ids[0]])))

# %%
# Per-token time on a GPU
# -----------------------
# Recorded by ``scripts/bench_decode.py``: one attention layer (embed 512, 8 heads, ``m = 256``,
# bf16), one decoding step at each position, for batch sizes 1 and 32. Random-feature decoding
# stays flat; exact attention reads the whole KV cache at every step.

record_path = Path(randattn.__file__).resolve().parents[1] / "docs" / "_data" / "decoding" / "decode.json"
if record_path.is_file():
    bench = json.loads(record_path.read_text())
    env, rows = bench["environment"], bench["rows"]
    print(f"Recorded on {env['device']} (torch {env['torch']}).")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, batch in enumerate(sorted({r["batch_size"] for r in rows})):
        sel = [r for r in rows if r["batch_size"] == batch]
        pos = [r["position"] for r in sel]
        ax.plot(pos, [r["randattn_ms"] for r in sel], "o-", color=f"C{i}", label=f"randattn step, N={batch}")
        if all(r.get("randattn_cuda_graph_ms") is not None for r in sel):
            ax.plot(
                pos,
                [r["randattn_cuda_graph_ms"] for r in sel],
                "^-",
                color=f"C{i}",
                alpha=0.6,
                label=f"randattn step as a CUDA graph, N={batch}",
            )
        ax.plot(pos, [r["mha_kv_cache_ms"] for r in sel], "s--", color=f"C{i}", label=f"exact + KV cache, N={batch}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("position of the generated token")
    ax.set_ylabel("time per token and layer (ms)")
    ax.set_title(f"Decoding one token, one layer ({env['device']})")
    ax.legend(fontsize=8)
    fig.tight_layout()
else:
    print(f"No recorded GPU timings at {record_path}; run scripts/bench_decode.py on a GPU.")
