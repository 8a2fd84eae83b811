"""RandMultiHeadAttention as a drop-in for nn.MultiheadAttention."""

import pytest
import torch
from torch import nn

from randattn import RandMultiHeadAttention, convert_mha
from randattn.functional import rand_attention


def _mha(**kw):
    return nn.MultiheadAttention(32, 2, **kw)


def test_signature_defaults_match_nn_mha():
    import inspect

    ours = inspect.signature(RandMultiHeadAttention.__init__).parameters
    theirs = inspect.signature(nn.MultiheadAttention.__init__).parameters
    for name, p in theirs.items():
        assert name in ours and ours[name].default == p.default and ours[name].kind == p.kind, name
    for name in (
        "num_random_features",
        "kernel_fn",
        "causal",
        "orthogonal",
        "seed",
        "feature_redraw_interval",
        "backend",
    ):
        assert ours[name].kind is inspect.Parameter.KEYWORD_ONLY
    fwd_ours = inspect.signature(RandMultiHeadAttention.forward).parameters
    fwd_theirs = inspect.signature(nn.MultiheadAttention.forward).parameters
    assert list(fwd_ours) == list(fwd_theirs)
    assert all(fwd_ours[n].default == p.default for n, p in fwd_theirs.items())


def test_softmax_approximates_exact_mha_and_improves_with_m(gen):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    mha = nn.MultiheadAttention(32, 2, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.mul_(0.5)
    x = torch.randn(2, 48, 32, generator=gen)
    exact, exact_w = mha(x, x, x)
    errs = []
    for m in (8, 128, 4096):
        e = []
        for seed in range(4):
            layer = RandMultiHeadAttention.from_mha(mha, num_random_features=m, seed=seed)
            out, w = layer(x, x, x)
            e.append(((out - exact).norm() / exact.norm()).item())
        errs.append(sum(e) / len(e))
    assert errs[0] > errs[1] > errs[2], errs
    assert errs[2] < 0.1, errs
    assert (w - exact_w).abs().sum(-1).mean() < 0.1  # total variation of the rows at m=4096


def _pair(seed=0, **kw):
    torch.manual_seed(seed)
    mha = nn.MultiheadAttention(32, 4, **kw)
    return mha, RandMultiHeadAttention.from_mha(mha, num_random_features=64, seed=1)


def test_layouts_agree(gen):
    _, seq_first = _pair()
    _, batch_first = _pair(batch_first=True)
    x = torch.randn(5, 3, 32, generator=gen)  # (L, N, E)
    a, wa = seq_first(x, x, x)
    b, wb = batch_first(x.transpose(0, 1), x.transpose(0, 1), x.transpose(0, 1))
    assert a.shape == (5, 3, 32) and wa.shape == (3, 5, 5)
    torch.testing.assert_close(a, b.transpose(0, 1))
    torch.testing.assert_close(wa, wb)
    u, wu = seq_first(x[:, 1], x[:, 1], x[:, 1])
    assert u.shape == (5, 32) and wu.shape == (5, 5)
    torch.testing.assert_close(u, a[:, 1])
    _, w_heads = seq_first(x, x, x, average_attn_weights=False)
    assert w_heads.shape == (3, 4, 5, 5)
    torch.testing.assert_close(w_heads.sum(-1), torch.ones(3, 4, 5))


def test_weights_reproduce_output(gen):
    _, layer = _pair(batch_first=True)
    x = torch.randn(2, 7, 32, generator=gen)
    out, w = layer(x, x, x, average_attn_weights=False)
    v = nn.functional.linear(x, *[t.chunk(3)[2] for t in (layer.in_proj_weight, layer.in_proj_bias)])
    v = v.unflatten(-1, (4, 8)).transpose(1, 2)
    torch.testing.assert_close(out, layer.out_proj((w @ v).transpose(1, 2).flatten(2)))


def test_cross_attention_kdim_vdim(gen):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, kdim=12, vdim=20, batch_first=True)
    layer = RandMultiHeadAttention.from_mha(mha, num_random_features=32)
    assert layer.in_proj_weight is None and layer.k_proj_weight.shape == (32, 12)
    q = torch.randn(2, 5, 32, generator=gen)
    k = torch.randn(2, 9, 12, generator=gen)
    v = torch.randn(2, 9, 20, generator=gen)
    out, w = layer(q, k, v)
    assert out.shape == (2, 5, 32) and w.shape == (2, 5, 9)
    qh = nn.functional.linear(q, layer.q_proj_weight, layer.in_proj_bias[:32]).unflatten(-1, (4, 8)).transpose(1, 2)
    kh = nn.functional.linear(k, layer.k_proj_weight, layer.in_proj_bias[32:64]).unflatten(-1, (4, 8)).transpose(1, 2)
    vh = nn.functional.linear(v, layer.v_proj_weight, layer.in_proj_bias[64:]).unflatten(-1, (4, 8)).transpose(1, 2)
    ref = layer.out_proj(rand_attention(qh, kh, vh, layer.projection).transpose(1, 2).flatten(2))
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("bias_kv, zero_attn", [(True, False), (False, True), (True, True)])
def test_bias_kv_and_zero_attn(gen, bias_kv, zero_attn):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, add_bias_kv=bias_kv, add_zero_attn=zero_attn, batch_first=True)
    layer = RandMultiHeadAttention.from_mha(mha, num_random_features=32)
    x = torch.randn(2, 6, 32, generator=gen)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[1, :3] = True
    out, w = layer(x, x, x, key_padding_mask=mask)
    extra = int(bias_kv) + int(zero_attn)
    assert w.shape == (2, 6, 6 + extra)
    wq, wk, wv = layer.in_proj_weight.chunk(3)
    bq, bk, bv = layer.in_proj_bias.chunk(3)
    q, k, v = nn.functional.linear(x, wq, bq), nn.functional.linear(x, wk, bk), nn.functional.linear(x, wv, bv)
    if bias_kv:
        k = torch.cat([k, layer.bias_k.expand(2, 1, 32)], 1)
        v = torch.cat([v, layer.bias_v.expand(2, 1, 32)], 1)
    if zero_attn:
        k = torch.cat([k, torch.zeros(2, 1, 32)], 1)
        v = torch.cat([v, torch.zeros(2, 1, 32)], 1)
    heads = [t.unflatten(-1, (4, 8)).transpose(1, 2) for t in (q, k, v)]
    full_mask = torch.cat([mask, torch.zeros(2, extra, dtype=torch.bool)], 1)
    ref = rand_attention(*heads, layer.projection, key_padding_mask=full_mask)
    torch.testing.assert_close(out, layer.out_proj(ref.transpose(1, 2).flatten(2)))


