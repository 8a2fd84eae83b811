"""Recurrent decoding equals the parallel causal forward at every position."""

from __future__ import annotations

import pytest
import torch

from randattn import RandMultiHeadAttention
from randattn.decoding import (
    DecodingState,
    block_state,
    empty_state,
    init_state,
    merge_states,
    rand_attention_step,
    step,
)
from randattn.functional import rand_attention


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _layer(kernel_fn="softmax", batch_first=True, **kw):
    torch.manual_seed(0)
    return RandMultiHeadAttention(
        32, 4, batch_first=batch_first, causal=True, kernel_fn=kernel_fn, seed=1, backend="reference", **kw
    )


def _feed(layer, x, sizes):
    """Feed ``x`` through ``step`` in pieces of the given sizes (along the sequence axis)."""
    n = x.shape[0] if layer.batch_first else x.shape[1]
    state = init_state(layer, n)
    outs, start = [], 0
    seq_dim = 1 if layer.batch_first else 0
    for size in sizes:
        out, state = step(layer, x.narrow(seq_dim, start, size), state)
        outs.append(out)
        start += size
    return torch.cat(outs, dim=seq_dim), state


@pytest.mark.parametrize("kernel_fn", ["softmax", "relu"])
@pytest.mark.parametrize("sizes", [[1] * 40, [7, 1, 13, 19], [40]], ids=["tokens", "chunks", "whole"])
def test_step_matches_parallel_forward(kernel_fn, sizes):
    layer = _layer(kernel_fn).eval()
    torch.manual_seed(1)
    x = torch.randn(3, 40, 32) * 2.0  # large logits exercise the running stabiliser
    expected, _ = layer(x, x, x, need_weights=False)
    got, state = _feed(layer, x, sizes)
    assert _rel_err(got, expected) <= 1e-5
    # per position, too (the first positions have few keys and are the most sensitive)
    per_pos = ((got - expected).norm(dim=-1) / expected.norm(dim=-1)).max().item()
    assert per_pos <= 1e-5
    assert state.position == 40


def test_step_sequence_first_layout_and_chunked_state():
    layer = _layer(batch_first=False).eval()
    torch.manual_seed(2)
    x = torch.randn(25, 2, 32)
    expected, _ = layer(x, x, x, need_weights=False)
    got, _ = _feed(layer, x, [1, 1, 5, 18])
    assert got.shape == (25, 2, 32)
    assert _rel_err(got, expected) <= 1e-5


def test_step_gradients_match_parallel_forward():
    layer = _layer().eval()
    torch.manual_seed(3)
    x = torch.randn(2, 20, 32, requires_grad=True)
    w = torch.randn(2, 20, 32)
    (layer(x, x, x, need_weights=False)[0] * w).sum().backward()
    expected = [x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]
    x.grad = None
    layer.zero_grad()
    got, _ = _feed(layer, x, [3, 1, 16])
    (got * w).sum().backward()
    for g, e in zip([x.grad] + [p.grad for p in layer.parameters()], expected):
        assert _rel_err(g, e) <= 1e-5


def test_functional_step_with_small_chunks_and_key_bias():
    torch.manual_seed(4)
    q, k, v = (torch.randn(2, 3, 50, 8) * 1.5 for _ in range(3))
    proj = torch.randn(16, 8)
    mask = torch.rand(2, 50) < 0.3
    mask[:, 0] = False
    expected = rand_attention(q, k, v, proj, causal=True, key_padding_mask=mask, backend="reference")
    bias = torch.zeros(2, 50).masked_fill(mask, float("-inf"))
    state = empty_state(2, 3, 16, 8)
    out1, state = rand_attention_step(
        q[:, :, :21], k[:, :, :21], v[:, :, :21], proj, state, key_bias=bias[:, :21], chunk_size=4
    )
    out2, state = rand_attention_step(
        q[:, :, 21:], k[:, :, 21:], v[:, :, 21:], proj, state, key_bias=bias[:, 21:], chunk_size=5
    )
    assert _rel_err(torch.cat([out1, out2], dim=2), expected) <= 1e-5


@pytest.mark.parametrize("kernel_fn", ["softmax", "relu"])
def test_block_states_merge_to_the_scanned_state(kernel_fn):
    torch.manual_seed(5)
    k, v = torch.randn(2, 2, 30, 8) * 2, torch.randn(2, 2, 30, 8)
    q = torch.randn(2, 2, 30, 8)
    proj = torch.randn(12, 8)
    _, scanned = rand_attention_step(q, k, v, proj, empty_state(2, 2, 12, 8, kernel_fn=kernel_fn), kernel_fn=kernel_fn)
    parts = [block_state(k[:, :, a:b], v[:, :, a:b], proj, kernel_fn=kernel_fn) for a, b in ((0, 9), (9, 10), (10, 30))]
    merged = merge_states(
        merge_states(empty_state(2, 2, 12, 8, kernel_fn=kernel_fn), parts[0]), merge_states(parts[1], parts[2])
    )
    assert merged.position == 30
    torch.testing.assert_close(merged.stabiliser, scanned.stabiliser)
    # compare at a common scale: the state sums are defined up to the stabiliser
    assert _rel_err(merged.kv_sum, scanned.kv_sum) <= 1e-5
    assert _rel_err(merged.key_sum, scanned.key_sum) <= 1e-5


