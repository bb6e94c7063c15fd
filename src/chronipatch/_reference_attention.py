"""Masked softmax attention in plain torch: the varlen attention's exact-math path (CPU; CUDA fp32/fp64).

softmax(mask(q k^T s)) v with repeated kv heads, computed in fp32 at least; eager calls
walk blocks of query rows and keep each row's log-sum-exp, so the backward recomputes one block at a time.
"""

from __future__ import annotations

import torch


def reference_attention(q, k, v, mask, scaling):
    """Masked softmax attention with repeated kv heads: the exact-math path (CPU, CUDA fp32/fp64).

    Masked scores are overwritten (not added to), so a NaN key of one document stays out of the others.
    Eager calls run it over blocks of query rows (``_BlockedReference``); a graph keeps the one-block form.
    """
    dtype = q.dtype
    # 2-byte inputs computed in fp32, as SDPA's CPU kernels accumulate: fp16 scores overflow past 65504
    # before the scale, and both formats' softmax and gradients would lose most of their digits.
    q, k, v = (x.float() if dtype in (torch.float16, torch.bfloat16) else x for x in (q, k, v))
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scale = q.shape[-1] ** -0.5 if scaling is None else scaling
    if torch.compiler.is_compiling():
        out = _block(q, k, mask, scale)[0] @ v
    else:
        rows = max(1, _BLOCK_SCORES // max(1, q.shape[0] * q.shape[1] * k.shape[2]))
        out = _BlockedReference.apply(q, k, v, mask, scale, rows)
    return out.transpose(1, 2).to(dtype).contiguous()


_BLOCK_SCORES = 1 << 24  # scores per block of query rows: 64 MiB in fp32


class _BlockedReference(torch.autograd.Function):
    """softmax(mask(q k^T s)) v over blocks of query rows, keeping each row's log-sum-exp: the backward
    recomputes a block's probabilities, so memory holds one block's [B, H, rows, Tk] scores, not all rows'
    (16 GiB at one packed row of 16,384 tokens, 14 heads, fp32)."""

    @staticmethod
    def forward(ctx, q, k, v, mask, scale, rows):
        out, lse = torch.empty_like(q), q.new_empty(q.shape[:-1])
        for lo in range(0, q.shape[2], rows):
            p, lse[:, :, lo : lo + rows] = _block(q, k, mask, scale, lo, rows)
            out[:, :, lo : lo + rows] = p @ v
        ctx.save_for_backward(q, k, v, mask, out, lse)
        ctx.scale, ctx.rows = scale, rows
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        q, k, v, mask, out, lse = ctx.saved_tensors
        dq, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
        delta = (dout * out).sum(-1, keepdim=True)  # sum_j p_ij dp_ij: softmax's backward
        for lo in range(0, q.shape[2], ctx.rows):
            hi = lo + ctx.rows
            p = _block(q, k, mask, ctx.scale, lo, ctx.rows, lse[:, :, lo:hi])
            dv += p.transpose(-1, -2) @ dout[:, :, lo:hi]
            # Masked entries get no gradient, as masked_fill's backward gives them none.
            ds = (p * (dout[:, :, lo:hi] @ v.transpose(-1, -2) - delta[:, :, lo:hi])).masked_fill(
                ~mask[:, :, lo:hi], 0
            )
            dq[:, :, lo:hi] = ds @ k * ctx.scale
            dk += ds.transpose(-1, -2) @ q[:, :, lo:hi] * ctx.scale
        return dq, dk, dv, None, None, None


def _block(q, k, mask, scale, lo=0, rows=None, lse=None):
    """Probabilities of query rows lo:lo+rows, all rows where None (and their log-sum-exp where not given)."""
    if rows is not None:  # no slice of all rows: a graph would guard its bounds
        q, mask = q[:, :, lo : lo + rows], mask[:, :, lo : lo + rows]
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))
    if lse is not None:
        return torch.exp(scores - lse[..., None])
    lse = torch.logsumexp(scores, dim=-1)
    return torch.exp(scores - lse[..., None]), lse