def test_causal_flag_hint_and_mask_agree(gen):
    _, layer = _pair(batch_first=True)
    x = torch.randn(2, 10, 32, generator=gen)
    a, _ = layer(x, x, x, is_causal=True)
    b, _ = layer(x, x, x, attn_mask=nn.Transformer.generate_square_subsequent_mask(10))
    c, _ = layer(x, x, x, attn_mask=torch.ones(10, 10, dtype=torch.bool).triu(1))
    layer.causal = True
    d, w = layer(x, x, x)
    for t in (b, c, d):
        torch.testing.assert_close(a, t)
    assert (w.triu(1) == 0).all()
    x2 = x.clone()
    x2[:, 6:] = torch.randn(2, 4, 32)
    e, _ = layer(x2, x2, x2)
    torch.testing.assert_close(e[:, :6], d[:, :6])
    nc, _ = _pair(batch_first=True)[1](x, x, x)
    assert not torch.allclose(nc, a)


def test_unsupported_attn_mask_raises():
    _, layer = _pair(batch_first=True)
    x = torch.randn(2, 10, 32)
    bad = torch.zeros(10, 10, dtype=torch.bool)
    bad[0, 3] = True
    with pytest.raises(ValueError, match="attn_mask"):
        layer(x, x, x, attn_mask=bad)
    with pytest.raises(ValueError, match="attn_mask"):
        layer(x, x, x, attn_mask=torch.zeros(10, 10))


def test_state_dict_round_trips(gen):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=True)
    layer = RandMultiHeadAttention(32, 4, batch_first=True, num_random_features=16)
    before = layer.projection.clone()
    layer.load_state_dict(mha.state_dict(), strict=True)
    torch.testing.assert_close(layer.in_proj_weight, mha.in_proj_weight)
    torch.testing.assert_close(layer.projection, before)  # kept its draw
    assert "projection" in layer.state_dict()
    other = RandMultiHeadAttention(32, 4, batch_first=True, num_random_features=16)
    assert not torch.equal(other.projection, layer.projection)  # each layer gets its own draw
    other.load_state_dict(layer.state_dict(), strict=True)
    x = torch.randn(2, 5, 32, generator=gen)
    torch.testing.assert_close(other(x, x, x)[0], layer(x, x, x)[0], rtol=0, atol=0)


