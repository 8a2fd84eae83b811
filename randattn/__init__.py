"""randattn: random-feature multi-head attention for PyTorch.

Public names: :class:`RandMultiHeadAttention`, :func:`convert_mha`, and the modules
:mod:`randattn.functional` and :mod:`randattn.features`.
"""

from . import features, functional
from .modules import RandMultiHeadAttention, convert_mha

__all__ = ["RandMultiHeadAttention", "convert_mha", "features", "functional", "__version__"]

__version__ = "0.1.0"
