"""Softmax denominators that underflow without the query floor.

With an orthogonal projection (``m = d``), a query along projection row ``w_a`` and keys along row
``w_b`` have feature logits whose peak stands ``gap`` above every other feature, at different features.
Every product ``phi_q . phi_k`` is then about ``exp(-gap)``: a float32 denormal at ``gap = 95`` (whose
square, in the gradient of ``num / den``, is 0: inf and NaN gradients) and exactly 0 at ``gap = 120``
(an output of 0 instead of the attention). Trained models reach such logits (a character-level model
trained with bfloat16 autocast got NaN gradients after 1900 steps this way). Every query feature
carries the floor :data:`randattn.features.SOFTMAX_QUERY_FLOOR`, so every denominator is at least that.

All keys are equal, so exact attention (and the random-feature estimate) gives each query the mean of
the values (non-causal) or of the values up to its position (causal).
"""

from __future__ import annotations

import pytest
import torch
from _triton_checks import DEVICE, _bias, fp64_softmax_features, make_inputs, rel_err, run, run_fp64  # noqa: E402

from randattn.features import SOFTMAX_QUERY_FLOOR, draw_projection
from randattn.functional import rand_attention, triton_available

BACKENDS = ["reference", pytest.param("triton", marks=pytest.mark.skipif(not triton_available(), reason="no triton"))]


def peaked_inputs(gen, gap: float, d: int = 16, length: int = 40):
    """``q, k, v, projection, dout``: queries along row 0 of the projection, keys along row 1, with
    their feature logits ``gap`` above the other features'."""
    projection = draw_projection(d, d, generator=gen)
    gram = projection.double() @ projection.double().T
    assert torch.allclose(gram - torch.diag(gram.diag()), torch.zeros_like(gram), atol=1e-4)  # orthogonal rows

    def along(row):  # x . w_row = gap for the scaled input x = t * d^-1/4, and x . w_f = 0 otherwise
        w = projection[row].double()
        return (w / w.dot(w) * gap * d**0.25).float()

    q = along(0).expand(1, 2, length, d).contiguous()
    k = along(1).expand(1, 2, length, d).contiguous()
    v = torch.randn(1, 2, length, d, generator=gen)
    dout = torch.randn(1, 2, length, d, generator=gen)
    return [t.to(DEVICE) for t in (q, k, v, projection, dout)]