def test_seed_redraw_and_global_rng():
    torch.manual_seed(0)
    a = RandMultiHeadAttention(32, 4, seed=3, num_random_features=16)
    after_ours = torch.get_rng_state()
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4)
    # a seeded draw uses only the layer's own generator: the global stream moves exactly as for
    # nn.MultiheadAttention, whose parameter initialisation is reproduced
    assert torch.equal(torch.get_rng_state(), after_ours)
    torch.testing.assert_close(a.in_proj_weight, mha.in_proj_weight, rtol=0, atol=0)
    b = RandMultiHeadAttention(32, 4, seed=3, num_random_features=16)
    torch.testing.assert_close(a.projection, b.projection, rtol=0, atol=0)
    torch.manual_seed(5)
    first = torch.rand(3)
    torch.manual_seed(5)
    RandMultiHeadAttention(32, 4, num_random_features=16)
    assert not torch.equal(torch.rand(3), first)  # consumed the global stream, did not reseed it
    old = a.projection.clone()
    a.redraw_features()
    b.redraw_features()
    assert not torch.equal(a.projection, old)
    torch.testing.assert_close(a.projection, b.projection, rtol=0, atol=0)


def test_feature_redraw_interval_only_in_training():
    layer = RandMultiHeadAttention(32, 4, num_random_features=16, feature_redraw_interval=2, batch_first=True)
    x = torch.randn(1, 4, 32)
    draws = []
    for _ in range(5):
        layer(x, x, x)
        draws.append(layer.projection.clone())
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[1], draws[2])
    assert torch.equal(draws[2], draws[3]) and not torch.equal(draws[3], draws[4])
    layer.eval()
    outs = [layer(x, x, x)[0] for _ in range(4)]
    assert all(torch.equal(outs[0], o) for o in outs)


def test_dropout_in_training_only(gen):
    layer = RandMultiHeadAttention(32, 4, dropout=0.5, batch_first=True, num_random_features=16)
    x = torch.randn(2, 64, 32, generator=gen)
    a, _ = layer(x, x, x, need_weights=False)
    b, _ = layer(x, x, x, need_weights=False)
    assert not torch.allclose(a, b)
    layer.eval()
    c, _ = layer(x, x, x, need_weights=False)
    torch.testing.assert_close(c, layer(x, x, x, need_weights=False)[0])
    # inverted dropout keeps the expectation
    layer.train()
    mean = torch.stack([layer(x, x, x, need_weights=False)[0] for _ in range(200)]).mean(0)
    assert (mean - c).norm() / c.norm() < 0.2


@pytest.fixture
def count_calls(monkeypatch):
    """Count calls of the random-feature core without adding hooks (hooks alone disable fast paths)."""
    import randattn.modules

    calls = []
    for name in ("rand_attention", "projected_self_attention"):
        real = getattr(randattn.modules, name)

        def counting(*args, _real=real, **kwargs):
            calls.append(1)
            return _real(*args, **kwargs)

        monkeypatch.setattr(randattn.modules, name, counting)
    return calls


@pytest.mark.parametrize("training", [True, False])
def test_converted_transformer_encoder_runs_random_features(gen, training, count_calls):
    torch.manual_seed(0)
    enc_layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0, batch_first=True)
    enc = nn.TransformerEncoder(enc_layer, 2)
    enc.train(training)
    x = torch.randn(2, 12, 32, generator=gen)
    pad = torch.zeros(2, 12, dtype=torch.bool)
    pad[1, 8:] = True
    with torch.no_grad():
        exact = enc(x, src_key_padding_mask=pad)
        convert_mha(enc, num_random_features=16, kernel_fn="relu")
        approx = enc(x, src_key_padding_mask=pad)
        assert len(count_calls) == 2
        enc(x)  # no padding mask: the layer-level fast path is the one to avoid
    assert len(count_calls) == 4
    assert isinstance(enc.layers[0].self_attn, RandMultiHeadAttention)
    assert not enc.layers[0].self_attn.projection.equal(enc.layers[1].self_attn.projection)
    assert not torch.allclose(exact, approx, atol=1e-3)
    assert torch.isfinite(approx).all()


