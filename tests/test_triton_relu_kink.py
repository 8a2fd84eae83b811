"""ReLU features at the kink: logits within float32 rounding of zero must keep their float32 sign.

The gradient of a ReLU feature jumps where its logit ``x . w`` crosses zero, so a logit computed with
more error than float32 arithmetic can flip the feature's whole contribution to ``dk`` / ``dq``.
Every path uses the projection as the feature maps define it (``W d^{-1/4}`` rounded to bfloat16,
:func:`randattn.features.feature_projection`), so the kernels' logits of bfloat16 inputs are exact
products with float32 sums; a kernel whose projection differed from the reference's by one bfloat16
rounding (up to ``2^-8`` of each entry) would put every logit built below on a random side of zero.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from _triton_checks import DEVICE, rel_err, relu_kink_bounds, run, run_fp64  # noqa: E402

from randattn.features import scaled_projection  # noqa: E402


def kink_inputs(gen, d=32, m=32, length=24, at_kink=8, delta=2.0**-22):
    """Inputs whose first ``at_kink`` keys have every logit ``k_j . w'_i`` (``w' = W d^{-1/4}`` as the
    features use it, exact in bfloat16) at ``+-delta .. +-2 delta``: key ``j`` is ``(1, -1, 0, ...)``
    plus ``delta`` at coordinate ``2 + j``; every ``w'_i`` has two equal first coordinates and a
    coordinate ``2 + j`` of size 1 to 2, so the logit is ``delta w'_i[2 + j]``, exactly."""

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    q, k, v, dout = (rnd(1, 1, length, d).to(torch.bfloat16) for _ in range(4))
    wp = rnd(m, d) / d**0.5 * d**-0.25
    wp[:, 1] = wp[:, 0]
    own = 1 + torch.rand(m, at_kink, generator=gen, dtype=torch.float64)
    wp[:, 2 : 2 + at_kink] = own * torch.where(torch.rand(m, at_kink, generator=gen) < 0.5, -1.0, 1.0).double()
    wp = wp.to(torch.bfloat16).double()
    keys = torch.zeros(at_kink, d, dtype=torch.float64)
    keys[:, 0], keys[:, 1] = 1.0, -1.0
    keys[:, 2 : 2 + at_kink] = delta * torch.eye(at_kink, dtype=torch.float64)
    k[0, 0, :at_kink] = keys.to(torch.bfloat16)
    projection = (wp * d**0.25).float()
    assert torch.equal(scaled_projection(projection).double(), wp)  # survives the rounding
    logits = k[0, 0, :at_kink].double() @ wp.T
    return [t.to(DEVICE) for t in (q, k, v, projection, dout)], logits


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_relu_logits_near_zero_keep_their_sign_in_bfloat16(causal, gen):
    (q, k, v, projection, dout), logits = kink_inputs(gen)
    # the construction worked: those logits are tiny, yet many times the float32 rounding of the
    # sums they come from (terms of size ~0.1: ulp ~7e-9)
    assert logits.abs().min() >= 2.0**-22 and logits.abs().max() < 2.0**-20
    exact = run_fp64(q, k, v, projection, dout, None, "relu", causal)
    ref = run("reference", q, k, v, projection, dout, None, "relu", causal)
    tri = run("triton", q, k, v, projection, dout, None, "relu", causal)
    at_kink = logits.shape[0]
    dk = exact[2][0, 0, :at_kink]
    err_ref = rel_err(ref[2][0, 0, :at_kink], dk)
    err_tri = rel_err(tri[2][0, 0, :at_kink], dk)
    assert err_ref < 2e-2  # the float32 reference keeps the signs
    assert err_tri <= 2 * err_ref + 1e-3, f"dk of the keys at the kink: {err_tri:.2e} vs reference {err_ref:.2e}"


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_kink_bounds_cover_every_flip(causal, gen):
    """The tests' allowance for kink flips: the float64 gradients with every logit at the kink flipped
    stay within the bounds, and the unflipped gradients are those of the float64 formula."""
    (q, k, v, projection, dout), logits = kink_inputs(gen)
    exact = run_fp64(q, k, v, projection, dout, None, "relu", causal)
    (dq, bound_q), (dk, bound_k) = relu_kink_bounds(q, k, v, projection, dout, None, causal)
    (dq_f, _), (dk_f, _) = relu_kink_bounds(q, k, v, projection, dout, None, causal, flip="all")
    torch.testing.assert_close(dq, exact[1], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(dk, exact[2], rtol=1e-9, atol=1e-12)
    at_kink = logits.shape[0]
    moved = (dk_f - dk).abs()[0, 0, :at_kink]
    assert moved.amax() > 1e-3 * dk.abs().amax()  # the flips matter
    assert ((dk_f - dk).abs() <= bound_k * (1 + 1e-9) + 1e-15).all()
    assert ((dq_f - dq).abs() <= bound_q * (1 + 1e-9) + 1e-15).all()
