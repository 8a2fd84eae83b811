"""
Approximation quality
=====================

Random-feature attention replaces ``softmax(q k^T / sqrt(d))`` with a product of random feature
maps. How far is it from exact attention, and how many features ``m`` does it take?

Two errors are measured against exact softmax attention on the same inputs, each averaged over
independent projection draws (the shaded band is one standard deviation over draws):

* **attention-row total variation** ``1/2 sum_j |A_ij - Â_ij|``, averaged over rows: the fraction
  of attention mass put on the wrong keys, in ``[0, 1]``. It does not depend on the values.
* **relative output error** ``||out - out_exact||_F / ||out_exact||_F``. With many keys and
  near-uniform attention the exact output is an average of many values and is small, so this ratio
  can exceed 1 even when the rows are close; read it with the row error beside it.

Inputs are Gaussian queries and keys with head dimension 64 whose logits ``q.k/sqrt(d)`` have a
chosen standard deviation (:func:`randattn.fidelity.synthetic_qkv`). Everything runs on the CPU in
a minute or two; the functions used are :func:`randattn.fidelity.error_sweep`,
:func:`randattn.fidelity.feature_bias` and :func:`randattn.fidelity.kernel_estimate_error`.
"""

import math

import matplotlib.pyplot as plt
import torch

from randattn.fidelity import error_sweep, feature_bias, kernel_estimate_error, smallest_num_features

SEEDS = 4
M_GRID = [16, 32, 64, 128, 256, 512, 1024]
STYLE = {
    ("softmax", "orthogonal"): dict(color="C0", label="softmax, orthogonal (Haar)"),
    ("softmax", "iid"): dict(color="C1", label="softmax, iid"),
    ("softmax", "qr"): dict(color="C2", ls="--", label="softmax, plain QR"),
    ("relu", "orthogonal"): dict(color="C3", label="relu, orthogonal"),
}


def plot_rows(ax, rows, x_key, metric, style):
    xs = [r[x_key] for r in rows]
    mean = [r[f"{metric}_mean"] for r in rows]
    std = [r[f"{metric}_std"] for r in rows]
    ax.plot(xs, mean, marker="o", ms=3, **style)
    ax.fill_between(
        xs, [a - b for a, b in zip(mean, std)], [a + b for a, b in zip(mean, std)], alpha=0.2, color=style["color"]
    )


# %%
# Error against the number of features
# ------------------------------------
# Sequence length 256, 4 heads, logits with standard deviation 0.25 (fairly flat attention).
# Orthogonal (Haar) draws beat iid draws at every ``m``; plain-QR draws look like Haar draws
# here (their bias hides under the variance, see the last section). The ReLU kernel is a
# different kernel, not an estimate of the softmax one: its error against softmax attention
# levels off (near 0.05 here) instead of falling like ``1/sqrt(m)``. In this flat regime both
# kernels give nearly uniform rows, so that level is still below the softmax estimate's error.

by_m = error_sweep(
    num_features=M_GRID,
    logit_stds=[0.25],
    kernels=["softmax"],
    draws=["orthogonal", "iid", "qr"],
    seeds=SEEDS,
) + error_sweep(num_features=M_GRID, logit_stds=[0.25], kernels=["relu"], draws=["orthogonal"], seeds=SEEDS)

fig, axes = plt.subplots(1, 2, figsize=(10, 4))
for key, style in STYLE.items():
    rows = [r for r in by_m if (r["kernel_fn"], r["draw"]) == key]
    plot_rows(axes[0], rows, "num_features", "rows_tv", style)
    plot_rows(axes[1], rows, "num_features", "output", style)
for ax, title in zip(axes, ["attention-row total variation", "relative output error"]):
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("random features m")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
axes[0].legend(fontsize=8)
fig.tight_layout()

for key in [("softmax", "orthogonal"), ("softmax", "iid")]:
    rows = [r for r in by_m if (r["kernel_fn"], r["draw"]) == key]
    print(key, {r["num_features"]: round(r["rows_tv_mean"], 4) for r in rows})

# %%
# Error against the sharpness of exact attention
# ----------------------------------------------
# The softmax feature map estimates ``exp(x.y)`` with a variance that grows like
# ``exp(|x + y|^2)``: the larger the logits (the sharper the exact attention), the worse the
# estimate. This is the main limitation of the method; ``m = 256`` features, length 256.
# The ReLU kernel is biased but has a small variance: for flat attention its rows are further
# from softmax attention than the softmax estimate's, but from a logit standard deviation of
# about 0.25 on they are closer. Neither follows sharp attention.

by_scale = error_sweep(
    num_features=[256],
    logit_stds=[0.0625, 0.125, 0.25, 0.5, 1.0, 2.0],
    kernels=["softmax"],
    draws=["orthogonal"],
    seeds=SEEDS,
) + error_sweep(
    num_features=[256],
    logit_stds=[0.0625, 0.125, 0.25, 0.5, 1.0, 2.0],
    kernels=["relu"],
    draws=["orthogonal"],
    seeds=SEEDS,
)
fig, ax = plt.subplots(figsize=(6, 4))
for key, style in STYLE.items():
    rows = [r for r in by_scale if (r["kernel_fn"], r["draw"]) == key]
    if rows:
        plot_rows(ax, rows, "logit_std", "rows_tv", style)
