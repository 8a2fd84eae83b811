"""Shared checks of the Triton kernels against the reference ops and a float64 formula.

The accuracy rule: the kernels' error against a float64 evaluation of the same formula is at most
twice the error of the reference op run in the same dtype (plus a tiny floor for float32, where both
errors are at the level of float32 rounding and their ratio is noise).
"""

from __future__ import annotations

import torch

from randattn.features import RELU_EPS, SOFTMAX_QUERY_FLOOR, draw_projection, feature_projection, scaled_projection
from randattn.functional import rand_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

#: Error floors below which the 2x comparison is not meaningful (relative Frobenius error).
FLOOR = {torch.float32: 2e-6, torch.float16: 0.0, torch.bfloat16: 0.0}
#: ReLU gradients jump where a projection ``x . w`` crosses zero; projections within rounding of zero
#: fall on either side in each evaluation (float64, reference, kernels), and each such flip changes a
#: whole feature's gradient. At GPU sizes (millions of projections) a few flips happen, so ReLU
#: gradients get this floor (measured on an H100: up to 1.6e-3 for ``dk`` of the causal float16
#: case at L=2048, d=32, m=64 in one of seven runs, 2.0e-4 for the reference), plus what
#: :func:`relu_kink_bounds` allows for the logits of the inputs at hand (one H100 draw of the causal
#: float16 case at L=1024, d=128, m=256: ``dq`` 3.8e-3 against the reference's 3.8e-4, with logits
#: at the kink that may move it by up to 5.3e-3).
RELU_GRAD_FLOOR = 2e-3
#: A ReLU logit ``l = q . w'`` with ``|l| <= KINK_TOL * sum_k |q_k w'_k|`` is "at the kink": any
#: float32-accurate evaluation (the reference's float32 products, the kernels' split or ``tf32x3``
#: products, a few units of 2^-22 of that sum) may put it on either side. :func:`relu_kink_bounds`
#: bounds what such flips alone can do to ``dq`` and ``dk``.
KINK_TOL = 2.0**-18


def _fp64_inputs(q, k, projection, key_bias):
    """Float64 scaled inputs ``x, y``, projection ``w`` (as the features use it: ``feature_projection``)
    and key bias ``b`` (broadcast over heads and features)."""
    d = q.shape[-1]
    b = 0.0 if key_bias is None else key_bias.double()[:, None, :, None]
    return q.double() * d**-0.25, k.double() * d**-0.25, feature_projection(projection), b


def fp64_softmax_features(q, k, projection, key_bias):
    """Float64 softmax features of the math notes: ``(x, y, w, sq, sk, phi_q, phi_k)``, the scaled
    inputs, the projection, the logits (without the key bias) and the features (with it)."""
    x, y, w, b = _fp64_inputs(q, k, projection, key_bias)
    sq = x @ w.T - 0.5 * (x * x).sum(-1, keepdim=True)
    sk = y @ w.T - 0.5 * (y * y).sum(-1, keepdim=True)
    phi_q = torch.exp(sq - sq.amax(-1, keepdim=True).detach()) + SOFTMAX_QUERY_FLOOR
    phi_k = torch.exp(sk - sk.amax(dim=(-2, -1), keepdim=True).detach() + b)
    return x, y, w, sq, sk, phi_q, phi_k


def fp64_attention(q, k, v, projection, kernel_fn, key_bias, causal):
    """The attention of the math notes evaluated directly in float64 (quadratic; small inputs only)."""
    if kernel_fn == "softmax":
        phi_q, phi_k = fp64_softmax_features(q, k, projection, key_bias)[5:]
    else:
        x, y, w, b = _fp64_inputs(q, k, projection, key_bias)
        m = projection.shape[0]
        phi_q = torch.relu(x @ w.T) * m**-0.5 + RELU_EPS
        phi_k = (torch.relu(y @ w.T) * m**-0.5 + RELU_EPS) * torch.exp(torch.as_tensor(b, dtype=torch.float64))
    return _combine(phi_q, phi_k, v.double(), causal)


def _combine(phi_q, phi_k, v, causal):
    """``(phi_q phi_k^T) v`` over its row sums (lower triangle when causal; empty rows give 0)."""
    a = phi_q @ phi_k.transpose(-2, -1)
    if causal:
        a = a.tril()
    num = a @ v
    den = a.sum(-1, keepdim=True)
    return num / torch.where(den == 0, torch.ones_like(den), den)


