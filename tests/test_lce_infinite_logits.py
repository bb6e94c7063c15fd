"""Infinite logits: an overflow of the fp32 logit gets the mathematical answer on every path (a +inf logit
takes all the probability, a -inf one none), and an fp16 logit past fp16's range stays finite."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from chronipatch import ops
from chronipatch.ops import reference
from helpers import KERNEL_DEVICE, needs_kernels, small_lce_tiles
from hostile import INF, _g, lce_k, sane_lce
from test_hostile_numerics import IMPLS, _lce_rows


def _overflow_case(sign: float):
    """bf16 hidden/weight whose fp32 logit [1, 2] = 2^64 * 2^64 overflows to sign*inf; row 1's other logits
    are powers of two (exact in fp32 and bf16, whatever the GEMM's order), rows 0 and 2 small and finite."""
    h = (torch.randn(3, 4, generator=_g(4)) * 0.5).bfloat16()
    w = (torch.randn(5, 4, generator=_g(5)) * 0.1).bfloat16()
    h[[0, 2], 0] = 0.0
    h[1, 0] = 2.0**64
    w[:, 0] = torch.tensor([2.0**-3, -(2.0**-2), sign * 2.0**64, -sign * 2.0**60, 2.0**-1])
    logits = _logits32(h, w)
    assert (
        logits[1, 2] == sign * INF
        and logits[[0, 2]].isfinite().all()
        and logits[1, [0, 1, 3, 4]].isfinite().all()
    )
    return h, w


def _wide_vocab_case(col: int | None, sign: float):
    """bf16 hidden [3, 4] and weight [3000, 4] (94 tiles of 32 columns): with ``col``, row 1's fp32 logit
    there is 2^64 * (sign * 2^64), sign*inf, its other logits finite (weights clamped to +-0.5) and rows 0 and
    2 small; without, small random logits."""
    h = (torch.randn(3, 4, generator=_g(6)) * 0.5).bfloat16()
    w = (torch.randn(3000, 4, generator=_g(7)) * 0.1).bfloat16()
    if col is not None:
        h[[0, 2], 0] = 0.0
        w[:, 0] = w[:, 0].clamp(-0.5, 0.5)
        h[1, 0], w[col, 0] = 2.0**64, sign * 2.0**64
    return h, w


def _logits32(h, w):
    """The logits the op takes its softmax over: the GEMM's fp32 accumulator, not rounded to bf16."""
    return h.float() @ w.float().T


def test_lce_fp16_logit_beyond_fp16_range_stays_finite():
    """An fp16 logit past 65504 overflows stock's fp16 lm_head output (its loss is nan or inf); the op keeps
    logits in fp32 and gives the true, finite loss."""
    h = (torch.randn(3, 4, generator=_g(4)) * 0.5).half()
    w = (torch.randn(5, 4, generator=_g(5)) * 0.1).half()
    h[1, 0], w[2, 0] = 300.0, 300.0
    labels = torch.tensor([0, 1, 3])
    assert (h @ w.T)[1, 2] == INF
    assert not F.cross_entropy((h @ w.T).float(), labels, reduction="none")[1].isfinite()
    truth = F.cross_entropy(h.double() @ w.double().T, labels, reduction="none")
    rows = ops.linear_cross_entropy(h, w, labels, shift=False, reduction="none")
    assert rows.isfinite().all() and truth[1] > 8e4
    torch.testing.assert_close(rows.double(), truth, rtol=1e-6, atol=1e-5)
    hg, wg = h.clone().requires_grad_(), w.clone().requires_grad_()
    ops.linear_cross_entropy(hg, wg, labels, shift=False).backward()
    assert hg.grad.isfinite().all() and wg.grad.isfinite().all()


def test_lce_plus_inf_logit_public():
    """A +inf logit takes all probability: label elsewhere -> loss +inf (p_y = 0); other rows untouched."""
    h, w = _overflow_case(+1.0)
    labels = torch.tensor([0, 1, 3])
    rows = ops.linear_cross_entropy(h, w, labels, shift=False, reduction="none")
    stock = F.cross_entropy(_logits32(h, w), labels, reduction="none")
    assert rows[1] == INF
    torch.testing.assert_close(rows[[0, 2]], stock[[0, 2]])
    assert not ops.linear_cross_entropy(h, w, labels, shift=False).isfinite()
    # As the kernels: entropy 0 on that row, loss 0 with the label on the +inf logit, finite gradients.
    _, stats = ops.linear_cross_entropy(h, w, labels, shift=False, reduction="none", return_token_stats=True)
    assert stats.entropy[1] == 0 and stats.entropy.isfinite().all()
    on_it = ops.linear_cross_entropy(h, w, torch.tensor([0, 2, 3]), shift=False, reduction="none")
    assert on_it[1] == 0 and on_it[[0, 2]].isfinite().all()
    hg, wg = h.clone().requires_grad_(), w.clone().requires_grad_()
    ops.linear_cross_entropy(hg, wg, labels, shift=False, reduction="none").backward(
        torch.tensor([1.0, 0, 1])
    )
    assert hg.grad.isfinite().all() and wg.grad.isfinite().all()
    sane_lce()


@needs_kernels
def test_lce_plus_inf_logit_kernel():
    """The kernels meet the +inf logit as the math does: the row's loss is +inf (label elsewhere) or 0 (label
    on it: probability 1), its entropy 0, other rows match stock; the backward stays finite."""
    h, w = (t.to(KERNEL_DEVICE) for t in _overflow_case(+1.0))
    labels = torch.tensor([0, 1, 3], device=KERNEL_DEVICE)
    rows, stats, entropy, _ = lce_k.lce_fwd_triton(h, w, labels, -100)
    stock = F.cross_entropy(_logits32(h, w), labels, reduction="none")
    torch.testing.assert_close(rows[[0, 2]], stock[[0, 2]])
    assert rows[1] == INF and entropy[1] == 0 and entropy.isfinite().all()
    on_it = lce_k.lce_fwd_triton(h, w, torch.tensor([0, 2, 3], device=KERNEL_DEVICE), -100)[0]
    assert on_it[1] == 0 and on_it[[0, 2]].isfinite().all()
    dh, dw = lce_k.lce_bwd_triton(
        torch.tensor([1.0, 0.0, 1.0], device=KERNEL_DEVICE), h, w, labels, stats, -100
    )
    assert dh.isfinite().all() and dw.isfinite().all()


@pytest.mark.parametrize("impl", IMPLS)
def test_lce_minus_inf_logit_is_harmless(impl):
    """A -inf logit has probability 0: the loss is finite unless it is the label (then +inf), grads finite."""
    dev = KERNEL_DEVICE if impl == "kernel" else "cpu"
    h, w = (t.to(dev) for t in _overflow_case(-1.0))
    labels = torch.tensor([0, 1, 3], device=dev)
    rows = _lce_rows(impl, h, w, labels)[0]
    stock = F.cross_entropy(_logits32(h, w), labels, reduction="none")
    torch.testing.assert_close(rows, stock)
    on_it = _lce_rows(impl, h, w, torch.tensor([0, 2, 3], device=dev))[0]
    assert on_it[1] == INF and on_it[[0, 2]].isfinite().all()
    if impl == "public":
        hg, wg = h.clone().requires_grad_(), w.clone().requires_grad_()
        ops.linear_cross_entropy(hg, wg, labels, shift=False).backward()
        assert hg.grad.isfinite().all() and wg.grad.isfinite().all()
    else:
        lse = lce_k.lce_fwd_triton(h, w, labels, -100)[1]
        dh, dw = lce_k.lce_bwd_triton(torch.ones(3, device=dev), h, w, labels, lse, -100)
        assert dh.isfinite().all() and dw.isfinite().all()


@pytest.mark.parametrize("impl", IMPLS)
def test_lce_minus_inf_logit_entropy_is_finite(impl):
    dev = KERNEL_DEVICE if impl == "kernel" else "cpu"
    h, w = (t.to(dev) for t in _overflow_case(-1.0))
    entropy = _lce_rows(impl, h, w, torch.tensor([0, 1, 3], device=dev))[2]
    assert entropy.isfinite().all()


@needs_kernels
@pytest.mark.parametrize("small", [False, True], ids=["default-tiles", "small-tiles"])
def test_lce_plus_inf_logit_before_later_tiles_kernel(monkeypatch, small):
    """A +inf logit in the first column, with more vocabulary tiles (and merge blocks) after it: every
    statistic of its row as the reference gives it (the running entropy must not meet inf - inf)."""
    if small:
        tiles = importlib.import_module("chronipatch.ops._lce_tiles")
        small_lce_tiles(monkeypatch)  # bf16 inputs: 94 tiles (rows of 8 bytes: pointer loads)
        monkeypatch.setattr(tiles, "MERGE_BLOCK", 16)
    h, w = _wide_vocab_case(0, +1.0)
    logits = _logits32(h, w)
    assert logits[1, 0] == INF and logits[1, 1:].isfinite().all()
    labels = torch.tensor([5, 7, 9])
    got = lce_k.lce_fwd_triton(h.to(KERNEL_DEVICE), w.to(KERNEL_DEVICE), labels.to(KERNEL_DEVICE), -100)
    ref = reference.lce_fwd(h, w, labels, -100)
    for a, b, what in zip(got, ref, ("loss", "stats", "entropy", "correct")):
        torch.testing.assert_close(a.cpu(), b, msg=what)
    assert got[2][1] == 0 and got[0][1] == INF


@needs_kernels
@pytest.mark.parametrize("case", ["plus-inf-first", "minus-inf", "nan-in-ignored-row"])
def test_lce_one_pass_non_finite_rows_match_recompute_path(monkeypatch, case):
    """bf16 training's one pass (p stored against a sampled row reference, settled once the max is known)
    meets a +inf logit before later tiles, a -inf logit and a NaN in an ignored row as the forward then the
    recompute backward do: the same loss, entropy and accuracy, the same gradients to bf16 rounding, all
    finite."""
    rows_k = importlib.import_module("chronipatch.ops._lce_rows")
    small_lce_tiles(monkeypatch)  # 94 tiles per row: most settle against the reference, some rescale
    monkeypatch.setattr(rows_k, "P_BYTES", 1)  # a chunk per row block
    labels = torch.tensor([5, 7, 9])
    if case == "plus-inf-first":
        h, w = _wide_vocab_case(0, +1.0)
    elif case == "minus-inf":
        h, w = _wide_vocab_case(1500, -1.0)
    else:
        h, w = _wide_vocab_case(None, 0.0)
        h[0, 1], labels[0] = float("nan"), -100
    h, w, labels = (t.to(KERNEL_DEVICE) for t in (h, w, labels))
    divisor = (labels != -100).sum().float()
    loss, entropy, correct, dh, dw = lce_k.lce_fwd_bwd_triton(h, w, labels, divisor, -100, True, True, True)
    rows, stats, entropy_re, correct_re = lce_k.lce_fwd_triton(h, w, labels, -100)
    grad_rows = (1 / divisor).expand(3)
    dh_re, dw_re = lce_k.lce_bwd_triton(grad_rows, h, w, labels, stats, -100)
    torch.testing.assert_close(loss, rows.sum() / divisor)
    torch.testing.assert_close(entropy, entropy_re, equal_nan=True)  # an ignored NaN row: NaN in both
    assert torch.equal(correct, correct_re)
    for got, re in ((dh, dh_re), (dw, dw_re)):
        assert got.isfinite().all() and re.isfinite().all()
        ulp = torch.finfo(torch.bfloat16).eps * re.float().abs().max()
        assert (got.float() - re.float()).abs().max() <= 2 * ulp
    if case == "nan-in-ignored-row":
        assert not dh[0].any()