def test_half_precision_layer_keeps_float32_state():
    layer = _layer().to(torch.bfloat16).eval()
    x = torch.randn(1, 6, 32, dtype=torch.bfloat16)
    state = init_state(layer, 1)
    out, state = step(layer, x, state)
    assert out.dtype == torch.bfloat16
    assert state.kv_sum.dtype == torch.float32 and isinstance(state, DecodingState)


def test_state_shapes():
    layer = _layer(num_random_features=20)
    state = init_state(layer, 5)
    assert state.kv_sum.shape == (5, 4, 20, 8)
    assert state.key_sum.shape == (5, 4, 20)
    assert state.stabiliser.shape == (5, 4)
    assert state.position == 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"causal": False}, "causal"),
        ({"add_bias_kv": True}, "add_bias_kv"),
        ({"add_zero_attn": True}, "add_zero_attn"),
        ({"kdim": 16}, "kdim"),
    ],
)
def test_rejects_layers_that_cannot_decode(kwargs, match):
    layer = RandMultiHeadAttention(32, 4, batch_first=True, **{"causal": True, **kwargs})
    with pytest.raises(ValueError, match=match):
        init_state(layer, 1)


def test_rejects_bad_inputs():
    layer = _layer()
    state = init_state(layer, 2)
    with pytest.raises(TypeError, match="layer"):
        init_state(torch.nn.MultiheadAttention(32, 4), 1)
    with pytest.raises(ValueError, match="x must be 3-D"):
        step(layer, torch.randn(4, 32), state)
    with pytest.raises(ValueError, match="embed_dim"):
        step(layer, torch.randn(2, 1, 16), state)
    with pytest.raises(ValueError, match="state.kv_sum"):
        step(layer, torch.randn(3, 1, 32), state)
    with pytest.raises(ValueError, match="batch_size"):
        init_state(layer, 0)


def test_float64_layer_decodes_in_float64():
    layer = _layer().double().eval()
    torch.manual_seed(6)
    x = torch.randn(2, 12, 32, dtype=torch.float64)
    expected, _ = layer(x, x, x, need_weights=False)
    got, state = _feed(layer, x, [1, 4, 7])
    assert state.kv_sum.dtype == torch.float64
    assert _rel_err(got, expected) <= 1e-12


@pytest.mark.parametrize("spec", ["softmax:16", "softmax:16w4"])
def test_character_model_recurrent_logits_and_generation(spec):
    """Also with a local window (its layers decode with a WindowedDecodingState)."""
    from randattn.charlm import AttentionSpec, CausalTransformer
    from randattn.decoding import generate, init_model_states, model_step

    model = CausalTransformer(11, 24, d_model=32, n_layers=2, n_heads=4, attention=AttentionSpec.parse(spec)).eval()
    tokens = torch.randint(0, 11, (2, 24), generator=torch.Generator().manual_seed(0))
    expected = model(tokens)
    states = init_model_states(model, 2)
    got = []
    for a, b in ((0, 5), (5, 6), (6, 24)):
        logits, states = model_step(model, tokens[:, a:b], states)
        got.append(logits)
    assert _rel_err(torch.cat(got, dim=1), expected) <= 1e-5
    # greedy generation picks, token by token, the argmax of the parallel forward on the sequence so far
    ids = generate(model, tokens[:, :4], 6, temperature=0.0)
    seq = tokens[:, :4]
    for _ in range(6):
        seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(ids, seq[:, 4:])
    with pytest.raises(ValueError, match="context"):
        generate(model, tokens[:, :20], 10)


def test_layer_methods_decode_like_forward():
    layer = _layer().eval()
    x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(7))
    expected, _ = layer(x, x, x, need_weights=False)
    state = layer.init_state(2)
    first, state = layer.step(x[:, :4], state)
    rest = []
    for t in range(4, 9):
        out, state = layer.step(x[:, t : t + 1], state)
        rest.append(out)
    assert _rel_err(torch.cat([first, *rest], dim=1), expected) <= 1e-5
    assert state.position == 9


def test_step_in_training_drops_values_as_forward_does():
    """Value dropout in training: a whole-sequence step and the parallel forward, from one RNG seed,
    drop the same keys (the output differs from evaluation mode, so the drop is real)."""
    layer = _layer(dropout=0.5).train()
    x = torch.randn(2, 24, 32)
    torch.manual_seed(7)
    expected, _ = layer(x, x, x, need_weights=False)
    torch.manual_seed(7)
    got, _ = _feed(layer, x, [24])
    assert _rel_err(got, expected) <= 1e-5
    assert _rel_err(got, layer.eval()(x, x, x, need_weights=False)[0]) > 0.05