def test_floor_keeps_gradients_finite_and_attention_sharp():
    # at least 1e-19: 1 / den**2 must stay within float32; far below the features' own scale (the
    # largest query feature is 1), since the floor adds to every attention weight
    assert 1e-19 < SOFTMAX_QUERY_FLOOR <= 1e-8


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("gap", [95.0, 120.0])
def test_peaked_features_give_the_attention_and_finite_gradients(backend, causal, gap, gen):
    q, k, v, projection, dout = peaked_inputs(gen, gap)
    with torch.no_grad():  # the construction: the query and key features are (numerically) one-hot
        x = q.double() * q.shape[-1] ** -0.25
        s = x @ projection.double().T - 0.5 * (x * x).sum(-1, keepdim=True)
        top2 = s[0, 0, 0].topk(2).values
        assert abs((top2[0] - top2[1]).item() - gap) < 1e-2
    out, dq, dk, dv = run(backend, q, k, v, projection, dout, None, "softmax", causal)
    for name, t in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv)):
        assert torch.isfinite(t).all(), f"{name} has non-finite values"
    # equal keys: the attention of query i is the mean of the values it sees
    count = torch.arange(1, v.shape[2] + 1, dtype=torch.float64, device=v.device)[:, None]
    expected = v.double().cumsum(2) / count if causal else v.double().mean(2, keepdim=True).expand_as(v)
    # the feature logits here reach |s| ~ 400, whose float32 rounding (ulp ~3e-5) may differ between
    # equal keys computed in different tiles: their weights then differ by that much, relatively
    # (without the floor the outputs are 0 or NaN)
    with torch.no_grad():
        y = k.double() * k.shape[-1] ** -0.25
        largest = max(s.abs().max().item(), (y @ projection.double().T - 0.5 * (y * y).sum(-1, keepdim=True)).abs().max().item())
    tol = 4 * largest * 2.0**-23
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)
    # and every gradient is the float64 formula's
    exact = run_fp64(q, k, v, projection, dout, None, "softmax", causal)
    for name, got, want in zip(("dq", "dk", "dv"), (dq, dk, dv), exact[1:]):
        scale = want.abs().max().item() + 1.0
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4 * scale, msg=name)


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_bfloat16_autocast_layer_stays_finite(causal, gen):
    q, k, v, projection, dout = peaked_inputs(gen, 95.0)
    leaves = [t.to(torch.bfloat16).requires_grad_() for t in (q, k, v)]
    out = rand_attention(*leaves, projection, causal=causal, backend="reference")
    out.backward(dout.to(torch.bfloat16))
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(t.grad).all() for t in leaves)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_dropped_key_with_the_largest_logit_does_not_set_the_scale(backend, causal, gen):
    """The key scale counts kept keys only. Here the dropped key 0 has logits near 0 and every kept key
    logits about 250 lower: scaled by the dropped key, the kept keys' features underflow to 0 (zero
    outputs); scaled by the kept keys, the result is the float64 formula's."""
    q, k, v, projection, dout, _ = make_inputs(1, 2, 40, 40, 16, 16, 32, torch.float32, gen)
    k[:, :, 1:] = k[:, :, 1:] / k[:, :, 1:].norm(dim=-1, keepdim=True) * 49.0
    k[:, :, 0] *= 0.1
    mask = torch.zeros(1, 40, dtype=torch.bool, device=DEVICE)
    mask[0, 0] = True
    with torch.no_grad():
        y = k.double() * 16**-0.25
        s = (y @ projection.double().T - 0.5 * (y * y).sum(-1, keepdim=True)).amax(-1)
        assert (s[:, :, 0] - s[:, :, 1:].amax(-1) > 150).all()
    exact = run_fp64(q, k, v, projection, dout, mask, "softmax", causal)
    got = run(backend, q, k, v, projection, dout, mask, "softmax", causal)
    # scaled by the dropped key, outputs and gradients are 0 (error 1)
    for name, g, e in zip(("out", "dv"), (got[0], got[3]), (exact[0], exact[3])):
        assert torch.isfinite(g).all(), name
        assert rel_err(g, e) < 1e-4, f"{name}: {rel_err(g, e):.2e}"
    # dq and dk are sums of terms that cancel: for some draws the exact dq is 1e-4 of its terms, so
    # they are judged against their terms' float32 rounding (which the reference op meets with a
    # margin of 50 or more over 80 draws), not against their own size
    for name, g, e, bound in zip(("dq", "dk"), got[1:3], exact[1:3], float32_gradient_bounds(q, k, v, projection, dout, mask, causal)):
        assert torch.isfinite(g).all(), name
        err = (g.double() - e).norm().item()
        assert err <= bound, f"{name}: error {err:.2e}, bound {bound:.2e} (|{name}| {e.norm().item():.2e})"


def float32_gradient_bounds(q, k, v, projection, dout, key_mask, causal):
    """Bounds on the float32 rounding error of the softmax ``dq`` and ``dk`` (norms over all rows).

    With ``G = dL/ds`` the gradients of the feature logits ``s``, ``dq = d^{-1/4} (G W - x sum_m G)``;
    ``G[i, m] = phi_q[i, m] sum_j a_ij dout_i . (v_j - out_i) / den_i`` (``a`` the kept pairs) is itself a
    difference. Every term is bounded by its absolute value; the logits carry an absolute float32
    rounding error of about ``eps |s|``, which the features turn into a relative one. The bound is
    ``eps max|s|`` times the norm of the terms' absolute values.
    """
    d = q.shape[-1]
    x, y, w, sq, sk, phi_q, phi_k = fp64_softmax_features(q, k, projection, _bias(key_mask))
    kept_sk = sk.masked_select(~key_mask[:, None, :, None])
    a = phi_q @ phi_k.transpose(-2, -1)
    keep = torch.ones_like(a).tril() if causal else torch.ones_like(a)
    den = (a * keep).sum(-1, keepdim=True)
    den = torch.where(den == 0, torch.ones_like(den), den)  # rows with no kept key: output 0
    out = (a * keep) @ v.double() / den
    pair = dout.double().norm(dim=-1, keepdim=True) * (v.double().norm(dim=-1)[..., None, :] + out.norm(dim=-1, keepdim=True))
    pair = pair * keep / den
    terms_q, terms_k = phi_q * (pair @ phi_k), phi_k * (pair.transpose(-2, -1) @ phi_q)
    largest = max(sq.abs().max().item(), kept_sk.abs().max().item())
    return [
        2.0**-24 * largest * (d**-0.25 * (t @ w.abs() + z.abs() * t.sum(-1, keepdim=True))).norm().item()
        for t, z in ((terms_q, x), (terms_k, y))
    ]
