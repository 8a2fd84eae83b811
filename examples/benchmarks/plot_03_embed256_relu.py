"""
Embedding dimension 256, ReLU kernel
====================================

Forward and backward time and peak GPU memory of :class:`randattn.RandMultiHeadAttention` with the
ReLU kernel against ``nn.MultiheadAttention`` at embedding dimension 256: one figure per metric,
panels for 4, 8 and 16 heads (rows) and 64, 128 and 256 random features (columns). These are the
figures of this configuration on :doc:`/benchmarks/attention`.
"""

from randattn.benchmark import figures, record_or_load, write_figures
from randattn.benchmark.site import FIGURE_DIR, RESULTS_FILE

EMBED_DIM, KERNEL = 256, "relu"

results = record_or_load(RESULTS_FILE)
print(f"results {results.describe()}")
write_figures(results, FIGURE_DIR, embed_dims=[EMBED_DIM], kernels=[KERNEL], keep_open=True)
for spec in figures([EMBED_DIM], [KERNEL]):
    print(f"figure {spec.number}: {spec.caption}")
