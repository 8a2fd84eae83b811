"""``RandMultiHeadAttention``: a drop-in replacement for :class:`torch.nn.MultiheadAttention`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import masks
from .features import default_num_features, draw_projection
from .functional import check_backend, check_kernel_fn, check_local_window, projected_self_attention, rand_attention
from .ops.eager import split_packed
from .ops.weights import attention_weights

__all__ = ["RandMultiHeadAttention", "convert_mha"]


def _eager_only(fn, reason: str):
    """``fn`` excluded from ``torch.compile``'s tracing (with ``reason`` in the error of a full-graph
    compile, where the installed torch takes one)."""
    try:
        return torch.compiler.disable(fn, reason=reason)
    except TypeError:  # torch < 2.8
        return torch.compiler.disable(fn)


class RandMultiHeadAttention(nn.Module):
    r"""Multi-head attention computed with random features, in linear time and memory.

    A drop-in replacement for :class:`torch.nn.MultiheadAttention`: same constructor arguments,
    parameter names and shapes, ``forward`` signature and return values. The softmax of exact
    attention is replaced by an estimate built from ``m`` random features per head:

    .. math::
        \mathrm{head}_h = \mathrm{diag}(\phi(Q_h)\,\phi(K_h)^\top \mathbf 1)^{-1}\,
                          \phi(Q_h)\,(\phi(K_h)^\top V_h), \qquad
        \phi(x) = \exp\!\big(W x - \tfrac{|x|^2}{2}\big)\ \text{(softmax)} \ \text{or}\
                  \tfrac{1}{\sqrt m}\,\mathrm{relu}(W x) + \epsilon\ \text{(relu)}

    with ``x = q / d^{1/4}`` and one projection ``W`` of shape ``(m, d)`` shared by queries and keys of
    all heads. Time and memory are ``O((L + S) m d)`` per head instead of ``O(L S d)``.

    Args:
        embed_dim: total dimension ``E`` of the model.
        num_heads: number of heads ``H``; ``E`` must be divisible by ``H``.
        dropout: probability of dropping a key (its value row, per head) from the weighted sum, applied
            in training after normalisation; like dropout on the attention weights, with the pattern
            shared by all queries. Default ``0.0``.
        bias: add bias to input and output projections. Default ``True``.
        add_bias_kv: add learnable bias to the key and value sequences at dim 0. Default ``False``.
        add_zero_attn: add a new batch of zeros to the key and value sequences. Default ``False``.
        kdim: total number of features for keys. Default ``None`` (uses ``kdim=embed_dim``).
        vdim: total number of features for values. Default ``None`` (uses ``vdim=embed_dim``).
        batch_first: inputs and outputs are ``(N, L, E)`` instead of ``(L, N, E)``. Default ``False``.
        device, dtype: factory arguments of the parameters.
        num_random_features: number of random features ``m`` (keyword only). Default
            ``ceil(d ln d)`` for head dim ``d`` (see :func:`randattn.features.default_num_features`).
        kernel_fn: ``"softmax"`` (FAVOR+ positive orthogonal features) or ``"relu"``.
        causal: always attend causally (each query to keys at its position and before).
        orthogonal: draw Haar-orthogonal blocks (``True``) or iid Gaussian rows.
        seed: seed of this layer's private generator; makes draws and redraws reproducible.
            ``None`` seeds it from the global generator (consumed, never reseeded).
        feature_redraw_interval: redraw the projection every this many training forwards; never in eval.
            The redraw is host work between steps: under ``torch.compile`` it runs outside the graph
            (``fullgraph=True`` needs ``None`` here and :meth:`redraw_features` called between steps).
        backend: ``"auto"``, ``"reference"`` or ``"triton"`` (see :func:`randattn.functional.rand_attention`).
        local_window: causal softmax layers only: each query weighs its ``local_window`` latest keys
            (itself included) exactly, ``exp(q . k / sqrt(d))``, and the earlier keys by their
            feature estimate, under one denominator. Sharp lookups among the nearby tokens then cost
            no approximation error, in ``O(L (w + m) d)`` time per head: on the Triton kernels for
            windows up to :data:`~randattn.functional.KERNEL_MAX_WINDOW` (64) keys, on the reference
            path beyond (``backend="triton"`` then raises). Recurrent decoding keeps the latest
            ``local_window - 1`` keys beside its state (:class:`~randattn.decoding.WindowedDecodingState`).
            Default ``None`` (every key estimated).

    Shape:
        - query: ``(L, E)`` unbatched, ``(L, N, E)``, or ``(N, L, E)`` with ``batch_first``.
        - key: ``(S, E_k)``, ``(S, N, E_k)`` or ``(N, S, E_k)``; value the same with ``E_v``.
        - key_padding_mask: ``(N, S)`` or ``(S)`` unbatched; bool (``True`` ignores) or float (added to
          the logits, i.e. folded into the key's features as a factor ``e^b``).
        - attn_output: ``(L, E)``, ``(L, N, E)`` or ``(N, L, E)``.
        - attn_weights (``need_weights=True``): ``(N, L, S)`` averaged over heads, ``(N, H, L, S)``
          with ``average_attn_weights=False``; unbatched drops ``N``. These are the approximate,
          normalised weights and cost ``O(L S)`` time and memory; pass ``need_weights=False``
          to keep attention linear.

    Masks:
        Causal attention is used when ``causal=True``, ``is_causal=True``, or ``attn_mask`` is the
        standard causal mask (bool upper triangle or float ``-inf`` above the diagonal, as from
        :meth:`torch.nn.Transformer.generate_square_subsequent_mask`). Random-feature attention cannot
        apply any other ``attn_mask``: such a mask raises ``ValueError``.

    Raises:
        ValueError / TypeError with the offending argument named, for: ``embed_dim`` not divisible by
        ``num_heads``, ``dropout`` outside ``[0, 1)``, unknown ``kernel_fn`` or ``backend``,
        ``num_random_features < 1``, a ``local_window`` without ``causal=True`` and the softmax
        kernel, wrong input rank, embed dim mismatch, batch mismatch, key/value
        length mismatch, wrong mask shape or dtype, an unsupported ``attn_mask``, mixed devices.
    """

    __constants__ = ["batch_first"]
    projection: torch.Tensor

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        device=None,
        dtype=None,
        *,
        num_random_features: int | None = None,
        kernel_fn: str = "softmax",
        causal: bool = False,
        orthogonal: bool = True,
        seed: int | None = None,
        feature_redraw_interval: int | None = None,
        backend: str = "auto",
        local_window: int | None = None,
    ) -> None:
        if embed_dim <= 0 or num_heads <= 0:
            raise ValueError(f"embed_dim and num_heads must be > 0, got embed_dim={embed_dim}, num_heads={num_heads}")
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        check_kernel_fn(kernel_fn)
        check_backend(backend)
        check_local_window(local_window, causal, kernel_fn, backend)
        head_dim = embed_dim // num_heads
        m = default_num_features(head_dim) if num_random_features is None else num_random_features
        if not isinstance(m, int) or m < 1:
            raise ValueError(f"num_random_features must be an int >= 1, got {num_random_features!r}")
        if feature_redraw_interval is not None and feature_redraw_interval < 1:
            raise ValueError(f"feature_redraw_interval must be None or >= 1, got {feature_redraw_interval}")
        factory = {"device": device, "dtype": dtype}
        super().__init__()
        self.embed_dim = embed_dim
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.num_heads = num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        self.head_dim = head_dim
        self.num_random_features = m
        self.kernel_fn = kernel_fn
        self.causal = causal
        self.orthogonal = orthogonal
        self.seed = seed
        self.feature_redraw_interval = feature_redraw_interval
        self.backend = backend
        self.local_window = local_window

        if self._qkv_same_embed_dim:
            self.in_proj_weight = nn.Parameter(torch.empty((3 * embed_dim, embed_dim), **factory))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:
            self.q_proj_weight = nn.Parameter(torch.empty((embed_dim, embed_dim), **factory))
            self.k_proj_weight = nn.Parameter(torch.empty((embed_dim, self.kdim), **factory))
            self.v_proj_weight = nn.Parameter(torch.empty((embed_dim, self.vdim), **factory))
            self.register_parameter("in_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.modules.linear.NonDynamicallyQuantizableLinear(embed_dim, embed_dim, bias=bias, **factory)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty((1, 1, embed_dim), **factory))
            self.bias_v = nn.Parameter(torch.empty((1, 1, embed_dim), **factory))
        else:
            self.register_parameter("bias_k", None)
            self.register_parameter("bias_v", None)
        self.add_zero_attn = add_zero_attn
        self._reset_parameters()

        if seed is None:
            seed = int(torch.randint(0, 2**62, (), dtype=torch.int64).item())
        self._generator = torch.Generator().manual_seed(seed)
        self.register_buffer(
            "projection",
            draw_projection(m, head_dim, orthogonal=orthogonal, generator=self._generator, device=device),
            persistent=True,
        )
        self._training_forwards = 0
        # Any forward hook makes nn.TransformerEncoderLayer skip its fused fast path, which would
        # compute exact attention straight from in_proj_weight and bypass this module.
        self.register_forward_pre_hook(_keep_off_fused_fast_path)

    def _reset_parameters(self) -> None:
        if self._qkv_same_embed_dim:
            nn.init.xavier_uniform_(self.in_proj_weight)
        else:
            nn.init.xavier_uniform_(self.q_proj_weight)
            nn.init.xavier_uniform_(self.k_proj_weight)
            nn.init.xavier_uniform_(self.v_proj_weight)
        if self.in_proj_bias is not None:
            nn.init.constant_(self.in_proj_bias, 0.0)
            nn.init.constant_(self.out_proj.bias, 0.0)
        if self.bias_k is not None:
            nn.init.xavier_normal_(self.bias_k)
            nn.init.xavier_normal_(self.bias_v)

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_random_features={self.num_random_features}, "
            f"kernel_fn={self.kernel_fn!r}, causal={self.causal}, batch_first={self.batch_first}, backend={self.backend!r}"
            + ("" if self.local_window is None else f", local_window={self.local_window}")
        )

    # ----------------------------------------------------------------------------------- features
    @torch.no_grad()
    def redraw_features(self, generator: torch.Generator | None = None) -> None:
        """Draw a new projection in place, from ``generator`` or this layer's own generator."""
        new = draw_projection(
            self.num_random_features,
            self.head_dim,
            orthogonal=self.orthogonal,
            generator=self._generator if generator is None else generator,
        )
        self.projection.copy_(new)

    def _count_training_forward(self) -> None:
        """Count a training forward and redraw the projection every ``feature_redraw_interval`` of them."""
        interval = self.feature_redraw_interval
        if interval and self._training_forwards and self._training_forwards % interval == 0:
            self.redraw_features()
        self._training_forwards += 1

    # Host work between steps: under torch.compile it runs eagerly (one graph break) instead of being
    # traced, where the counter's value would be guarded on and every step would compile anew.
    _count_training_forward = _eager_only(
        _count_training_forward,
        "feature_redraw_interval redraws the projection on the host between training steps, which one "
        "graph cannot hold; with torch.compile(fullgraph=True) pass feature_redraw_interval=None and "
        "call redraw_features() between steps",
    )

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # A state dict of nn.MultiheadAttention has no projection: keep the current draw.
        state_dict.setdefault(prefix + "projection", self.projection)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention, **options) -> RandMultiHeadAttention:
        """Build a layer with the arguments, weights, device and dtype of ``mha``.

        Args:
            mha: the :class:`torch.nn.MultiheadAttention` to copy.
            **options: keyword-only options of this class (``num_random_features``, ``kernel_fn``, ...).
        """
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"mha must be an nn.MultiheadAttention, got {type(mha).__name__}")
        ref = mha.out_proj.weight
        layer = cls(
            mha.embed_dim,
            mha.num_heads,
            dropout=mha.dropout,
            bias=mha.in_proj_bias is not None,
            add_bias_kv=mha.bias_k is not None,
            add_zero_attn=mha.add_zero_attn,
            kdim=mha.kdim,
            vdim=mha.vdim,
            batch_first=mha.batch_first,
            device=ref.device,
            dtype=ref.dtype,
            **options,
        )
        layer.load_state_dict(mha.state_dict(), strict=True)
        layer.train(mha.training)
        return layer

    # ------------------------------------------------------------------------------------ forward
    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attend from ``query`` to ``key``/``value``; see the class docstring for shapes and masks.

        Returns:
            ``(attn_output, attn_weights)``; ``attn_weights`` is ``None`` unless ``need_weights``.
        """
        if self.training and self.feature_redraw_interval is not None:
            self._count_training_forward()
        self_attention = query is key and key is value
        query, key, value, key_bias, unbatched = masks.batch_first_inputs(
            query, key, value, key_padding_mask, self.batch_first, self.embed_dim, self.kdim, self.vdim
        )
        causal = masks.resolve_causal(self.causal, is_causal, attn_mask, query.shape[1], key.shape[1])
        packed = (
            self_attention
            and self._qkv_same_embed_dim
            and self.bias_k is None
            and not self.add_zero_attn
            and not (self.training and self.dropout > 0.0)
        )
        if packed:
            return self._packed_forward(query, key_bias, causal, need_weights, average_attn_weights, unbatched)
        q, k, v = self._in_projection(query, key, value)
        n, length, _ = q.shape
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(n, 1, -1).to(k.dtype)], dim=1)
            v = torch.cat([v, self.bias_v.expand(n, 1, -1).to(v.dtype)], dim=1)
            key_bias = masks.pad_key_bias(key_bias)
        q, k, v = self._split_heads(q, k, v)
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(k.shape[:2] + (1, k.shape[-1]))], dim=2)
            v = torch.cat([v, v.new_zeros(v.shape[:2] + (1, v.shape[-1]))], dim=2)
            key_bias = masks.pad_key_bias(key_bias)
        if causal and k.shape[2] != length:
            raise ValueError("causal attention cannot be combined with add_bias_kv or add_zero_attn")
        projection = self.projection
        v = self._value_dropout(v)
        out = rand_attention(
            q,
            k,
            v,
            projection,
            kernel_fn=self.kernel_fn,
            causal=causal,
            key_padding_mask=key_bias,
            backend=self.backend,
            local_window=self.local_window,
        )
        return self._finish(out, q, k, key_bias, causal, need_weights, average_attn_weights, unbatched)

    def _packed_forward(self, x, key_bias, causal, need_weights, average_attn_weights, unbatched):
        """Self-attention through one in-projection matmul (see :func:`~randattn.functional.projected_self_attention`)."""
        out = projected_self_attention(
            x,
            self.in_proj_weight,
            self.in_proj_bias,
            self.num_heads,
            self.projection,
            kernel_fn=self.kernel_fn,
            causal=causal,
            key_padding_mask=key_bias,
            backend=self.backend,
            local_window=self.local_window,
        )
        q = k = None
        if need_weights:  # the weights are a diagnostic: project again rather than keep qkv
            q, k = split_packed(F.linear(x, self.in_proj_weight, self.in_proj_bias), self.num_heads)[:2]
        return self._finish(out, q, k, key_bias, causal, need_weights, average_attn_weights, unbatched)

    def _finish(self, out, q, k, key_bias, causal, need_weights, average_attn_weights, unbatched):
        """Out-projection, optional attention weights, and the caller's layout."""
        out = self.out_proj(out.transpose(1, 2).flatten(2))
        weights = None
        if need_weights:
            weights = attention_weights(
                q, k, self.projection.float(), self.kernel_fn, causal, key_bias, self.local_window
            ).to(out.dtype)
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if unbatched:
                weights = weights.squeeze(0)
        if unbatched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    # ----------------------------------------------------------------------------------- decoding
    def init_state(self, batch_size: int, device=None, dtype=None):
        """Empty recurrent decoding state of this causal layer (see :func:`randattn.decoding.init_state`).

        Args:
            batch_size: ``N``.
            device: defaults to the device of the projection.
            dtype: of the state; float32 by default (float64 for a float64 layer).

        Returns:
            :class:`~randattn.decoding.DecodingState` with ``kv_sum (N, H, m, d)``, ``key_sum (N, H, m)``,
            ``stabiliser (N, H)`` and ``position == 0`` (with a ``local_window``, a
            :class:`~randattn.decoding.WindowedDecodingState` around one).

        Raises:
            ValueError: the layer is not causal, or has ``add_bias_kv`` / ``add_zero_attn`` or ``kdim`` /
                ``vdim`` different from ``embed_dim``.
        """
        from .decoding import init_state

        return init_state(self, batch_size, device=device, dtype=dtype)

    def step(self, x: torch.Tensor, state):
        """Causal self-attention of the next token(s) ``x`` after ``state`` (see :func:`randattn.decoding.step`).

        Feeding a sequence through ``step`` in pieces of any sizes gives the outputs of
        ``forward(seq, seq, seq)`` at every position, at a cost per token that does not grow with the position.

        Args:
            x: ``(N, T, E)`` if ``batch_first`` else ``(T, N, E)``; one token (``T = 1``) or a chunk.
            state: from :meth:`init_state` or a previous :meth:`step`.

        Returns:
            ``(out, new_state)`` with ``out`` shaped like ``x``.
        """
        from .decoding import step

        return step(self, x, state)

    def _self_attention_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``q, k, v`` heads ``(N, H, L, E / H)`` of self-attention over ``x`` ``(N, L, E)``, the value
        dropout of training mode applied (decoding and context parallelism)."""
        q, k, v = self._split_heads(*self._in_projection(x, x, x))
        return q, k, self._value_dropout(v)

    def _split_heads(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``(N, L, E) -> (N, H, L, E / H)`` for each tensor."""
        return tuple(t.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2) for t in tensors)

    def _value_dropout(self, v: torch.Tensor) -> torch.Tensor:
        """Training mode: each key's value row of ``v`` ``(N, H, S, d)`` dropped (per head) with
        probability ``dropout``, the rest scaled by ``1 / (1 - dropout)``."""
        if self.training and self.dropout > 0.0:
            keep = torch.rand(v.shape[:3] + (1,), device=v.device) >= self.dropout
            v = v * keep.to(v.dtype) / (1.0 - self.dropout)
        return v

    def _in_projection(self, query, key, value):
        b_q = b_k = b_v = None
        if self.in_proj_bias is not None:
            b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        if self._qkv_same_embed_dim:
            w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        return F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)