def test_convert_transformer_keeps_device_dtype_and_batch_first(gen, count_calls):
    torch.manual_seed(0)
    model = nn.Transformer(32, 4, 1, 1, dim_feedforward=64, dropout=0.0, batch_first=True, dtype=torch.float64)
    model.eval()
    convert_mha(model, num_random_features=16)
    attn = [m for m in model.modules() if isinstance(m, RandMultiHeadAttention)]
    assert len(attn) == 3 and all(a.batch_first and a.projection.dtype == torch.float32 for a in attn)
    assert all(a.in_proj_weight.dtype == torch.float64 for a in attn)
    src = torch.randn(2, 9, 32, generator=gen, dtype=torch.float64)
    tgt = torch.randn(2, 7, 32, generator=gen, dtype=torch.float64)
    mask = nn.Transformer.generate_square_subsequent_mask(7, dtype=torch.float64)
    out = model(src, tgt, tgt_mask=mask, tgt_is_causal=True)
    assert out.shape == (2, 7, 32) and len(count_calls) == 3
    # the decoder self-attention is causal: later target tokens do not change earlier outputs
    tgt2 = tgt.clone()
    tgt2[:, 5:] += 1.0
    torch.testing.assert_close(model(src, tgt2, tgt_mask=mask, tgt_is_causal=True)[:, :5], out[:, :5])


def test_bf16_on_cpu(gen):
    _, layer = _pair(batch_first=True)
    x = torch.randn(2, 33, 32, generator=gen)
    ref, _ = layer(x, x, x, need_weights=False)
    layer16 = layer.to(torch.bfloat16)
    out, _ = layer16(x.bfloat16(), x.bfloat16(), x.bfloat16(), need_weights=False)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).norm() / ref.norm() < 0.05
    out.float().sum().backward()
    assert torch.isfinite(layer16.in_proj_weight.grad).all()


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="divisible"):
        RandMultiHeadAttention(30, 4)
    with pytest.raises(ValueError, match="dropout"):
        RandMultiHeadAttention(32, 4, dropout=1.5)
    with pytest.raises(ValueError, match="kernel_fn"):
        RandMultiHeadAttention(32, 4, kernel_fn="tanh")
    with pytest.raises(ValueError, match="num_random_features"):
        RandMultiHeadAttention(32, 4, num_random_features=0)
    with pytest.raises(ValueError, match="backend"):
        RandMultiHeadAttention(32, 4, backend="cuda")
    with pytest.raises(TypeError):
        RandMultiHeadAttention(32, 4, 0.0, True, False, False, None, None, False, None, None, 16)  # keyword-only
    layer = RandMultiHeadAttention(32, 4, batch_first=True)
    x = torch.randn(2, 5, 32)
    with pytest.raises(ValueError, match="query must be 2-D"):
        layer(x[None], x[None], x[None])
    with pytest.raises(ValueError, match="query must have last dimension 32"):
        layer(x[..., :16], x, x)
    with pytest.raises(ValueError, match="same batch size"):
        layer(x, x[:1], x[:1])
    with pytest.raises(ValueError, match="same sequence length"):
        layer(x, x, x[:, :3])
    with pytest.raises(ValueError, match="same rank"):
        layer(x, x[0], x[0])
    with pytest.raises(ValueError, match="key_padding_mask must have shape"):
        layer(x, x, x, key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="key_padding_mask must be a bool or floating"):
        layer(x, x, x, key_padding_mask=torch.zeros(2, 5, dtype=torch.int32))
    with pytest.raises(ValueError, match="causal attention needs"):
        layer(x, x[:, :3], x[:, :3], is_causal=True)
    with pytest.raises(ValueError, match="one device"):
        layer(x, x.to("meta"), x)
    with pytest.raises(TypeError, match="nn.MultiheadAttention"):
        RandMultiHeadAttention.from_mha(nn.Linear(3, 3))


def test_convert_with_seed_gives_distinct_reproducible_layers():
    def build():
        torch.manual_seed(0)
        return convert_mha(
            nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64), 3, enable_nested_tensor=False), seed=7
        )

    a, b = build(), build()
    pa = [layer.self_attn.projection for layer in a.layers]
    pb = [layer.self_attn.projection for layer in b.layers]
    assert all(torch.equal(x, y) for x, y in zip(pa, pb))
    assert not torch.equal(pa[0], pa[1]) and not torch.equal(pa[1], pa[2])