def _relu_logits(q, k, projection):
    """Float64 ReLU logits ``q W'^T``, ``k W'^T`` with ``W' = W d^{-1/4}`` as the features use it
    (``scaled_projection``), and ``W'``."""
    w = scaled_projection(projection).double()
    return q.double() @ w.T, k.double() @ w.T, w


def relu_kink_bounds(q, k, v, projection, dout, key_mask, causal, flip=None):
    """Float64 ``(dq, dk)`` of the ReLU attention and elementwise bounds on what kink flips can do.

    Each logit at the kink (see :data:`KINK_TOL`) may land on either side of zero; a flip changes
    ``dL/dl`` by the whole ``g = dL/d relu(l)``, so ``dq_i`` moves by at most
    ``sum_j |g_ij| |w'_j|`` over its flippable ``j`` (``dk`` alike). Returns
    ``((dq, bound_dq), (dk, bound_dk))``. ``flip``: ``"all"`` evaluates the gradients with every
    logit at the kink flipped (the test of these bounds).
    """
    lq, lk, w = _relu_logits(q, k, projection)
    m = projection.shape[0]
    near = [ll.abs() <= KINK_TOL * (t.double().abs() @ w.abs().T) for ll, t in ((lq, q), (lk, k))]
    leaves = [ll.detach().requires_grad_() for ll in (lq, lk)]
    r = [torch.relu(ll) for ll in leaves]
    if flip == "all":  # same values, the other side's derivative at the flippable logits
        r = [ri + nr * torch.where(ll > 0, -1.0, 1.0) * (ll - ll.detach()) for ri, nr, ll in zip(r, near, leaves)]
    g = [ri.detach().requires_grad_() for ri in r]
    scale = torch.exp(_bias(key_mask).double()[:, None, :, None]) if key_mask is not None else 1.0
    phi_q = g[0] * m**-0.5 + RELU_EPS
    phi_k = (g[1] * m**-0.5 + RELU_EPS) * scale
    out = _combine(phi_q, phi_k, v.double(), causal)
    dr = torch.autograd.grad(out, g, dout.double())
    dl = torch.autograd.grad(r, leaves, dr)
    return tuple(((d_l @ w), (nr * d_r.abs()) @ w.abs()) for d_l, d_r, nr in zip(dl, dr, near))


def make_inputs(n, h, length, s_len, d, dv, m, dtype, gen, scale=1.0, mask=None, device=DEVICE):
    """Random ``q, k, v, projection, dout`` and a key padding mask.

    ``mask``: ``None``, ``"bool"`` (some keys dropped, every key of batch element 1 dropped when
    ``n > 1``) or ``"float"`` (additive values in ``[-2, 1]`` and some ``-inf``).
    """
    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * s).to(device=device, dtype=dtype)

    q = rnd(n, h, length, d, s=scale)
    k = rnd(n, h, s_len, d, s=scale)
    v = rnd(n, h, s_len, dv)
    dout = rnd(n, h, length, dv)
    projection = draw_projection(m, d, generator=gen).to(device)
    key_mask = None
    if mask == "bool":
        key_mask = torch.rand(n, s_len, generator=gen) < 0.3
        if n > 1:
            key_mask[1] = True
        key_mask = key_mask.to(device)
    elif mask == "float":
        key_mask = (torch.rand(n, s_len, generator=gen) * 3 - 2).float()
        key_mask[torch.rand(n, s_len, generator=gen) < 0.2] = float("-inf")
        key_mask = key_mask.to(device)
    return q, k, v, projection, dout, key_mask


def _bias(key_mask):
    if key_mask is None:
        return None
    if key_mask.dtype == torch.bool:
        return torch.where(key_mask, float("-inf"), 0.0).float()
    return key_mask.float()