def _keep_off_fused_fast_path(module, args):
    return None


def convert_mha(model: nn.Module, **options) -> nn.Module:
    """Replace every :class:`torch.nn.MultiheadAttention` inside ``model`` by a :class:`RandMultiHeadAttention`.

    Weights, device, dtype, ``batch_first`` and training mode are kept. Encoders of type
    :class:`torch.nn.TransformerEncoder` get ``use_nested_tensor = False`` so their eval-mode fast path,
    which computes exact attention from the weights, is never taken.

    Args:
        model: a module (modified in place); a bare ``nn.MultiheadAttention`` is returned converted.
        **options: keyword-only options of :class:`RandMultiHeadAttention`, e.g. ``num_random_features``.
            Every layer gets its own draw; with ``seed=s`` the layers are seeded ``s, s + 1, ...`` in
            module order.

    Returns:
        The converted model.
    """
    seed = options.pop("seed", None)
    converted = 0

    def replace(mha: nn.MultiheadAttention) -> RandMultiHeadAttention:
        nonlocal converted
        layer_seed = None if seed is None else seed + converted
        converted += 1
        return RandMultiHeadAttention.from_mha(mha, seed=layer_seed, **options)

    def walk(module: nn.Module) -> None:
        for name, child in list(module.named_children()):
            if isinstance(child, nn.MultiheadAttention):
                setattr(module, name, replace(child))
            else:
                walk(child)
        if isinstance(module, nn.TransformerEncoder):
            module.use_nested_tensor = False

    if isinstance(model, nn.MultiheadAttention):
        return replace(model)
    walk(model)
    return model
