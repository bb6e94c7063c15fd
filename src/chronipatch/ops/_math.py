"""Triton math shared by the op kernels: an exp as accurate as the one stock torch uses, the exp that a
result rounded to a given dtype needs, and the softmax references of the loss's tiles, whose moves are exact.

``tl.exp(x)`` is ``exp2(x * log2(e))`` with the product rounded first: up to ``|x| * 2^-24`` relative
error (dozens of fp32 ulps at |x| ~ 40). Cody-Waite reduction keeps it to a few ulps at any x:
``exp(x) = 2^n * exp(r)``, ``n = round(x / ln 2)``, ``r = x - n ln 2`` with ln 2 split so that
``n * LN2_HI`` is exact; then ``|r| <= ln(2) / 2`` and ``exp2(r * log2(e))`` loses nothing.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def exp_f32(x):
    """exp(x) in fp32 to a few ulps; 0 at -inf, inf at +inf, nan at nan."""
    n = tl.floor(x * 1.4426950408889634 + 0.5)
    r = (x - n * 0.693145751953125) - n * 1.4286068203094172e-06  # LN2_HI (16 bits) + LN2_LO
    # exp2 of an integer is exact; n in two halves, as 2^-150 or 2^128 alone leave the fp32 range
    # where exp(x) itself does not (subnormal results near x = -100).
    half = tl.floor(n * 0.5)
    e = tl.exp2(r * 1.4426950408889634) * tl.exp2(n - half) * tl.exp2(half)
    # Past |x| = 100 exp(x) is 0 or inf in fp32, and the reduction would meet inf - inf at x = +-inf.
    return tl.where(tl.abs(x) < 100.0, e, tl.exp2(x * 1.4426950408889634))


@triton.jit
def exp_for(x, EXACT: tl.constexpr):
    """exp for a result rounded to the input dtype. EXACT (fp32): ``exp_f32``. Otherwise tl.exp, whose
    |x| * 2^-24 relative error is far below the 8 or 11 bits a bf16/fp16 result keeps: it saves ~1.5 of 17 ms
    per 8192 x 151,936 loss forward + backward on the H200, and keeps SwiGLU's forward memory-bound."""
    e = tl.exp(x)
    if EXACT:
        e = exp_f32(x)
    return e


@triton.jit
def exp_flushed(x):
    """exp(x) as ``tl.exp`` (the same product x log2(e), the same hardware exp2), with results below 2^-126
    flushed to 0 (``ex2.approx.ftz``): tl.exp keeps them subnormal at three more instructions an element on
    sm_90. For softmax terms, summed beside a largest term >= 1, that moves a result by less than 2^-126."""
    return tl.exp2(x * 1.4426950408889634)


@triton.jit
def centred(z, m):
    """z - m, with 0 where a +inf logit meets its +inf row max (it holds the probability)."""
    return tl.where((z == m) & (z == float("inf")), 0.0, z - m)


@triton.jit
def p_reference(m, ref, MARGIN: tl.constexpr):
    """The reference p is stored against, for logits of max m in a row of sampled max ref: ref while m <= ref
    + MARGIN, else the first ref + k ln 2 (k an integer) not below m, so that moving p from one reference to
    another multiplies it by a power of 2, exactly (with the max itself as the row's reference, the settle
    kernel's rescale rounded every other tile's p a second time); m itself where that is not finite (a nan
    max or reference, an infinite max)."""
    grid = ref + 0.6931471805599453 * tl.math.ceil((m - ref) * 1.4426950408889634)
    grid = tl.where(tl.abs(grid) < float("inf"), grid, m)  # False for nan too
    return tl.where(m <= ref + MARGIN, ref, grid)


@triton.jit
def exp2_step(r, k):
    """exp(r - k) for references r, k of one row (``p_reference``): 2^round((r - k) / ln 2), a power of 2 (the
    step differs from the exact exponential by the fp32 rounding of r and k, ~1e-5 relative); 1 where an
    infinite r meets the same k, 0 where r is -inf or k +inf alone, nan with a nan."""
    return tl.exp2(tl.math.floor(centred(r, k) * 1.4426950408889634 + 0.5))


@triton.jit
def recentred_entropy(e, s, a, m, m_new):
    """An entropy sum e = sum p (z - m) with s = sum p, moved from max m to m_new with a = exp(m - m_new):
    a (e + s (m - m_new)). a == 0 drops the terms entirely (no 0 * -inf), and so does an empty s; m == m_new
    shifts by 0, not inf - inf once the max is +inf."""
    shift = tl.where(m == m_new, 0.0, m - m_new)
    return tl.where(a > 0, a * (e + tl.where(s > 0, s * shift, 0.0)), 0.0)
