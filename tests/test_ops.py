"""Each op against the stock HF module (fp64 truth), zero rows and bad input; the loss's further cases are in
``test_ops_lce.py``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from chronipatch import ops
from helpers import assert_no_worse_than_stock, hf_view, rope_cos_sin, saved_bytes

OPS = torch.ops.chronipatch
ROWS = [1, 7, 127, 4099]
HIDDEN = [64, 896, 1000]


def _grads(out, inputs, grad=None):
    grad = torch.randn_like(out) if grad is None else grad
    return out, torch.autograd.grad(out, inputs, grad), grad


# ------------------------------------------------------------------ RMSNorm


def _hf_norm(x, w, eps):
    if x.dtype == torch.float64:  # the HF module computes in fp32; its math in fp64 is the truth
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))
    norm = LlamaRMSNorm(x.shape[-1], eps=eps).to(device=w.device, dtype=w.dtype)
    return torch.func.functional_call(norm, {"weight": w}, (x,))


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("n", HIDDEN)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rms_norm_matches_hf(rows, n, dtype):
    torch.manual_seed(rows * n)
    x = torch.randn(rows, n, dtype=torch.float64) * 3
    w = torch.randn(n, dtype=torch.float64)
    xt, wt = x.to(dtype).requires_grad_(), w.to(dtype).requires_grad_()
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    y, (dx, dw), g = _grads(ops.rms_norm(xt, wt, 1e-6), (xt, wt))
    y_ref, (dx_ref, dw_ref), _ = _grads(_hf_norm(xr, wr, 1e-6), (xr, wr), g.double())
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(y.double(), y_ref, **tol)
    torch.testing.assert_close(dx.double(), dx_ref, **tol)
    # dw sums `rows` products: allow their rounding to add up like a random walk.
    torch.testing.assert_close(dw.double(), dw_ref, rtol=tol["rtol"], atol=tol["atol"] * rows**0.5)


@pytest.mark.parametrize("layout", ["view", "transposed", "sliced"])
def test_rms_norm_leading_dims_and_views(layout):
    # Qwen3's q_norm sees [B, T, H, D] views of a projection; strided rows must read right too.
    torch.manual_seed(0)
    x = torch.randn(2, 5, 3 * 64, dtype=torch.float64).view(2, 5, 3, 64)
    if layout == "transposed":
        x = x.transpose(1, 2)  # [B, H, T, D], rows not evenly strided
    elif layout == "sliced":
        x = torch.randn(2, 5, 3, 80, dtype=torch.float64)[..., 8:72]  # row stride 80, not 64
    assert x.is_contiguous() == (layout == "view")
    w = torch.randn(64, dtype=torch.float64, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    x = x.detach().requires_grad_()
    y, (dx, dw), g = _grads(ops.rms_norm(x, w, 1e-6), (x, w))
    y_ref, (dx_ref, dw_ref), _ = _grads(_hf_norm(xr, w, 1e-6), (xr, w), g)
    for a, b in ((y, y_ref), (dx, dx_ref), (dw, dw_ref)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------ SwiGLU


@pytest.mark.parametrize("shape", [(1, 64), (7, 896), (3, 5, 1000), (4099, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_swiglu_matches_hf(shape, dtype):
    torch.manual_seed(sum(shape))
    g64, u64 = torch.randn(shape, dtype=torch.float64) * 4, torch.randn(shape, dtype=torch.float64)
    g, u = g64.to(dtype).requires_grad_(), u64.to(dtype).requires_grad_()
    gr, ur = g64.clone().requires_grad_(), u64.clone().requires_grad_()
    out, grads, do = _grads(ops.swiglu(g, u), (g, u))
    ref, grads_ref, _ = _grads(F.silu(gr) * ur, (gr, ur), do.double())
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.double(), ref, **tol)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a.double(), b, **tol)


# ------------------------------------------------------------------ SwiGLU + down projection


def _hf_mlp_tail(g, u, w, b):
    return F.linear(F.silu(g) * u, w, b)


@pytest.mark.parametrize("shape,out", [((1, 64), 8), ((7, 896), 33), ((3, 5, 1000), 64), ((4099, 64), 17)])
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_swiglu_linear_matches_hf(shape, out, bias, dtype):
    torch.manual_seed(sum(shape) + out)
    f64 = dict(dtype=torch.float64)
    truth = [torch.randn(shape, **f64) * 4, torch.randn(shape, **f64), torch.randn(out, shape[-1], **f64) / 8]
    truth += [torch.randn(out, **f64)] if bias else [None]
    mine = [t.to(dtype).requires_grad_() if t is not None else None for t in truth]
    ref = [t.clone().requires_grad_() if t is not None else None for t in truth]
    used = lambda ts: [t for t in ts if t is not None]
    y, grads, do = _grads(ops.swiglu_linear(*mine), used(mine))
    y_ref, grads_ref, _ = _grads(_hf_mlp_tail(*ref), used(ref), do.double())
    if dtype == torch.float64:
        torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
        rows = y.numel() // out  # dW and db sum over rows: their rounding adds up like a random walk
        for a, b in zip(grads, grads_ref):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12 * rows**0.5)
        return
    # fp32: a 1000-term sum's rounding depends on the CPU's BLAS kernels (1.2e-5 off the truth on one
    # machine where 1e-5 held on another), so the bound is the stock module's own fp32 error.
    stock = [t.detach().float().requires_grad_() if t is not None else None for t in truth]
    y_st, grads_st, _ = _grads(_hf_mlp_tail(*stock), used(stock), do)
    assert_no_worse_than_stock(y, y_st, y_ref, dtype, what="out")
    for name, a, b, t in zip(("gate", "up", "weight", "bias"), grads, grads_st, grads_ref):
        assert_no_worse_than_stock(a, b, t, dtype, what=name)


def test_swiglu_linear_frozen_weight_and_views():
    """A frozen projection gets no dW (and needs no h); gate/up given as views of one [N, 2I] tensor."""
    torch.manual_seed(0)
    gu = torch.randn(2, 9, 2 * 24, dtype=torch.float64, requires_grad=True)
    w = torch.randn(16, 24, dtype=torch.float64)
    g, u = gu[..., :24], gu[..., 24:]
    assert not g.is_contiguous()
    y = ops.swiglu_linear(g, u, w)
    (dgu,) = torch.autograd.grad(y, gu, torch.ones_like(y))
    gu_ref = gu.detach().clone().requires_grad_()
    y_ref = _hf_mlp_tail(gu_ref[..., :24], gu_ref[..., 24:], w, None)
    (dgu_ref,) = torch.autograd.grad(y_ref, gu_ref, torch.ones_like(y_ref))
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dgu, dgu_ref, rtol=1e-12, atol=1e-12)


def test_swiglu_linear_keeps_no_product():
    """What autograd keeps for the backward: gate, up and the weight, not the [N, I] product (which
    stock's F.linear keeps), so this test fails if h is saved again."""
    torch.manual_seed(0)
    g, u = torch.randn(64, 96, requires_grad=True), torch.randn(64, 96, requires_grad=True)
    w = torch.randn(32, 96, requires_grad=True)

    inputs = g.nbytes + u.nbytes + w.nbytes
    assert saved_bytes(lambda: ops.swiglu_linear(g, u, w)) == inputs
    assert saved_bytes(lambda: _hf_mlp_tail(g, u, w, None)) >= inputs + g.nbytes  # stock keeps h as well


def test_swiglu_linear_autocast_like_linear():
    """Under autocast the weight is cast as F.linear would cast it; gate in another dtype than autocast's
    takes the composition (h rounded after its computation): either way the result is the unfused
    ``F.linear(ops.swiglu(g, u), w)``'s, bit for bit."""
    torch.manual_seed(0)
    w = torch.randn(16, 24, requires_grad=True)
    for g in (torch.randn(5, 24).bfloat16(), torch.randn(5, 24)):
        u = torch.randn_like(g)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = ops.swiglu_linear(g, u, w)
            y_ref = F.linear(ops.swiglu(g, u), w)
        assert y.dtype == y_ref.dtype == torch.bfloat16
        torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
        (dw,), (dw_ref,) = torch.autograd.grad(y.sum(), w), torch.autograd.grad(y_ref.sum(), w)
        assert dw.dtype == torch.float32
        torch.testing.assert_close(dw, dw_ref, rtol=0, atol=0)


# ------------------------------------------------------------------ RoPE


@pytest.mark.parametrize(
    "b,t,hq,hk,d,cos_b",
    [(1, 1, 2, 1, 8, 1), (2, 7, 14, 2, 64, 2), (2, 127, 16, 8, 128, 1), (1, 33, 4, 4, 96, 1)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rope_matches_hf(b, t, hq, hk, d, cos_b, dtype):
    torch.manual_seed(t)
    q64, k64 = hf_view(b, t, hq, d, dtype=torch.float64), hf_view(b, t, hk, d, dtype=torch.float64)
    cos, sin = rope_cos_sin(cos_b, t, d)
    q, k = q64.to(dtype).requires_grad_(), k64.to(dtype).requires_grad_()
    qr, kr = q64.clone().requires_grad_(), k64.clone().requires_grad_()
    qo, ko = ops.rope(q, k, cos.to(dtype), sin.to(dtype))
    qo_ref, ko_ref = apply_rotary_pos_emb(qr, kr, cos, sin)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(qo.double(), qo_ref, **tol)
    torch.testing.assert_close(ko.double(), ko_ref, **tol)
    gq, gk = hf_view(b, t, hq, d, dtype=torch.float64), hf_view(b, t, hk, d, dtype=torch.float64)
    dq, dk = torch.autograd.grad((qo, ko), (q, k), (gq.to(dtype), gk.to(dtype)))
    dq_ref, dk_ref = torch.autograd.grad((qo_ref, ko_ref), (qr, kr), (gq, gk))
    torch.testing.assert_close(dq.double(), dq_ref, **tol)
    torch.testing.assert_close(dk.double(), dk_ref, **tol)


def test_rope_output_keeps_hf_layout():
    q, k = hf_view(2, 5, 4, 8), hf_view(2, 5, 2, 8)
    cos, sin = rope_cos_sin(2, 5, 8, torch.float32)
    qo, ko = ops.rope(q, k, cos, sin)
    assert qo.stride() == q.stride() and ko.stride() == k.stride()
    assert not qo.is_contiguous()


def test_rope_dense_outputs_are_contiguous_with_the_same_values():
    q, k = hf_view(2, 5, 4, 8).requires_grad_(), hf_view(2, 5, 2, 8).requires_grad_()
    cos, sin = rope_cos_sin(2, 5, 8, torch.float32)
    views = ops.rope(q, k, cos, sin)
    dense = ops.rope(q, k, cos, sin, dense=True)
    grads = [torch.randn_like(o) for o in views]
    for a, b in zip(views, dense):
        assert b.is_contiguous() and torch.equal(a, b)
    for a, b in zip(torch.autograd.grad(views, (q, k), grads), torch.autograd.grad(dense, (q, k), grads)):
        assert torch.equal(a, b) and a.stride() == b.stride()  # input grads keep the projections' layout


def test_zero_rows():
    w = torch.randn(64, requires_grad=True)
    assert ops.rms_norm(torch.randn(0, 64), w).shape == (0, 64)
    assert ops.swiglu(torch.randn(0, 8), torch.randn(0, 8)).shape == (0, 8)
    g = torch.randn(0, 8, requires_grad=True)
    w = torch.randn(3, 8, requires_grad=True)
    y = ops.swiglu_linear(g, g, w)
    y.sum().backward()
    assert y.shape == (0, 3) and w.grad.abs().sum() == 0
    loss = ops.linear_cross_entropy(
        torch.randn(0, 8), torch.randn(5, 8), torch.zeros(0, dtype=torch.long), shift=False
    )
    assert loss.item() == 0.0


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: ops.rms_norm(torch.randn(3, 8), torch.randn(7)), "rms_norm: weight shape"),
        (lambda: ops.rms_norm(torch.ones(3, 8, dtype=torch.long), torch.randn(8)), "rms_norm: x and weight"),
        (lambda: ops.swiglu(torch.randn(3, 8), torch.randn(3, 9)), "swiglu: gate"),
        (lambda: ops.swiglu(torch.randn(3, 8), torch.randn(3, 8).double()), "swiglu: up has dtype"),
        (
            lambda: ops.swiglu_linear(torch.randn(3, 8), torch.randn(3, 8), torch.randn(4, 9)),
            r"swiglu_linear: weight \(4, 9\) does not match gate \(3, 8\)",
        ),
        (
            lambda: ops.swiglu_linear(
                torch.randn(3, 8), torch.randn(3, 8), torch.randn(4, 8), torch.randn(5)
            ),
            r"swiglu_linear: bias \(5,\) does not match weight \(4, 8\)",
        ),
        (
            lambda: ops.swiglu_linear(torch.randn(3, 8), torch.randn(3, 7), torch.randn(4, 8)),
            "swiglu_linear: gate",
        ),
        (
            lambda: ops.swiglu_linear(torch.randn(3, 8), torch.randn(3, 8), torch.randn(4, 8).double()),
            "swiglu_linear: weight has dtype",
        ),
        (
            lambda: ops.rope(
                torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8), torch.randn(1, 3, 6), torch.randn(1, 3, 6)
            ),
            "rope: cos/sin",
        ),
        (
            lambda: ops.rope(
                torch.randn(2, 3, 8), torch.randn(1, 2, 3, 8), torch.randn(1, 3, 8), torch.randn(1, 3, 8)
            ),
            "rope: q and k must be",
        ),
        (
            lambda: ops.rope(
                torch.randn(1, 2, 3, 7), torch.randn(1, 2, 3, 7), torch.randn(1, 3, 7), torch.randn(1, 3, 7)
            ),
            "rope: head dim must be even",
        ),
        (
            lambda: ops.linear_cross_entropy(
                torch.randn(4, 8), torch.randn(10, 8), torch.tensor([0, 1, 10, 2]), shift=False
            ),
            "label 10 outside",
        ),
        (
            lambda: ops.linear_cross_entropy(
                torch.randn(4, 8), torch.randn(10, 8), torch.tensor([0, 1, -5, 2]), shift=False
            ),
            "label -5 outside",
        ),
        (
            lambda: ops.linear_cross_entropy(
                torch.randn(4, 8), torch.randn(10, 7), torch.zeros(4, dtype=torch.long)
            ),
            "does not match weight",
        ),
        (
            lambda: ops.linear_cross_entropy(
                torch.randn(4, 8), torch.randn(10, 8).half(), torch.zeros(4, dtype=torch.long)
            ),
            "weight has dtype",
        ),
        (
            lambda: ops.linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4)),
            "labels must be integer",
        ),
        (
            lambda: ops.linear_cross_entropy(
                torch.randn(4, 8), torch.randn(10, 8), torch.zeros(3, dtype=torch.long)
            ),
            "labels \\(3,\\) must match",
        ),
    ],
)
def test_bad_input_is_named(call, match):
    with pytest.raises(ValueError, match=match):
        call()