ax.set_xscale("log", base=2)
ax.set_xlabel("standard deviation of q.k / sqrt(d)")
ax.set_ylabel("attention-row total variation")
ax.set_title("m = 256, length 256")
ax.grid(True, which="both", alpha=0.3)
ax.legend(fontsize=8)
fig.tight_layout()
print(
    "exact row entropy:",
    {r["logit_std"]: round(r["exact_entropy"], 2) for r in by_scale if r["kernel_fn"] == "softmax"},
)
for kernel in ("softmax", "relu"):
    print(
        kernel, "row TV:", {r["logit_std"]: round(r["rows_tv_mean"], 3) for r in by_scale if r["kernel_fn"] == kernel}
    )

# %%
# Error against the sequence length
# ---------------------------------
# At a fixed logit scale the row error hardly depends on the length: each key's weight carries
# the same relative estimation noise, and the total variation averages it over the row (with
# logits of standard deviation 0.25 it stays near 0.17 at ``m = 64`` and 0.11 at ``m = 256`` from
# 64 to 1024 keys). The cost of random-feature attention grows linearly with the length, its
# error does not grow.

by_length = error_sweep(
    num_features=[64, 256],
    lengths=[64, 128, 256, 512, 1024],
    logit_stds=[0.25],
    kernels=["softmax"],
    draws=["orthogonal"],
    seeds=SEEDS,
)
fig, ax = plt.subplots(figsize=(6, 4))
for m, color in [(64, "C0"), (256, "C4")]:
    rows = [r for r in by_length if r["num_features"] == m]
    plot_rows(ax, rows, "length", "rows_tv", dict(color=color, label=f"softmax, orthogonal, m = {m}"))
ax.set_xscale("log", base=2)
ax.set_xlabel("sequence length")
ax.set_ylabel("attention-row total variation")
ax.grid(True, which="both", alpha=0.3)
ax.legend(fontsize=8)
fig.tight_layout()

# %%
# Exact (Haar) against plain-QR orthogonal draws
# ----------------------------------------------
# Taking ``Q`` from ``torch.linalg.qr`` of a Gaussian matrix without fixing the signs of
# ``diag(R)`` does not give a Haar-distributed matrix: LAPACK's Householder convention makes
# ``R_rr`` carry the sign opposite to the pivot, so row ``r`` of each block tends to have a
# negative ``r``-th coordinate (always, for the first row). Each feature then has
# ``E[exp(w.x - |x|^2/2)] != 1``: the estimator is biased. The left plot estimates that expectation
# for every row of a ``16 x 16`` block, for an input ``x`` along the coordinate diagonal with
# ``|x| = 1`` (where the bias is largest), over 2000 draws.
#
# Averaging more features removes variance but not bias: the right plot shows the relative RMSE of
# the ``m``-feature estimate of ``exp(x.y)`` (``x = y``, ``|x| = 0.5`` along the diagonal). Haar
# and iid draws keep falling like ``1/sqrt(m)``; plain-QR draws stop at their bias. For inputs in
# random directions the bias is about ``1/sqrt(d)`` of this, hidden under the variance in the
# sweeps above until ``m`` is very large, but it never averages away.

d = 16
x_diag = torch.full((d,), 1.0 / math.sqrt(d))
fig, axes = plt.subplots(1, 2, figsize=(10, 4))
for draw, color in [("orthogonal", "C0"), ("qr", "C2")]:
    est = feature_bias(x_diag, num_features=d, draw=draw, num_draws=2000, generator=torch.Generator().manual_seed(0))
    axes[0].errorbar(
        range(d),
        est.per_feature,
        yerr=2 * est.per_feature_stderr,
        fmt="o",
        ms=3,
        color=color,
        label=f"{draw}: mean over rows {est.mean:.3f}",
    )
axes[0].axhline(1.0, color="k", lw=0.8)
axes[0].set_xlabel("row index within a block")
axes[0].set_ylabel("E[exp(w.x - |x|^2/2)]  (unbiased = 1)")
axes[0].legend(fontsize=8)

m_bias = [16, 64, 256, 1024, 2048]
x_half = 0.5 * x_diag
for draw, color in [("orthogonal", "C0"), ("iid", "C1"), ("qr", "C2")]:
    rmse = [
        kernel_estimate_error(
            x_half, x_half, num_features=m, draw=draw, num_draws=100, generator=torch.Generator().manual_seed(1)
        )["rel_rmse"]
        for m in m_bias
    ]
    axes[1].plot(m_bias, rmse, marker="o", ms=3, color=color, label=draw)
axes[1].set_xscale("log", base=2)
axes[1].set_yscale("log")
axes[1].set_xlabel("random features m")
axes[1].set_ylabel("relative RMSE of the kernel estimate")
axes[1].grid(True, which="both", alpha=0.3)
axes[1].legend(fontsize=8)
fig.tight_layout()

# %%
# How many features for a given error
# -----------------------------------
# The smallest ``m`` of the grid reaching a target row error, for Haar orthogonal draws at each
# logit scale measured above (``None``: not reached with ``m <= 1024``). Real attention layers
# are usually easier than these isotropic inputs; see the trained-model measurements in
# :doc:`plot_training_parity` and the advice in
# :doc:`/user_guide/choosing_m`.

extra = error_sweep(
    num_features=M_GRID, logit_stds=[0.125, 0.5], kernels=["softmax"], draws=["orthogonal"], seeds=SEEDS
)
table = {}
for scale in [0.125, 0.25, 0.5]:
    rows = [
        r for r in by_m + extra if r["kernel_fn"] == "softmax" and r["draw"] == "orthogonal" and r["logit_std"] == scale
    ]
    table[scale] = {target: smallest_num_features(rows, target) for target in (0.2, 0.1, 0.05)}
for scale, needed in table.items():
    print(f"logit std {scale}: " + ", ".join(f"TV <= {t}: m = {m}" for t, m in needed.items()))
