"""The configurations of the attention benchmark and the numbering of its figures.

This module is the single source of truth for the benchmark page: which configurations are measured,
which metrics are drawn, and the number and caption of every figure.

Figure ``N = 67 + 8 e + 4 k + q`` with ``e`` the index of the embedding dimension in
:data:`EMBED_DIMS`, ``k`` the index of the kernel in :data:`KERNELS` and ``q`` the index of the
metric in :data:`METRICS`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

#: Embedding dimensions, one pair of figure groups (ReLU, softmax) each.
EMBED_DIMS: tuple[int, ...] = (128, 256, 512, 1024)
#: Feature kernels of :class:`randattn.RandMultiHeadAttention`, in figure order.
KERNELS: tuple[str, ...] = ("relu", "softmax")
#: Number of heads: the rows of the 3x3 panel grid of a figure.
NUM_HEADS: tuple[int, ...] = (4, 8, 16)
#: Number of random features ``m``: the columns of the 3x3 panel grid of a figure.
NUM_FEATURES: tuple[int, ...] = (64, 128, 256)
#: Sequence lengths: the x axis of every panel (log2 scale).
SEQ_LENS: tuple[int, ...] = tuple(2**p for p in range(9, 17))
#: Measured quantities, in figure order: forward/backward time (ms), forward/backward peak memory (MiB).
METRICS: tuple[str, ...] = ("fwd_ms", "bwd_ms", "fwd_mib", "bwd_mib")
#: Number of the first figure of the benchmark page.
FIRST_FIGURE = 67

#: Batch size of the recorded benchmark.
BATCH_SIZE = 4
#: Compute dtype of the recorded benchmark: bf16 autocast (``"float32"`` runs without autocast).
DTYPE = "bfloat16"

KERNEL_LABELS = {"relu": "ReLU", "softmax": "Softmax"}
METRIC_LABELS = {
    "fwd_ms": "Forward time",
    "bwd_ms": "Backward time",
    "fwd_mib": "Forward memory",
    "bwd_mib": "Backward memory",
}
METRIC_UNITS = {
    "fwd_ms": "time (ms)",
    "bwd_ms": "time (ms)",
    "fwd_mib": "peak memory (MiB)",
    "bwd_mib": "peak memory (MiB)",
}
DTYPE_LABELS = {"bfloat16": "bf16 autocast", "float32": "fp32"}

#: Model names as stored in results files, and their labels in figures.
RAND = "rand"
MHA = "mha"
MODEL_LABELS = {RAND: "RandMultiHeadAttention", MHA: "nn.MultiheadAttention"}


def figure_number(embed_dim: int, kernel: str, metric: str) -> int:
    """Number ``67 + 8 e + 4 k + q`` of the figure of one (embed_dim, kernel, metric)."""
    return FIRST_FIGURE + 8 * EMBED_DIMS.index(embed_dim) + 4 * KERNELS.index(kernel) + METRICS.index(metric)


def caption(embed_dim: int, kernel: str, metric: str) -> str:
    """Caption of a figure, e.g. ``"Forward time for attention embed=128 ReLU"``."""
    return f"{METRIC_LABELS[metric]} for attention embed={embed_dim} {KERNEL_LABELS[kernel]}"


@dataclass(frozen=True)
class FigureSpec:
    """One figure of the benchmark page: its number, configuration and caption."""

    number: int
    embed_dim: int
    kernel: str
    metric: str

    @property
    def caption(self) -> str:
        """The caption line that precedes the figure on the page (also its PNG ``Title``)."""
        return caption(self.embed_dim, self.kernel, self.metric)

    @property
    def filename(self) -> str:
        """File name of the figure, ``"<number>.png"``."""
        return f"{self.number}.png"


def figures(embed_dims: Sequence[int] | None = None, kernels: Sequence[str] | None = None) -> list[FigureSpec]:
    """The figures of the page in page order, optionally only those of some embed_dims/kernels."""
    return [
        FigureSpec(figure_number(e, k, q), e, k, q)
        for e in EMBED_DIMS
        if embed_dims is None or e in embed_dims
        for k in KERNELS
        if kernels is None or k in kernels
        for q in METRICS
    ]


@dataclass(frozen=True)
class Point:
    """One measured configuration: a model at one (embed_dim, num_heads[, kernel, m], seq_len).

    ``kernel`` and ``num_features`` are ``None`` for ``nn.MultiheadAttention``, whose points are
    shared by every kernel and number of features.
    """

    model: str
    embed_dim: int
    num_heads: int
    seq_len: int
    kernel: str | None = None
    num_features: int | None = None

    @property
    def key(self) -> str:
        """Stable string identifying the point inside a results file."""
        parts = [self.model, f"e{self.embed_dim}", f"h{self.num_heads}"]
        if self.model == RAND:
            parts += [str(self.kernel), f"m{self.num_features}"]
        return "/".join(parts + [f"L{self.seq_len}"])


@dataclass(frozen=True)
class Grid:
    """A benchmark grid: configurations of both models plus batch size, dtype and mode.

    Attributes are tuples; ``dtype`` is ``"bfloat16"`` (autocast) or ``"float32"``.
    """

    embed_dims: tuple[int, ...] = EMBED_DIMS
    kernels: tuple[str, ...] = KERNELS
    num_heads: tuple[int, ...] = NUM_HEADS
    num_features: tuple[int, ...] = NUM_FEATURES
    seq_lens: tuple[int, ...] = SEQ_LENS
    batch_size: int = BATCH_SIZE
    dtype: str = DTYPE
    causal: bool = False
    label: str = field(default="spec", compare=True)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_LABELS:
            raise ValueError(f"dtype must be one of {sorted(DTYPE_LABELS)}, got {self.dtype!r}")
        unknown = set(self.kernels) - set(KERNELS)
        if unknown:
            raise ValueError(f"kernels must be among {KERNELS}, got {sorted(unknown)}")
        for name in ("embed_dims", "num_heads", "num_features", "seq_lens"):
            if not all(isinstance(v, int) and v > 0 for v in getattr(self, name)):
                raise ValueError(f"{name} must hold positive integers, got {getattr(self, name)}")
        if any(e % h for e in self.embed_dims for h in self.num_heads):
            raise ValueError("every embed_dims value must be divisible by every num_heads value")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")

    def points(self) -> Iterator[Point]:
        """Every point of the grid, nn.MultiheadAttention once per (embed_dim, heads, seq_len)."""
        for e in self.embed_dims:
            for h in self.num_heads:
                for n in self.seq_lens:
                    yield Point(MHA, e, h, n)
                    for k in self.kernels:
                        for m in self.num_features:
                            yield Point(RAND, e, h, n, k, m)

    def to_dict(self) -> dict:
        """JSON-friendly form (lists for tuples)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> Grid:
        """Inverse of :meth:`to_dict`."""
        fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**fields)


#: The grid of the benchmark page (run on a GPU).
SPEC_GRID = Grid()
#: A small CPU grid for smoke runs and tests: one embedding dimension, short sequences, batch 1, fp32.
QUICK_GRID = Grid(
    embed_dims=(128,),
    num_heads=(4, 8),
    num_features=(16, 32),
    seq_lens=(32, 64),
    batch_size=1,
    dtype="float32",
    label="quick",
)
