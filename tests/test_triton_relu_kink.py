"""ReLU features at the kink: logits within float32 rounding of zero must keep their float32 sign.

The gradient of a ReLU feature jumps where its logit ``x . w`` crosses zero, so a logit computed with
more error than float32 arithmetic can flip the feature's whole contribution to ``dk`` / ``dq``.
The kernels compute the logits of bfloat16 inputs from three bfloat16 parts of the float32
projection (``hi + lo + lo2``); with two parts, about half of the logits built below would flip.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from _triton_checks import DEVICE, rel_err, relu_kink_bounds, run, run_fp64  # noqa: E402


def kink_inputs(gen, d=32, m=32, length=24, at_kink=8, delta=1e-7):
    """Inputs whose first ``at_kink`` keys have every logit ``y_j . w_i'`` at ``+-delta .. +-2 delta``."""
    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    q, k, v, dout = (rnd(1, 1, length, d).to(torch.bfloat16) for _ in range(4))
    # the solved coordinates of those keys form 2 I: a well-conditioned system, so the float32
    # projection that solves it has entries of ordinary size (and ordinary rounding)
    k[0, 0, :at_kink, d - at_kink :] = 2 * torch.eye(at_kink)
    y = k[0, 0, :at_kink].double() * d**-0.25
    target = delta * (1 + torch.rand(m, at_kink, generator=gen, dtype=torch.float64))
    target = target * torch.where(torch.rand(m, at_kink, generator=gen) < 0.5, -1.0, 1.0).double()
    # w' = w d^-1/4 as the kernels scale it; solve its last `at_kink` coordinates for y_j . w'_i = target_ij
    wp = rnd(m, d) / d**0.5 * d**-0.25
    free, solved = slice(0, d - at_kink), slice(d - at_kink, d)
    rhs = target - wp[:, free] @ y[:, free].T
    wp[:, solved] = torch.linalg.solve(y[:, solved], rhs.T).T
    projection = (wp * d**0.25).float()
    logits = y @ (projection.double() * d**-0.25).T
    return [t.to(DEVICE) for t in (q, k, v, projection, dout)], logits


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_relu_logits_near_zero_keep_their_sign_in_bfloat16(causal, gen):
    (q, k, v, projection, dout), logits = kink_inputs(gen)
    # the construction worked: those logits are tiny, yet several times float32 rounding (~2e-8)
    assert logits.abs().min() > 5e-8 and logits.abs().max() < 4e-7
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
