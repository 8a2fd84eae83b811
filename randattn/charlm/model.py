"""A small pre-norm causal transformer whose attention layer is exact or random-feature attention."""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from ..modules import RandMultiHeadAttention

__all__ = ["ATTENTION_KINDS", "AttentionSpec", "CausalTransformer"]

#: ``"exact"``: ``nn.MultiheadAttention`` with a causal mask; ``"softmax"`` / ``"relu"``:
#: ``RandMultiHeadAttention(causal=True)`` with that kernel.
ATTENTION_KINDS = ("exact", "softmax", "relu")


@dataclass(frozen=True)
class AttentionSpec:
    """Which attention a model uses.

    Attributes:
        kind: one of :data:`ATTENTION_KINDS`.
        num_features: ``m`` for random-feature attention (``None``: the library default for the
            head dimension); must be ``None`` for ``"exact"``.
        redraw_interval: redraw the random features every this many training steps
            (``feature_redraw_interval`` of :class:`~randattn.RandMultiHeadAttention`); ``None`` keeps one draw.
        local_window: exact weights for each query's latest keys (``local_window`` of
            :class:`~randattn.RandMultiHeadAttention`; softmax only); ``None``: every key estimated.
    """

    kind: str = "exact"
    num_features: int | None = None
    redraw_interval: int | None = None
    local_window: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in ATTENTION_KINDS:
            raise ValueError(f"kind must be one of {ATTENTION_KINDS}, got {self.kind!r}")
        if self.kind == "exact" and self.num_features is not None:
            raise ValueError("num_features must be None for exact attention")
        if self.num_features is not None and self.num_features < 1:
            raise ValueError(f"num_features must be >= 1, got {self.num_features}")
        if self.redraw_interval is not None and (self.kind == "exact" or self.redraw_interval < 1):
            raise ValueError(f"redraw_interval must be None, or >= 1 for random features; got {self.redraw_interval}")
        if self.local_window is not None and (self.kind != "softmax" or self.local_window < 1):
            raise ValueError(f"local_window must be None, or >= 1 for the softmax kernel; got {self.local_window}")

    @property
    def label(self) -> str:
        """Short name, e.g. ``"exact"``, ``"softmax m=128"``, ``"relu m=default"``."""
        if self.kind == "exact":
            return "exact"
        label = f"{self.kind} m={self.num_features if self.num_features is not None else 'default'}"
        if self.local_window is not None:
            label = f"{label} window {self.local_window}"
        return label if self.redraw_interval is None else f"{label} redraw {self.redraw_interval}"

    @classmethod
    def parse(cls, text: str) -> AttentionSpec:
        """Parse ``"exact"``, ``"softmax"``, ``"softmax:128"``, ``"relu:64"``, ``"softmax:256@100"``
        (redraw every 100 steps) or ``"softmax:256w64"`` (exact weights for the latest 64 keys)."""
        text, _, redraw = text.partition("@")
        kind, _, m = text.partition(":")
        m, _, window = m.partition("w")
        return cls(
            kind.strip(), int(m) if m else None, int(redraw) if redraw else None, int(window) if window else None
        )


