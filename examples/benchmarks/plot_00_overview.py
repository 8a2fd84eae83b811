"""
Speedup, memory and crossover
=============================

Where does :class:`randattn.RandMultiHeadAttention` beat ``nn.MultiheadAttention``? Its cost grows
linearly with the sequence length ``L`` and that of exact attention quadratically (in time; in memory
the fused exact kernel is linear too), so beyond some length the random-feature layer wins. The
left panel shows the speedup of a training step (forward + backward time of
``nn.MultiheadAttention`` over that of ``RandMultiHeadAttention``), the right one the ratio of
backward peak memory, at 8 heads and 256 random features; above 1 the random-feature layer wins.
The table lists the crossover lengths for every number of features.
"""

from randattn.benchmark import crossover_table, plot_overview, record_or_load
from randattn.benchmark.site import RESULTS_FILE

NUM_HEADS, NUM_FEATURES = 8, 256

results = record_or_load(RESULTS_FILE)
print(f"results {results.describe()}")
plot_overview(results, NUM_HEADS, NUM_FEATURES)
print(crossover_table(results, NUM_HEADS))
