"""Rotary position embedding, HF split-half convention, q and k in one launch.

With x = [x1, x2] split in halves of the head dim and cos/sin = [c1, c2], [s1, s2]:
    out = x * cos + rotate_half(x) * sin = [x1*c1 - x2*s1, x2*c2 + x1*s2]
Backward is the transpose (for HF's cos/sin, the inverse rotation):
    dx = [dy1*c1 + dy2*s2, dy2*c2 - dy1*s1]
q is [B, Hq, T, D], k is [B, Hk, T, D] (GQA: Hk may be smaller), both usually the transposed
views of [B, T, H, D] projections that HF builds; they are read through their strides, and the
outputs keep that [B, T, H, D] memory layout (or, ``dense``, are contiguous [B, H, T, D]); the input
gradients always keep it. cos and sin are [B, T, D] or [1, T, D] and carry no gradient (HF builds
them under no_grad).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from . import reference
from ._utils import (
    PLAIN,
    autocast_dtype,
    cdiv,
    check,
    check_tensors,
    direct,
    eager_cuda,
    last_dense,
    on_gpu,
    once_differentiable,
    pow2,
)

# Elements of q and k per program: its rows (tokens) a power of 2, up to 16. On the H200 at 8192 tokens of
# Qwen2.5-0.5B's 14 + 2 heads of 64, fwd + bwd took 23 us of kernels against the split-half kernel's 26, as
# bench/ops.py times them (2026-12-05); alone and L2-resident a direction took 7.2 us with 8 rows and 4 warps,
# 14.6 with one row, 12.3 split-half. At d128 (16 + 8 heads) every shape ran at 27 us a direction but those
# with 384 elements or more per thread (37-184 us); wider rows get more warps.
ROPE_ELEMENTS = 8192

# ---------------------------------------------------------------- kernels


@triton.jit
def _rotate(X, O, x_tok, o_tok, live, sx_h, so_h, H, c, s, d, rot, BLOCK_H: tl.constexpr, D: tl.constexpr):
    """O[tok, h, :] = X * c + X[rot] * s over a [TOKENS, BLOCK_H, BLOCK_D] block: whole rows of D, the
    second load (its halves swapped) from the lines the first brought in."""
    heads = tl.arange(0, BLOCK_H).to(tl.int64)[None, :, None]  # heads x head stride may pass 2^31
    mask = live & (heads < H) & (d < D)
    x_ptr = X + x_tok + heads * sx_h
    x = tl.load(x_ptr + d, mask=mask, other=0.0).to(tl.float32)
    xr = tl.load(x_ptr + rot, mask=mask, other=0.0).to(tl.float32)
    tl.store(O + o_tok + heads * so_h + d, (x * c + xr * s).to(O.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(
    Q, K, C, S, QO, KO, n_tok, T, sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sqo_b, sqo_h, sqo_t, sko_b, sko_h,
    sko_t, sc_b, sc_t, ss_b, ss_t, HQ, HK, D: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
    BLOCK_D: tl.constexpr, TOKENS: tl.constexpr, BACKWARD: tl.constexpr,
):  # fmt: skip
    """TOKENS (batch, token) rows per program, q's and k's heads, cos/sin read once for both. With x[rot]
    the row with its halves swapped, the forward is x * cos + x[rot] * [-s1, s2]; the backward, the
    transpose, dy * cos + dy[rot] * [s2, -s1] (sin's halves swapped as well)."""
    tok = tl.program_id(0).to(tl.int64) * TOKENS + tl.arange(0, TOKENS)
    live = (tok < n_tok)[:, None, None]
    tok = tl.minimum(tok, n_tok - 1)  # the last program's spare rows read a real row, masked off
    b = (tok // T)[:, None, None]
    t = (tok % T)[:, None, None]
    half = D // 2
    d = tl.arange(0, BLOCK_D)[None, None, :]
    rot = tl.where(d < half, d + half, d - half)
    cmask = live & (d < D)
    c = tl.load(C + b * sc_b + t * sc_t + d, mask=cmask, other=0.0).to(tl.float32)
    if BACKWARD:
        s = tl.load(S + b * ss_b + t * ss_t + rot, mask=cmask, other=0.0).to(tl.float32)
        s = tl.where(d < half, s, -s)
    else:
        s = tl.load(S + b * ss_b + t * ss_t + d, mask=cmask, other=0.0).to(tl.float32)
        s = tl.where(d < half, -s, s)
    q_tok, qo_tok = b * sq_b + t * sq_t, b * sqo_b + t * sqo_t
    _rotate(Q, QO, q_tok, qo_tok, live, sq_h, sqo_h, HQ, c, s, d, rot, BLOCK_HQ, D)
    k_tok, ko_tok = b * sk_b + t * sk_t, b * sko_b + t * sko_t
    _rotate(K, KO, k_tok, ko_tok, live, sk_h, sko_h, HK, c, s, d, rot, BLOCK_HK, D)


# ---------------------------------------------------------------- launchers


def _launch_shape(heads: int, block_d: int) -> tuple[int, int]:
    """(rows per program, warps): the power of 2 (up to 16) at or above ROPE_ELEMENTS / (q and k elements a
    row), and 4 warps, more where one row alone is wider than 16,384 elements."""
    tokens = min(16, pow2(cdiv(ROPE_ELEMENTS, heads * block_d)))
    return tokens, min(16, max(4, tokens * heads * block_d // 4096))


def rope_triton(
    q: Tensor,
    k: Tensor,
    cos: Tensor,
    sin: Tensor,
    backward: bool = False,
    dense: bool = False,
    wrap: bool = True,
    out: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """(q', k'), or their gradients' transposes with ``backward``; written into ``out`` where given (any
    [B, H, T, D] strides with a dense last dim), else into new tensors laid out as ``dense`` says."""
    q, k, cos, sin = last_dense(q), last_dense(k), last_dense(cos), last_dense(sin)
    b, hq, t, d = q.shape
    hk = k.shape[1]
    hf_layout = out is None and not dense
    if out is not None:
        qo, ko = out
    elif dense:
        qo, ko = (torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q, k))
    else:
        # HF's layout: [B, T, H, D] buffers, written through their [B, H, T, D] transposes' strides and
        # returned as those views afterwards. Under torch.compile a kernel that writes into a view (or a
        # tensor of those strides) is given copies to write (23 us a call at 8192 tokens of 14 + 2 heads of 64
        # on the H100, bench/results/2026-12-06-h100-f); plain buffers, as RMSNorm's, are written in place:
        # fwd + bwd compiled 69.5 us there, as an opaque custom op's 69.2 (bench/results/2026-12-06-h100-g).
        qo, ko = (torch.empty(b, t, x.shape[1], d, dtype=x.dtype, device=x.device) for x in (q, k))
    if b * t > 0:
        # One stride() call per tensor: each costs as much host time as a small kernel's arithmetic.
        sq, sk, sqo, sko, sc, ss = (x.stride() for x in (q, k, qo, ko, cos, sin))
        if hf_layout:  # the buffers' (batch, token, head) strides, in the kernel's (batch, head, token) order
            sqo, sko = ((st[0], st[2], st[1]) for st in (sqo, sko))
        block_hq, block_hk, block_d = max(pow2(hq), 1), max(pow2(hk), 1), max(pow2(d), 1)
        tokens, warps = _launch_shape(block_hq + block_hk, block_d)
        (wrap_triton(_rope_kernel) if wrap else _rope_kernel)[(cdiv(b * t, tokens),)](
            q, k, cos, sin, qo, ko, b * t, t,
            *sq[:3], *sk[:3], *sqo[:3], *sko[:3],
            # A batch of 1 in cos/sin broadcasts over the batch of q/k.
            sc[0] if cos.shape[0] > 1 else 0, sc[1],
            ss[0] if sin.shape[0] > 1 else 0, ss[1],
            hq, hk,
            D=d, BLOCK_HQ=block_hq, BLOCK_HK=block_hk, BLOCK_D=block_d, TOKENS=tokens, BACKWARD=backward,
            num_warps=warps,
        )  # fmt: skip
    return (qo.transpose(1, 2), ko.transpose(1, 2)) if hf_layout else (qo, ko)


# ---------------------------------------------------------------- registration


def rotate(
    q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, backward: bool = False, dense: bool = False,
    wrap: bool = True, out: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """``rope_triton`` on the GPU, the torch reference elsewhere (``out``: written there)."""
    if on_gpu(q):
        return rope_triton(q, k, cos, sin, backward=backward, dense=dense, wrap=wrap, out=out)
    qo, ko = (reference.rope_bwd if backward else reference.rope_fwd)(q, k, cos, sin)
    if out is not None:
        return out[0].copy_(qo), out[1].copy_(ko)
    return (qo.contiguous(), ko.contiguous()) if dense else (qo, ko)


@triton_op("chronipatch::rope", mutates_args=())
def _rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, dense: bool) -> tuple[Tensor, Tensor]:
    return rotate(q, k, cos, sin, dense=dense)


@triton_op("chronipatch::rope_bwd", mutates_args=())
def _rope_bwd(dq: Tensor, dk: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    return rotate(dq, dk, cos, sin, backward=True)


def _setup(ctx, inputs, output):
    _, _, cos, sin, _ = inputs
    ctx.save_for_backward(cos, sin)


def _backward(ctx, dq, dk):
    cos, sin = ctx.saved_tensors
    dq_in, dk_in = _rope_bwd(dq, dk, cos, sin)
    return dq_in, dk_in, None, None, None


_rope.register_autograd(_backward, setup_context=_setup)


_direct_fwd = direct(rope_triton)


class _RoPEEager(torch.autograd.Function):
    """The same launchers without custom-op dispatch, for eager CUDA calls (``eager_cuda``)."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, dense):
        ctx.save_for_backward(cos, sin)
        return _direct_fwd(q, k, cos, sin, dense=dense)

    @staticmethod
    @once_differentiable
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        # Compiled autograd traces this backward with fake tensors: the registered op then.
        if eager_cuda(dq, dk):
            dq_in, dk_in = _direct_fwd(dq, dk, cos, sin, backward=True)
        else:
            dq_in, dk_in = _rope_bwd(dq, dk, cos, sin)
        return dq_in, dk_in, None, None, None


# ---------------------------------------------------------------- public


def rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, dense: bool = False) -> tuple[Tensor, Tensor]:
    """HF ``apply_rotary_pos_emb(q, k, cos, sin)`` with ``unsqueeze_dim=1``; returns (q_out, k_out).

    The outputs are ``[B, H, T, D]`` views of ``[B, T, H, D]`` memory, the layout of HF's projections that
    flash/varlen attention read as they are; ``dense`` makes them contiguous ``[B, H, T, D]`` instead, as
    stock's RoPE leaves them (SDPA with a mask runs its kernels faster on that layout). cos/sin have q's
    dtype, or under autocast any float dtype; the rotation runs in fp32 and the outputs have q's dtype.
    """
    if not _fits(q, k, cos, sin):
        _check(q, k, cos, sin)
    if eager_cuda(q, k, cos, sin):
        return _RoPEEager.apply(q, k, cos, sin, bool(dense))
    return _rope(q, k, cos, sin, bool(dense))


def _fits(q, k, cos, sin) -> bool:
    """Every check of ``_check`` at once, in one expression that formats no message: the common case."""
    return (
        type(q) in PLAIN
        and type(k) in PLAIN
        and type(cos) in PLAIN
        and type(sin) in PLAIN
        and q.dim() == 4
        and k.dim() == 4
        and cos.dim() == 3
        and q.is_floating_point()
        and q.dtype == k.dtype == cos.dtype == sin.dtype
        and q.shape[3] % 2 == 0
        and k.shape[0] == q.shape[0]
        and k.shape[2:] == q.shape[2:]
        and cos.shape == sin.shape
        and cos.shape[0] in (1, q.shape[0])
        and cos.shape[1:] == q.shape[2:]
        and not (cos.requires_grad or sin.requires_grad)
        and k.device == q.device
        and cos.device == q.device
        and sin.device == q.device
    )


def _check(q, k, cos, sin) -> None:
    """The arguments' checks, each naming what is wrong."""
    op = "rope"
    check_tensors(op, q=q, k=k, cos=cos, sin=sin)
    check(
        q.dim() == 4 and k.dim() == 4,
        op,
        lambda: f"q and k must be [B, H, T, D], got {tuple(q.shape)}, {tuple(k.shape)}",
    )
    check(
        cos.dim() == 3 and sin.dim() == 3,
        op,
        lambda: f"cos and sin must be [B, T, D], got {tuple(cos.shape)}, {tuple(sin.shape)}",
    )
    b, _, t, d = q.shape
    check(
        k.shape[0] == b and k.shape[2] == t and k.shape[3] == d,
        op,
        lambda: f"k {tuple(k.shape)} does not match q {tuple(q.shape)} in batch, tokens or head dim",
    )
    check(d % 2 == 0, op, lambda: f"head dim must be even, got {d}")
    check(cos.shape == sin.shape, op, lambda: f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} differ")
    check(
        cos.shape[0] in (1, b) and cos.shape[1:] == (t, d),
        op,
        lambda: f"cos/sin {tuple(cos.shape)} do not match [B={b} or 1, T={t}, D={d}]",
    )
    for name, x in (("k", k), ("cos", cos), ("sin", sin)):
        check(
            x.device == q.device, op, lambda name=name, x=x: f"{name} is on {x.device} but q is on {q.device}"
        )
    check(
        q.is_floating_point() and q.dtype == k.dtype,
        op,
        lambda: f"q and k must share a float dtype, got {q.dtype}, {k.dtype}",
    )
    check(
        cos.is_floating_point() and sin.is_floating_point(),
        op,
        lambda: f"cos and sin must be floating point, got {cos.dtype} and {sin.dtype}",
    )
    # HF casts cos/sin to the hidden states' dtype, so they match q outside autocast. Under autocast q/k come
    # from autocast's projections and cos/sin stay fp32: stock rotates in fp32 and attention casts the result
    # back to q's dtype; this op rotates in fp32 and rounds to q's dtype at once (the same values, up to
    # fp32 rounding).
    check(
        (cos.dtype == sin.dtype == q.dtype) or autocast_dtype(q) is not None,
        op,
        lambda: f"cos and sin must have q's dtype {q.dtype} (outside autocast), got {cos.dtype}, {sin.dtype}",
    )
    check(not (cos.requires_grad or sin.requires_grad), op, "cos and sin carry no gradient; detach them")