class _Block(nn.Module):
    def __init__(
        self, d_model: int, n_heads: int, attention: AttentionSpec, feature_seed: int, dropout: float, short_conv: int
    ):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        # Causal depthwise convolution over the attention inputs (residual form): position t mixes
        # positions t - short_conv + 1 .. t, channel by channel.
        self.conv = (
            nn.Conv1d(d_model, d_model, short_conv, groups=d_model, padding=short_conv - 1) if short_conv else None
        )
        self.ln2 = nn.LayerNorm(d_model)
        if attention.kind == "exact":
            self.attn: nn.Module = nn.MultiheadAttention(d_model, n_heads, batch_first=True)
        else:
            self.attn = RandMultiHeadAttention(
                d_model,
                n_heads,
                batch_first=True,
                num_random_features=attention.num_features,
                kernel_fn=attention.kind,
                causal=True,
                seed=feature_seed,
                feature_redraw_interval=attention.redraw_interval,
                local_window=attention.local_window,
            )
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))
        self.drop = nn.Dropout(dropout)
        self.exact = attention.kind == "exact"

    def forward(self, x: torch.Tensor, causal_mask: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        if self.conv is not None:
            h = h + self.conv(h.transpose(1, 2))[..., : h.shape[1]].transpose(1, 2)
        if self.exact:
            a, _ = self.attn(h, h, h, attn_mask=causal_mask, need_weights=False, is_causal=True)
        else:
            a, _ = self.attn(h, h, h, need_weights=False)
        x = x + self.drop(a)
        return x + self.drop(self.mlp(self.ln2(x)))


class CausalTransformer(nn.Module):
    """Token and learned position embeddings, pre-norm blocks (attention + 4x GELU MLP), tied output.

    The parameters are initialised from ``init_seed`` independently of the attention kind, so
    models that differ only in their attention start from the same weights (the random projections
    of random-feature layers come from their own generators, seeded ``feature_seed + layer``).

    Args:
        vocab_size: number of token ids.
        context: maximum sequence length.
        d_model, n_layers, n_heads: width, depth and heads.
        attention: :class:`AttentionSpec`.
        dropout: dropout on the residual branches.
        short_conv: kernel size of a causal depthwise convolution added (as a residual) to the
            attention inputs of every block, initialised to zero; ``0`` (default) for none.
        init_seed: seed of the parameter initialisation.
        feature_seed: seed of the first layer's random projection.

    Shapes:
        ``forward(tokens (B, T)) -> logits (B, T, vocab_size)`` with ``T <= context``.
    """

    def __init__(
        self,
        vocab_size: int,
        context: int,
        d_model: int = 256,
        n_layers: int = 4,
        n_heads: int = 4,
        attention: AttentionSpec = AttentionSpec(),
        dropout: float = 0.0,
        init_seed: int = 0,
        feature_seed: int = 1000,
        short_conv: int = 0,
    ):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        if short_conv < 0:
            raise ValueError(f"short_conv must be >= 0, got {short_conv}")
        self.context = context
        self.attention = attention
        with torch.random.fork_rng(devices=[]):
            self.tok = nn.Embedding(vocab_size, d_model)
            self.pos = nn.Embedding(context, d_model)
            self.blocks = nn.ModuleList(
                _Block(d_model, n_heads, attention, feature_seed + i, dropout, short_conv) for i in range(n_layers)
            )
            self.ln_f = nn.LayerNorm(d_model)
            # Re-initialise everything from one seed after construction, so that the random numbers
            # the constructors consumed (which differ between attention kinds) do not matter.
            torch.manual_seed(init_seed)
            for module in self.modules():
                if isinstance(module, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(module.weight, std=0.02)
                    if isinstance(module, nn.Linear) and module.bias is not None:
                        nn.init.zeros_(module.bias)
                elif isinstance(module, nn.Conv1d):
                    nn.init.zeros_(module.weight)
                    nn.init.zeros_(cast(torch.Tensor, module.bias))
            for layer in self.attention_layers():
                nn.init.normal_(cast(torch.Tensor, layer.in_proj_weight), std=0.02)
                nn.init.zeros_(cast(torch.Tensor, layer.in_proj_bias))

    def attention_layers(self) -> list[nn.Module]:
        """The attention module of every block."""
        return [cast(nn.Module, block.attn) for block in self.blocks]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        length = tokens.shape[1]
        if length > self.context:
            raise ValueError(f"tokens has length {length}, more than the model's context {self.context}")
        pos = torch.arange(length, device=tokens.device)
        x = self.tok(tokens) + self.pos(pos)
        mask = torch.ones(length, length, dtype=torch.bool, device=tokens.device).triu(1)
        for block in self.blocks:
            x = block(x, mask)
        return self.ln_f(x) @ self.tok.weight.T
