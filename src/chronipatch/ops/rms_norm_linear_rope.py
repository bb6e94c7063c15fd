"""Attention's q, k and v from the decoder layer's input: the normalised projections as one stacked GEMM
(``rms_norm_linear``), q and k rotated (``rope``):
    q, k, v  = split(rms_norm(x, w_n, eps) [W_q; W_k; W_v]^T + [b_q; b_k; b_v])
    q', k'   = rope(q, k, cos, sin)                  (as [B, H, T, D] views of the projections' heads)
    v        = v's heads, contiguous                  (attention keeps v; a column view keeps q and k alive)
Eager CUDA calls run it as one autograd Function: composed, the step built nine autograd nodes between the
two ops (the split's, q/k/v's views and transposes, the rotation's), each a host cost per layer and step, and
the split's backward copied the three gradients into one. Here the rotation's backward writes dq and dk into
that stacked gradient's columns, dv is copied beside them, and ``rms_norm_linear``'s backward takes it. The
kernels, and so every output and gradient, are the composition's bit for bit. Traced, or off CUDA, the
composition of the two registered ops itself.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._utils import (
    autocast_dtype,
    check,
    check_tensors,
    direct,
    eager_cuda,
    once_differentiable,
    same_floats,
    saveable,
    unit_stride,
)
from .rms_norm_linear import _check_shapes, _direct_bwd, _direct_fwd, _unstack, rms_norm_linear
from .rope import rope, rotate

_direct_rotate = direct(rotate)


class _RMSNormLinearRoPEEager(torch.autograd.Function):
    """Arguments: x, norm weight, eps, head dim, cos, sin, dense, whether biased, the weights, the biases."""

    @staticmethod
    def forward(ctx, x, norm_weight, eps, head_dim, cos, sin, dense, biased, *params):
        n = len(params) // 2 if biased else len(params)
        weights, biases = params[:n], params[n:]
        out, rstd = _direct_fwd(x, norm_weight, eps, weights, biases, [biased] * n, None, True)
        q, k, v = _heads(out, weights, head_dim, contiguous_v=True)
        q, k = _direct_rotate(q, k, cos, sin, dense=dense)
        ctx.save_for_backward(x, norm_weight, rstd, cos, sin, *weights)
        ctx.biased, ctx.head_dim = biased, head_dim
        return q, k, v

    @staticmethod
    @once_differentiable
    def backward(ctx, dq, dk, dv):
        x, norm_weight, rstd, cos, sin, *weights = ctx.saved_tensors
        n = len(weights)
        need_dw, need_b = list(ctx.needs_input_grad[8 : 8 + n]), ctx.needs_input_grad[8 + n :]
        need_db = list(need_b) if ctx.biased else [False] * n
        # The stacked output's gradient: its q and k columns written by the rotation's backward.
        dout = torch.empty(*x.shape[:-1], sum(w.shape[0] for w in weights), dtype=x.dtype, device=x.device)
        gq, gk, gv = _heads(dout, weights, ctx.head_dim)
        _direct_rotate(dq, dk, cos, sin, backward=True, out=(gq, gk))
        gv.copy_(dv)
        dx, dnw, dws, dbs = _direct_bwd(x, norm_weight, rstd, weights, [dout], need_dw, need_db, None, True)
        dws, dbs = _unstack(dws, dbs, weights, need_dw, need_db, [ctx.biased] * n, True)
        return dx, dnw, None, None, None, None, None, None, *dws, *dbs


def _heads(out: Tensor, weights, head_dim: int, contiguous_v: bool = False) -> tuple[Tensor, ...]:
    """q, k, v as [B, H, T, D] views of the stacked [B, T, sum O] projections' columns (v of a contiguous
    copy of its columns, as the composition's)."""
    q, k, v = out.split([w.shape[0] for w in weights], dim=-1)
    v = v.contiguous() if contiguous_v else v
    return tuple(_split_heads(t, head_dim) for t in (q, k, v))


