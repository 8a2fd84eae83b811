"""Training parity: a small character-level causal language model on the CPython standard library sources.

The same transformer is trained with exact attention (``nn.MultiheadAttention`` with a causal mask)
and with :class:`randattn.RandMultiHeadAttention` (``causal=True``), with the same architecture,
initial weights, steps, data order and seeds, so that the validation losses can be compared.

* :mod:`randattn.charlm.corpus`: the corpus, its deterministic train/validation split, the
  character vocabulary and the batch order.
* :mod:`randattn.charlm.model`: the transformer and its attention choices.
* :mod:`randattn.charlm.train`: the training loop and the parity study (results as JSON).
"""

from .corpus import CharCorpus, load_stdlib_corpus
from .model import ATTENTION_KINDS, AttentionSpec, CausalTransformer
from .train import TrainConfig, run_parity_study, train_model

__all__ = [
    "ATTENTION_KINDS",
    "AttentionSpec",
    "CausalTransformer",
    "CharCorpus",
    "TrainConfig",
    "load_stdlib_corpus",
    "run_parity_study",
    "train_model",
]