def run(backend, q, k, v, projection, dout, key_mask, kernel_fn, causal):
    """Output and gradients ``[out, dq, dk, dv]`` of ``rand_attention`` with one backend."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = rand_attention(*leaves, projection, kernel_fn=kernel_fn, causal=causal, key_padding_mask=key_mask,
                         backend=backend)
    out.backward(dout)
    return [out.detach()] + [t.grad for t in leaves]


def run_fp64(q, k, v, projection, dout, key_mask, kernel_fn, causal):
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out = fp64_attention(*leaves, projection, kernel_fn, _bias(key_mask), causal)
    out.backward(dout.double())
    return [out.detach()] + [t.grad for t in leaves]


def rel_err(a, ref):
    return ((a.double() - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def check_against_reference(q, k, v, projection, dout, key_mask, kernel_fn, causal, names=("out", "dq", "dk", "dv")):
    """Assert the 2x rule for the output and every gradient; returns the errors for reporting."""
    exact = run_fp64(q, k, v, projection, dout, key_mask, kernel_fn, causal)
    ref = run("reference", q, k, v, projection, dout, key_mask, kernel_fn, causal)
    tri = run("triton", q, k, v, projection, dout, key_mask, kernel_fn, causal)
    kinks = {}
    if kernel_fn == "relu":  # what flips of logits at the kink alone may add to dq and dk
        (_, bound_q), (_, bound_k) = relu_kink_bounds(q, k, v, projection, dout, key_mask, causal)
        kinks = {"dq": bound_q.norm().item(), "dk": bound_k.norm().item()}
    report = {}
    for name, e, r, t in zip(names, exact, ref, tri):
        assert t.dtype == q.dtype and t.shape == r.shape, name
        assert torch.isfinite(t).all(), f"{name} has non-finite values"
        err_t, err_r = rel_err(t, e), rel_err(r, e)
        kink = kinks.get(name, 0.0) / e.norm().clamp_min(1e-300).item()
        report[name] = (err_t, err_r)
        if kink:
            print(f"KINK {name}: kernel {err_t:.2e}, reference {err_r:.2e}, flips may add {kink:.2e}")
        floor = FLOOR[q.dtype]
        if kernel_fn == "relu" and name != "out":
            floor = max(floor, RELU_GRAD_FLOOR)
        assert err_t <= 2 * err_r + floor + kink, (
            f"{name}: kernel error {err_t:.3e} > 2 x reference {err_r:.3e} (+ kink flips {kink:.1e})"
        )
    return report


def check_forward_without_gradients(kernels, q, k, v, projection, lo_numel):
    """``kernels`` (a Triton op module) keeps the output (and ``lo_numel`` elements of a rest) for a
    backward only when gradients are needed: without, nothing is kept and the output is the same to
    the input dtype's rounding, and a call under ``torch.no_grad`` gives it bit for bit."""
    def count(t):  # what an op keeps: a tensor, an empty one or None
        return 0 if t is None else t.numel()

    out, (kept, lo, *_) = kernels.forward_saving(q, k, v, projection, "softmax", None, needs_grad=True)
    assert kept is out and count(lo) == lo_numel
    plain, (kept, lo, *_) = kernels.forward_saving(q, k, v, projection, "softmax", None, needs_grad=False)
    assert count(kept) == 0 and count(lo) == 0
    tol = 1e-5 if q.dtype == torch.float32 else 8e-3
    torch.testing.assert_close(plain, out, rtol=tol, atol=tol * out.abs().max().item())
    attention = kernels.causal_attention if hasattr(kernels, "causal_attention") else kernels.noncausal_attention
    with torch.no_grad():
        torch.testing.assert_close(attention(q, k, v, projection, "softmax", None), plain, rtol=0, atol=0)


def small_windows(kernels, monkeypatch, m, dv, nh=2, state_bytes=4):
    """Causal state windows of 2 chunks (interpreter) or 16 (GPU): a budget of 2 or 20 chunks of
    ``nh`` heads' ``(m, d_v)`` states (``state_bytes`` an element), in multiples of 2 or 16 chunks;
    ``kernels`` the causal Triton module."""
    cuda = DEVICE == "cuda"
    monkeypatch.setattr(kernels, "STABILISER_CHUNKS", 16 if cuda else 2)
    monkeypatch.setattr(kernels, "STATE_WINDOW_BYTES", (20 if cuda else 2) * nh * m * dv * state_bytes)
    monkeypatch.setattr(kernels, "STATE_WINDOW_PER_Q", 0)
    monkeypatch.setattr(kernels, "STATE_WINDOW_KV", 0)
