"""Hostile values for every entry point: NaN/inf inputs get the mathematical answer (nothing more), empty
batches and degenerate sizes work (see test_hostile.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from chronipatch import ops
from helpers import KERNEL_DEVICE, hf_view, needs_kernels
from hostile import (
    INF,
    LONG,
    NAN,
    PACKED,
    SANE,
    _attn,
    _cos_sin,
    _g,
    _hf_rms,
    _per_document,
    _qkv,
    _randn,
    cu10,
    lce_k,
    rms_k,
    rope_k,
    sane_attention,
    sane_lce,
    sane_rms_norm,
    sane_rope,
    sane_swiglu,
    swi_k,
)

# ---------------------------------------------------------------- NaN / inf: the math, nothing more


def _rms_call(impl, x, w, dy):
    if impl == "kernel":
        y, rstd = rms_k.rms_norm_fwd_triton(x, w, 1e-6)
        return (y, *rms_k.rms_norm_bwd_triton(dy, x, w, rstd))
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = ops.rms_norm(xg, wg, 1e-6)
    return (y.detach(), *torch.autograd.grad(y, (xg, wg), dy))


IMPLS = ["public", pytest.param("kernel", marks=needs_kernels)]


@pytest.mark.parametrize("impl", IMPLS)
def test_rms_norm_nan_row_stays_in_its_row(impl):
    dev = KERNEL_DEVICE if impl == "kernel" else "cpu"
    x, w = torch.randn(6, 40, generator=_g(1)), 1 + 0.1 * torch.randn(40, generator=_g(2))
    dy = torch.randn(6, 40, generator=_g(3))
    bad = x.clone()
    bad[2, 7] = NAN
    bad[4, 0] = INF
    x, bad, w, dy = (t.to(dev) for t in (x, bad, w, dy))
    y, dx, dw = _rms_call(impl, bad, w, dy)
    y_ok, dx_ok, _ = _rms_call(impl, x, w, dy)
    assert y[2].isnan().all() and dx[2].isnan().all()  # rstd of the row is NaN: the whole row is
    assert y[4, 0].isnan() and (y[4, 1:] == 0).all()  # x * rsqrt(inf) = inf * 0 at the inf, 0 elsewhere
    fine = [0, 1, 3, 5]
    assert torch.equal(y[fine], y_ok[fine]) and torch.equal(dx[fine], dx_ok[fine])
    assert dw.isnan().all()  # dw sums over every row, the NaN row included
    sane_rms_norm()


@pytest.mark.parametrize("impl", IMPLS)
def test_swiglu_non_finite_gate_matches_ieee_stock(impl):
    dev = KERNEL_DEVICE if impl == "kernel" else "cpu"
    g = torch.tensor([-INF, INF, NAN, -1e30, 1e30, -100.0, 0.0, 3.0], device=dev)
    u = torch.tensor([1.0, 2.0, 1.0, 1.0, 1.0, 5.0, NAN, -INF], device=dev)
    do = torch.ones(8, device=dev)
    stock = [F.silu(g) * u, *torch.autograd.grad(F.silu(gg := g.clone().requires_grad_()) * u, gg, do)]
    if impl == "kernel":
        out, (dg, du) = swi_k.swiglu_fwd_triton(g, u), swi_k.swiglu_bwd_triton(do, g, u)
    else:
        gg, uu = g.clone().requires_grad_(), u.clone().requires_grad_()
        out = ops.swiglu(gg, uu)
        dg, du = torch.autograd.grad(out, (gg, uu), do)
    torch.testing.assert_close(out, stock[0], equal_nan=True)
    torch.testing.assert_close(dg, stock[1], equal_nan=True)
    # finite, saturated gates stay finite: silu(-1e30) = -0, silu(1e30) * 1 = 1e30, silu(-100) ~ -4e-42
    assert out[3:6].isfinite().all() and dg[3:6].isfinite().all() and du[3:6].isfinite().all()
    assert out[1] == INF and out[2].isnan() and out[6].isnan() and out[7] == -INF
    sane_swiglu()


@pytest.mark.parametrize("impl", IMPLS)
def test_rope_nan_reaches_only_its_token_and_dim(impl):
    dev = KERNEL_DEVICE if impl == "kernel" else "cpu"
    q, k = hf_view(2, 5, 4, 8).to(dev), hf_view(2, 5, 2, 8).to(dev)
    cos, sin = (t.float().to(dev) for t in _cos_sin(2, 5, 8))
    q[1, 2, 3, 1] = NAN  # batch 1, head 2, token 3, dim 1 (first half)
    cos = cos.clone()
    cos[0, 4, 6] = NAN  # batch 0, token 4, dim 6 (second half)
    if impl == "kernel":
        qo, ko = rope_k.rope_triton(q, k, cos, sin)
    else:
        qo, ko = ops.rope(q, k, cos, sin)
    expect_q = torch.zeros_like(qo, dtype=torch.bool)
    expect_q[1, 2, 3, [1, 5]] = True  # the pair (1, 1 + D/2) rotates together
    expect_q[0, :, 4, 6] = True  # cos[..., 6] multiplies x[..., 6] only
    expect_k = torch.zeros_like(ko, dtype=torch.bool)
    expect_k[0, :, 4, 6] = True
    assert torch.equal(qo.isnan(), expect_q) and torch.equal(ko.isnan(), expect_k)
    sane_rope()


def _lce_rows(impl, h, w, labels):
    if impl == "kernel":
        return lce_k.lce_fwd_triton(h, w, labels, -100)
    loss, stats = ops.linear_cross_entropy(
        h, w, labels, shift=False, reduction="none", return_token_stats=True
    )
    return loss, None, stats.entropy, stats.correct


@pytest.mark.parametrize("impl", IMPLS)
def test_lce_nan_hidden_row(impl):
    dev = KERNEL_DEVICE if impl == "kernel" else "cpu"
    h, w = torch.randn(5, 8, generator=_g(1)).to(dev), torch.randn(11, 8, generator=_g(2)).to(dev)
    labels = torch.tensor([1, 2, 3, -100, 5], device=dev)
    h[2, 4] = NAN  # a supervised row
    h[3, 0] = NAN  # an ignored row: contributes exactly 0
    rows = _lce_rows(impl, h, w, labels)[0]
    ref = F.cross_entropy(h @ w.T, labels, reduction="none")
    assert rows[2].isnan() and rows[3] == 0
    torch.testing.assert_close(rows[[0, 1, 4]], ref[[0, 1, 4]])
    if impl == "public":
        keep = torch.tensor([True, True, False, True, True])
        mean = ops.linear_cross_entropy(h[keep], w, labels[keep], shift=False)  # ignored NaN row: finite
        torch.testing.assert_close(mean, F.cross_entropy(h[keep] @ w.T, labels[keep]))
        assert ops.linear_cross_entropy(h, w, labels, shift=False).isnan()
    sane_lce()


def test_attention_nan_query_stays_in_its_token():
    q, k, v = _qkv()
    q[0, 1, 5, 0] = NAN
    out, _ = _attn(q, k, v, **PACKED)
    bad = out.isnan().any(-1).any(-1)[0]  # per token
    assert bad.tolist() == [i == 5 for i in range(10)]
    assert out[0, 5, 1].isnan().all() and not out[0, 5, [0, 2, 3]].isnan().any()
    sane_attention()


def test_attention_mixed_dtypes_name_the_problem():
    q = _qkv(dtype=torch.float32)[0]
    with pytest.raises((ValueError, TypeError, RuntimeError), match="same dtype"):  # SDPA's own message
        _attn(q, *_qkv()[1:])
    sane_attention()


def test_attention_nan_key_stays_in_its_document():
    q, k, v = _qkv()
    k[0, 0, 2, 3] = NAN  # key 2 of document [0, 4), kv head 0 -> q heads 0 and 1
    out, _ = _attn(q, k, v, **PACKED)
    bad = out.isnan().any(-1)[0]  # [T, Hq]
    expect = torch.zeros(10, 4, dtype=torch.bool)
    expect[2:4, :2] = True  # queries 2 and 3 see key 2 (causal), the next document never does
    assert torch.equal(bad, expect)
    sane_attention()


# ---------------------------------------------------------------- empty batches and degenerate sizes


def test_zero_rows_forward_and_backward_every_op():
    x, w = torch.randn(0, 16, requires_grad=True), torch.randn(16, requires_grad=True)
    ops.rms_norm(x, w).sum().backward()
    assert x.grad.shape == (0, 16) and torch.equal(w.grad, torch.zeros(16))
    g, u = torch.randn(2, 0, 8, requires_grad=True), torch.randn(2, 0, 8, requires_grad=True)
    ops.swiglu(g, u).sum().backward()
    assert g.grad.shape == (2, 0, 8) and u.grad.shape == (2, 0, 8)
    for b, t in ((0, 3), (2, 0)):
        q, k = hf_view(b, t, 4, 8).requires_grad_(), hf_view(b, t, 2, 8).requires_grad_()
        cos, sin = torch.randn(1, t, 8), torch.randn(1, t, 8)
        qo, ko = ops.rope(q, k, cos, sin)
        (qo.sum() + ko.sum()).backward()
        assert qo.shape == q.shape and q.grad.shape == q.shape and k.grad.shape == k.shape
    hw = torch.randn(10, 8, requires_grad=True)
    for shape in ((0, 5), (3, 0), (0,)):
        hid = torch.randn(*shape, 8, requires_grad=True)
        labels = torch.zeros(shape, dtype=LONG)
        loss = ops.linear_cross_entropy(hid, hw, labels, shift=len(shape) > 1)
        loss.backward()
        assert loss.item() == 0.0 and hid.grad.shape == hid.shape and not hw.grad.any()
    for entry in ("rms_norm", "swiglu", "rope", "lce"):
        SANE[entry]()


@needs_kernels
def test_zero_rows_kernels():
    dev = KERNEL_DEVICE
    x, w = torch.randn(0, 16, device=dev), torch.randn(16, device=dev)
    y, rstd = rms_k.rms_norm_fwd_triton(x, w, 1e-6)
    dx, dw = rms_k.rms_norm_bwd_triton(x, x, w, rstd)
    assert y.shape == (0, 16) and dx.shape == (0, 16) and torch.equal(dw, torch.zeros_like(w))
    e = torch.randn(0, 8, device=dev)
    assert swi_k.swiglu_fwd_triton(e, e).shape == (0, 8) and swi_k.swiglu_bwd_triton(e, e, e)[0].shape == (
        0,
        8,
    )
    q = hf_view(2, 0, 4, 8).to(dev)
    assert rope_k.rope_triton(
        q, q[:, :2], torch.randn(1, 0, 8, device=dev), torch.randn(1, 0, 8, device=dev)
    )[0].shape == (2, 4, 0, 8)
    h, wv, labels = torch.randn(0, 8, device=dev), torch.randn(10, 8, device=dev), torch.zeros(0, dtype=LONG)
    loss, lse, _, _ = lce_k.lce_fwd_triton(h, wv, labels.to(dev), -100)
    dh, dwv = lce_k.lce_bwd_triton(loss, h, wv, labels.to(dev), lse, -100)
    assert loss.shape == (0,) and dh.shape == (0, 8) and not dwv.any()


def test_lce_all_ignored_with_num_items_and_every_reduction():
    h, w = torch.randn(2, 5, 8, requires_grad=True), torch.randn(10, 8, requires_grad=True)
    labels = torch.full((2, 5), -100)
    for kw in (
        dict(),
        dict(reduction="sum"),
        dict(num_items_in_batch=7),
        dict(num_items_in_batch=torch.tensor(7)),
    ):
        loss = ops.linear_cross_entropy(h, w, labels, **kw)
        assert loss.item() == 0.0
        (gh, gw) = torch.autograd.grad(loss, (h, w))
        assert not gh.any() and not gw.any()
    rows = ops.linear_cross_entropy(h, w, labels, reduction="none")
    assert rows.shape == (2, 5) and not rows.any()


def test_lce_first_label_is_never_predicted_under_shift():
    """Under shift no position predicts labels[..., 0]: any value there, even out of range, is unused."""
    h, w = _randn(2, 6, 8, seed=9), _randn(10, 8, seed=10)
    labels = torch.randint(0, 10, (2, 6), generator=_g(11))
    hostile = labels.clone()
    hostile[:, 0] = 10**6
    ref = labels.clone()
    ref[:, 0] = -100
    torch.testing.assert_close(ops.linear_cross_entropy(h, w, hostile), ops.linear_cross_entropy(h, w, ref))
    sane_lce()


@pytest.mark.parametrize("items", [0, -2])
def test_lce_non_positive_num_items(items):
    h, w, labels = _randn(4, 8, seed=12), _randn(10, 8, seed=13), torch.tensor([1, 2, 3, 4])
    with pytest.raises(ValueError, match=r"num_items_in_batch=.* cannot normalise a loss"):
        ops.linear_cross_entropy(h, w, labels, shift=False, num_items_in_batch=items)
    sane_lce()


def test_lce_zero_hidden_size():
    """H = 0 has no meaningful head: a ValueError naming the empty dimension."""
    with pytest.raises(ValueError, match="empty V or H"):
        ops.linear_cross_entropy(
            torch.randn(4, 0), torch.randn(10, 0), torch.tensor([1, 2, 3, 4]), shift=False
        )
    sane_lce()


def test_rms_norm_zero_width_and_one_width():
    assert ops.rms_norm(torch.randn(3, 0), torch.randn(0)).shape == (3, 0)
    x = torch.tensor([[-2.0], [0.5], [0.0]], dtype=torch.float64)
    w = torch.tensor([3.0], dtype=torch.float64)
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-12), _hf_rms(x, w, 1e-12))  # w * sign(x), 0 for 0


def test_attention_empty_and_zero_length_documents():
    q, k, v = _qkv(t=0)
    out, _ = _attn(q, k, v)
    assert out.shape == (1, 0, 4, 8)
    out, _ = _attn(q, k, v, cu_seq_lens_q=torch.tensor([0, 0]), max_length_q=0)
    assert out.shape == (1, 0, 4, 8)
    q, k, v = _qkv()
    cu = torch.tensor([0, 4, 4, 10, 10], dtype=torch.int32)  # empty documents in the middle and at the end
    out, _ = _attn(q, k, v, cu_seq_lens_q=cu, max_length_q=6)
    torch.testing.assert_close(out, _per_document(q, k, v, [0, 4, 10]), rtol=1e-12, atol=1e-12)
    sane_attention()


def test_attention_on_meta_without_packing():
    q, k, v = (t.to("meta") for t in _qkv())
    assert _attn(q, k, v)[0].shape == (1, 10, 4, 8)


def test_attention_on_meta_with_packing():
    q, k, v = (t.to("meta") for t in _qkv())
    meta = {**PACKED, "cu_seq_lens_q": cu10.to("meta"), "cu_seq_lens_k": cu10.to("meta")}
    assert _attn(q, k, v, **meta)[0].shape == (1, 10, 4, 8)


@pytest.mark.parametrize("ignored", [1, 3])  # 1 of 5: the full computation; 3 of 5: supervised rows only
def test_lce_nan_in_an_ignored_row_leaves_gradients_finite(ignored):
    """An ignored row takes no part in the loss, so a NaN in it reaches neither the loss nor a gradient
    (stock's 0 * nan does), whichever path the ignored fraction picks."""
    h, w = torch.randn(5, 8, generator=_g(1)), torch.randn(11, 8, generator=_g(2))
    labels = torch.tensor([1, 2, 3, 4, 5])
    labels[:ignored] = -100
    h[0, 3] = NAN
    hg, wg = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = ops.linear_cross_entropy(hg, wg, labels, shift=False)
    loss.backward()
    assert loss.isfinite() and hg.grad.isfinite().all() and wg.grad.isfinite().all()
    assert (hg.grad[:ignored] == 0).all()
    keep = labels != -100
    torch.testing.assert_close(loss, F.cross_entropy(h[keep] @ w.T, labels[keep]))