def _split_heads(t: Tensor, head_dim: int) -> Tensor:
    """[B, T, heads * D] -> [B, heads, T, D], a view (heads counted from the columns: an empty batch has
    no -1 to infer)."""
    return t.view(*t.shape[:-1], t.shape[-1] // head_dim, head_dim).transpose(1, 2)


def rms_norm_linear_rope(
    x: Tensor,
    norm_weight: Tensor,
    eps: float,
    weights: list[Tensor],
    biases: list[Tensor | None] | None,
    head_dim: int,
    cos: Tensor,
    sin: Tensor,
    dense: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """(q', k', v) of x ``[B, T, H]`` and weights [W_q, W_k, W_v] (``[heads * head_dim, H]``, biases all given
    or none): ``rope`` of the stacked ``rms_norm_linear`` projections' q and k, and v, each
    ``[B, heads, T, head_dim]`` (v a view of its own contiguous [B, T, heads, head_dim] copy). ``dense``:
    q' and k' contiguous, as ``rope``'s."""
    biases = [None] * 3 if biases is None else list(biases)
    norm_weight = unit_stride(norm_weight)
    if _eager(x, norm_weight, weights, biases, head_dim, cos, sin):
        _check_shapes("rms_norm_linear", x, norm_weight, weights, biases, None)
        given = [b for b in biases if b is not None]
        x = saveable(x, norm_weight, *weights, *given)
        args = (x, norm_weight, float(eps), head_dim, cos, sin, bool(dense), bool(given))
        return _RMSNormLinearRoPEEager.apply(*args, *weights, *given)
    _check(x, weights, head_dim)
    # The composition, whose ops check the rest: the same results.
    q, k, v = rms_norm_linear(x, norm_weight, eps, weights, biases, stacked=True)
    q, k = rope(_split_heads(q, head_dim), _split_heads(k, head_dim), cos, sin, dense=dense)
    return q, k, _split_heads(v.contiguous(), head_dim)


def _eager(x, norm_weight, weights, biases, head_dim, cos, sin) -> bool:
    """Whether the call takes the one Function: plain CUDA tensors of one dtype outside tracing and autocast,
    the arguments those of both ops' checks (in one expression that formats no message), q/k/v stackable."""
    if not (isinstance(weights, (list, tuple)) and len(weights) == 3 and len(biases) == 3):
        return False
    wq, wk, wv = weights
    given = [b for b in biases if b is not None]
    return (
        same_floats(x, norm_weight, *weights, *given, cos, sin)
        and x.dim() == 3
        and len(given) in (0, 3)
        and len({t.requires_grad for t in (*weights, *given)}) == 1
        and type(head_dim) is int
        and head_dim > 0
        and head_dim % 2 == 0
        and wq.dim() == 2
        and wq.shape[0] % head_dim == 0
        and wk.shape == wv.shape
        and wk.dim() == 2
        and wk.shape[0] % head_dim == 0
        and cos.dim() == 3
        and cos.shape == sin.shape
        and cos.shape[0] in (1, x.shape[0])
        and cos.shape[1:] == (x.shape[1], head_dim)
        and not (cos.requires_grad or sin.requires_grad)
        and autocast_dtype(x) is None
        and eager_cuda(x, norm_weight, *weights, *given, cos, sin)
    )


def _check(x, weights, head_dim) -> None:
    """What the composition needs beyond its two ops' own checks, each naming what is wrong."""
    op = "rms_norm_linear_rope"
    check(
        isinstance(weights, (list, tuple)) and len(weights) == 3,
        op,
        lambda: f"weights must be a list [W_q, W_k, W_v], got {weights!r:.80}",
    )
    check(
        type(head_dim) is int and head_dim > 0,
        op,
        lambda: f"head_dim must be a positive int, got {head_dim!r}",
    )
    check_tensors(op, x=x, **{f"weights[{i}]": w for i, w in enumerate(weights)})
    check(x.dim() == 3, op, lambda: f"x must be [B, T, H], got {tuple(x.shape)}")
    for i, w in enumerate(weights):
        check(
            w.dim() == 2 and w.shape[0] % head_dim == 0,
            op,
            lambda i=i, w=w: f"weights[{i}] {tuple(w.shape)} is not [heads * {head_dim}, H]",
        )
    check(
        weights[1].shape == weights[2].shape,
        op,
        lambda: f"W_k {tuple(weights[1].shape)} and W_v {tuple(weights[2].shape)} differ",
    )
