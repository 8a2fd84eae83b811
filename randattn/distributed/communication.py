"""Bytes communicated per attention layer: context-parallel random-feature attention vs ring attention.

Counts are bytes *sent by each rank* in one forward of one layer, with bandwidth-optimal ring
collectives (an all-reduce of ``B`` bytes sends ``2 (P-1)/P B`` per rank, an all-gather of ``B`` bytes per
rank sends ``(P-1) B``). Backward repeats the same collectives on the gradients (the transposed
communication), so a training step costs about twice the forward numbers for both methods.
"""

from __future__ import annotations

__all__ = [
    "TABLE_SEQUENCE_LENGTHS",
    "communication_bytes",
    "communication_table",
    "format_bytes",
    "ring_attention_bytes",
    "table_rst",
]

#: Total sequence lengths of the table in the "Scaling out" guide: 64K to 4M tokens.
TABLE_SEQUENCE_LENGTHS = (65536, 262144, 1048576, 4194304)
#: The layer of the table: batch 1, embed 512, 8 heads of dim 64, 256 features, 8 ranks, bf16 K/V.
TABLE_CONFIG = {"batch_size": 1, "num_heads": 8, "head_dim": 64, "num_features": 256, "world_size": 8}

_FLOAT32 = 4
_FLOAT64 = 8


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def communication_bytes(
    *,
    batch_size: int,
    num_heads: int,
    num_features: int,
    value_dim: int,
    world_size: int,
    causal: bool,
) -> int:
    """Bytes sent per rank by :func:`~randattn.distributed.context_parallel_attention` in one forward.

    Non-causal: all-reduce MAX of the ``(N, H)`` float32 key stabilisers and all-reduce SUM of the
    ``(N, H, m, d_v + 1)`` float32 states. Causal: all-gather of each rank's ``(N, H, m, d_v + 1)``
    float32 state plus its ``(N, H)`` float64 stabilisers and length.

    Args:
        batch_size, num_heads, num_features, value_dim: ``N``, ``H``, ``m``, ``d_v``.
        world_size: ``P`` ranks sharing the sequence.
        causal: which scheme.

    Returns:
        Bytes; independent of the sequence length.
    """
    _check_positive(
        batch_size=batch_size,
        num_heads=num_heads,
        num_features=num_features,
        value_dim=value_dim,
        world_size=world_size,
    )
    p = world_size
    heads = batch_size * num_heads
    state = heads * num_features * (value_dim + 1) * _FLOAT32
    if causal:
        per_rank = state + (heads + 1) * _FLOAT64
        return (p - 1) * per_rank
    reduced = state + heads * _FLOAT32
    return (2 * (p - 1) * reduced) // p


def ring_attention_bytes(
    seq_len: int,
    *,
    batch_size: int,
    num_heads: int,
    head_dim: int,
    value_dim: int | None = None,
    world_size: int,
    element_bytes: int = 2,
) -> int:
    """Bytes sent per rank by ring attention in one forward: every K/V block visits every rank.

    Each of the ``P - 1`` ring steps passes a block of ``L / P`` keys and values,
    ``N * H * (L / P) * (d + d_v)`` elements, to the next rank (causal masking skips compute, not the
    passing of blocks).

    Args:
        seq_len: total sequence length ``L`` (divisible by ``world_size``).
        batch_size, num_heads, head_dim: ``N``, ``H``, ``d``; value_dim ``d_v`` defaults to ``d``.
        world_size: ``P``.
        element_bytes: bytes per element of K and V (2 for bf16).

    Returns:
        Bytes; grows linearly with ``L``.
    """
    value_dim = head_dim if value_dim is None else value_dim
    _check_positive(
        seq_len=seq_len,
        batch_size=batch_size,
        num_heads=num_heads,
        head_dim=head_dim,
        value_dim=value_dim,
        world_size=world_size,
        element_bytes=element_bytes,
    )
    if seq_len % world_size:
        raise ValueError(f"seq_len ({seq_len}) must be divisible by world_size ({world_size})")
    block = batch_size * num_heads * (seq_len // world_size) * (head_dim + value_dim) * element_bytes
    return (world_size - 1) * block


def communication_table(
    seq_lens=TABLE_SEQUENCE_LENGTHS,
    *,
    batch_size: int = TABLE_CONFIG["batch_size"],
    num_heads: int = TABLE_CONFIG["num_heads"],
    head_dim: int = TABLE_CONFIG["head_dim"],
    num_features: int = TABLE_CONFIG["num_features"],
    world_size: int = TABLE_CONFIG["world_size"],
) -> list[dict[str, int]]:
    """Rows ``{"seq_len", "ring", "noncausal", "causal"}`` of bytes sent per rank per layer forward.

    Args:
        seq_lens: total sequence lengths.
        batch_size, num_heads, head_dim, num_features, world_size: the layer and the group.

    Returns:
        One dict per sequence length.
    """
    kw = {"batch_size": batch_size, "num_heads": num_heads, "world_size": world_size}
    ours = {"num_features": num_features, "value_dim": head_dim, **kw}
    return [
        {
            "seq_len": int(length),
            "ring": ring_attention_bytes(int(length), head_dim=head_dim, **kw),
            "noncausal": communication_bytes(causal=False, **ours),
            "causal": communication_bytes(causal=True, **ours),
        }
        for length in seq_lens
    ]


def format_bytes(value: float) -> str:
    """Human-readable bytes with binary prefixes, e.g. ``'3.5 MiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _tokens(length: int) -> str:
    return f"{length // 1048576}M" if length % 1048576 == 0 else f"{length // 1024}K"


def table_rst(rows: list[dict[str, int]] | None = None) -> str:
    """The communication table as an reStructuredText ``list-table`` (for the "Scaling out" guide).

    The guide includes ``docs/_data/decoding/communication_table.txt``, written by this function; a test
    keeps the two equal.

    Args:
        rows: from :func:`communication_table` (default: its defaults).
    """
    rows = communication_table() if rows is None else rows
    c = TABLE_CONFIG
    lines = [
        ".. list-table:: Bytes sent per rank, one layer, forward "
        f"(N={c['batch_size']}, H={c['num_heads']}, d={c['head_dim']}, m={c['num_features']}, "
        f"P={c['world_size']} ranks, ring attention with bf16 K/V)",
        "   :header-rows: 1",
        "",
        "   * - total length L",
        "     - ring attention",
        "     - randattn non-causal",
        "     - randattn causal",
        "     - ring / randattn causal",
    ]
    for row in rows:
        lines += [
            f"   * - {_tokens(row['seq_len'])}",
            f"     - {format_bytes(row['ring'])}",
            f"     - {format_bytes(row['noncausal'])}",
            f"     - {format_bytes(row['causal'])}",
            f"     - {row['ring'] / row['causal']:.0f}x",
        ]
    return "\n".join(lines) + "\n"
