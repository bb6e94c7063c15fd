"""RMSNorm feeding linear projections, whose output is recomputed in the backward instead of kept:
    y      = rms_norm(x, w_n, eps)                 (``rms_norm``: fp32 statistics, HF's casts)
    out_i  = y W_i^T + b_i
Autograd would keep y ([N, H]) for the projections' weight gradients, beside the x the norm keeps. Here the
forward keeps x and its rstd ([N], fp32), and the backward runs
    dy     = sum_i dout_i W_i                      (each product in x's dtype, summed in fp32 by the kernel)
    dx, dw_n, y = the RMSNorm backward of dy, whose kernel writes y again (bit for bit the forward's)
    dW_i   = dout_i^T y,   db_i = sum_rows dout_i
so a decoder layer keeps one [N, H] tensor less per norm: 1 GiB at Llama-3.2-1B's 16 layers of 4 x 2048
tokens in bf16, for one more [N, H] write per norm in the backward. The outputs equal
``F.linear(rms_norm(x, w_n, eps), W_i, b_i)`` bit for bit.

``add_rms_norm_linear`` takes the decoder layer's residual add along: x = r + d (torch's rounding), written by
the norm's forward kernel, whose backward kernel adds x's own upstream gradient dx_ext to dx (one rounding
where autograd's sum rounds twice); both r and d get that dx. Separate, the add and the gradient sum are a
kernel each way that reads two [N, H] and writes one.

``stacked``: the projections as one GEMM of the weights stacked along O (inside the op, forward and backward:
nothing stacked is kept), the output one [N, sum O] tensor that the public function splits into column views.
q/k/v then take one GEMM each way where they took three, two of them narrow (O = 128 at Qwen2.5-0.5B), and
one weight-gradient GEMM, for a copy of the weights per pass and of the three output gradients into one. Its
outputs are that GEMM's, in its own order of summing (not bit for bit the separate F.linear calls'); dy is
one product rounded once; the weights' gradients are row views of one [sum O, H] tensor. Only where every
weight is biased or none, and all or none of the weights and biases need a gradient (a frozen q beside a
trainable k would otherwise get its dW computed, and held in k's gradient's storage).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.library import triton_op

from . import reference
from ._utils import (
    as_rows,
    autocast_dtype,
    check,
    check_same,
    check_tensors,
    direct,
    eager_cuda,
    on_gpu,
    once_differentiable,
    same_floats,
    saveable,
    unit_stride,
)
from .rms_norm import DY_TERMS, rms_norm, rms_norm_add_fwd_triton, rms_norm_bwd_y_triton, rms_norm_fwd_triton

# ---------------------------------------------------------------- launchers (kernels: ``rms_norm``)


def _fwd(
    x: Tensor, norm_weight: Tensor, eps: float, weights: list[Tensor], biases: list[Tensor],
    has_bias: list[bool], residual: Tensor | None = None, stacked: bool = False, wrap: bool = True,
) -> list[Tensor]:  # fmt: skip
    """[out_0, ..., out_k, rstd]; with a residual [out_0, ..., out_k, s, rstd]: of s = residual + x. Stacked
    (every weight biased or none): one output of all the projections side by side."""
    s = None
    if on_gpu(x):
        if residual is None:
            y, rstd = rms_norm_fwd_triton(x, norm_weight, eps, wrap=wrap)
        else:
            y, rstd, s = rms_norm_add_fwd_triton(x, residual, norm_weight, eps, wrap=wrap)
    else:
        s = None if residual is None else residual + x
        y, rstd = reference.rms_norm_fwd(x if s is None else s, norm_weight, eps)
    if stacked:
        outs = [F.linear(y, torch.cat(weights), torch.cat(biases) if biases else None)]
    else:
        bias = iter(biases)
        outs = [F.linear(y, w, next(bias) if b else None) for w, b in zip(weights, has_bias)]
    return [*outs, rstd] if s is None else [*outs, s, rstd]


def _bwd(
    x: Tensor, norm_weight: Tensor, rstd: Tensor, weights: list[Tensor], douts: list[Tensor],
    need_dw: list[bool], need_db: list[bool], dx_ext: Tensor | None = None, stacked: bool = False,
    wrap: bool = True,
) -> tuple[Tensor, Tensor, list[Tensor], list[Tensor]]:  # fmt: skip
    """(dx, dnorm_weight, dW_i, db_i), ``dx_ext`` added to dx; a dW or db not needed is returned empty (its
    GEMM or sum skipped). Stacked: douts is the one stacked output's gradient, and dW, db come stacked too
    (one each, if any is needed)."""
    douts = [as_rows(do) for do in douts]
    if stacked:
        # Stacked again as [H, sum O] and used transposed: not the forward's torch.cat(weights), which a
        # compiler would then merge with this one and keep from the forward (a copy of the weights per call
        # alive until the backward) rather than recompute from the weights themselves.
        stack_t = torch.cat([w.t() for w in weights], dim=1)
        weights, need_dw, need_db = [stack_t.t()], [any(need_dw)], [any(need_db)]
    # The first products go to the norm's kernel as they are, which sums them as it loads them (HF's three
    # q/k/v products, its two gate/up ones); a fourth and later add onto the third. Summed by cuBLAS instead
    # (``addmm_`` onto the running sum), a compiled backward copied the sum before each added GEMM (ATen's
    # addmm into a new buffer copies the addend there first): 72 copies of [N, H] in a Qwen2.5-0.5B step.
    dys = [do @ w for do, w in zip(douts[:DY_TERMS], weights[:DY_TERMS])]
    for w, do in zip(weights[DY_TERMS:], douts[DY_TERMS:]):
        dys[-1].addmm_(do, w)
    dys = [d.view(x.shape) for d in dys]
    # The norm's backward comes first: its kernel writes y, which only the weight gradients need. y depends
    # on dy that way, so a compiler can neither merge it with the forward's y nor hoist it into the forward.
    # A frozen group (LoRA elsewhere) needs no dW: no y then.
    if on_gpu(x):
        dx, dnw, y = rms_norm_bwd_y_triton(
            dys, x, norm_weight, rstd, wrap, any(need_dw), into_dy=True, dx_ext=dx_ext
        )
    else:
        acc = torch.promote_types(x.dtype, torch.float32)  # the kernel's sum, in fp32 (fp64 stays)
        dx, dnw = reference.rms_norm_bwd(sum(d.to(acc) for d in dys), x, norm_weight, rstd, dx_ext)
        y = reference.rms_norm_out(x, norm_weight, rstd, weight_last=True) if any(need_dw) else None
    y2 = as_rows(y) if y is not None else None
    dws = [do.T @ y2 if want else w.new_empty(0) for w, do, want in zip(weights, douts, need_dw)]
    dbs = [do.sum(0) if want else w.new_empty(0) for w, do, want in zip(weights, douts, need_db)]
    return dx, dnw, dws, dbs


# ---------------------------------------------------------------- registration

_direct_fwd, _direct_bwd = direct(_fwd), direct(_bwd)


@triton_op("chronipatch::rms_norm_linear", mutates_args=())
def _rms_norm_linear(
    x: Tensor,
    norm_weight: Tensor,
    eps: float,
    weights: list[Tensor],
    biases: list[Tensor],
    has_bias: list[bool],
    residual: Tensor | None,  # no default: the dispatcher drops a default argument, and autograd then
    # expects one gradient less than the backward gives
    stacked: bool,
) -> list[Tensor]:
    return _fwd(x, norm_weight, eps, weights, biases, has_bias, residual, stacked)


# Traced by the compiler like the forward, so the compiled backward launches its GEMMs and kernel itself:
# as an opaque op its eager launches cost the host ~240 us a call, 48 calls a Qwen2.5-0.5B step
# (bench/results/2026-12-03-h200/ab_call15.log).
@triton_op("chronipatch::rms_norm_linear_bwd", mutates_args=())
def _rms_norm_linear_bwd(
    x: Tensor,
    norm_weight: Tensor,
    rstd: Tensor,
    weights: list[Tensor],
    douts: list[Tensor],
    need_dw: list[bool],
    need_db: list[bool],
    dx_ext: Tensor | None,
    stacked: bool,
) -> tuple[Tensor, Tensor, list[Tensor], list[Tensor]]:
    return _bwd(x, norm_weight, rstd, weights, douts, need_dw, need_db, dx_ext, stacked)


def _unstack(dws: list[Tensor], dbs: list[Tensor], weights, need_dw, need_db, has_bias, stacked: bool):
    """The gradients of the weights and of the biases given, None where not needed; stacked ones split
    into the weights' rows (views)."""
    if stacked:
        sizes = [w.shape[0] for w in weights]
        dws = dws[0].split(sizes) if any(need_dw) else [None] * len(weights)
        dbs = dbs[0].split(sizes) if any(need_db) else [None] * len(weights)
    dbs = [db if want else None for db, want, b in zip(dbs, need_db, has_bias) if b]
    dws = [dw if want else None for dw, want in zip(dws, need_dw)]
    return dws, dbs


def _setup(ctx, inputs, output):
    x, norm_weight, _, weights, _, has_bias, residual, ctx.stacked = inputs
    ctx.added = residual is not None
    # The norm's input: x, or the sum s it normalised (an output, which the backward needs as x).
    ctx.save_for_backward(output[-2] if ctx.added else x, norm_weight, output[-1], *weights)
    ctx.mark_non_differentiable(output[-1])
    ctx.has_bias = has_bias


def _backward(ctx, douts):
    x, norm_weight, rstd, *weights = ctx.saved_tensors
    need_dw, need_b = ctx.needs_input_grad[3], iter(ctx.needs_input_grad[4])
    need_db = [b and next(need_b) for b in ctx.has_bias]
    douts, ds = (douts[:-2], douts[-2]) if ctx.added else (douts[:-1], None)
    dx, dnw, dws, dbs = _rms_norm_linear_bwd(
        x, norm_weight, rstd, weights, list(douts), need_dw, need_db, ds, ctx.stacked
    )
    dws, dbs = _unstack(dws, dbs, weights, need_dw, need_db, ctx.has_bias, ctx.stacked)
    # s = residual + x: both get the sum's whole gradient (one tensor, as autograd's add hands it on).
    return dx, dnw, None, dws, dbs, None, dx if ctx.added else None, None


_rms_norm_linear.register_autograd(_backward, setup_context=_setup)


class _RMSNormLinearEager(torch.autograd.Function):
    """The same launchers without custom-op dispatch, for eager CUDA calls (``eager_cuda``). Arguments:
    x, norm weight, eps, has_bias, the residual (or None), stacked, then the weights and the biases given."""

    @staticmethod
    def forward(ctx, x, norm_weight, eps, has_bias, residual, stacked, *params):
        weights, biases = list(params[: len(has_bias)]), list(params[len(has_bias) :])
        *outs, rstd = _direct_fwd(x, norm_weight, eps, weights, biases, has_bias, residual, stacked)
        ctx.added, ctx.stacked = residual is not None, stacked
        ctx.save_for_backward(outs[-1] if ctx.added else x, norm_weight, rstd, *weights)
        ctx.has_bias = has_bias
        return tuple(outs)

    @staticmethod
    @once_differentiable
    def backward(ctx, *douts):
        x, norm_weight, rstd, *weights = ctx.saved_tensors
        n = len(weights)
        need_dw, need_b = list(ctx.needs_input_grad[6 : 6 + n]), iter(ctx.needs_input_grad[6 + n :])
        need_db = [b and next(need_b) for b in ctx.has_bias]
        douts, ds = (douts[:-1], douts[-1]) if ctx.added else (douts, None)
        # Compiled autograd traces this backward with fake tensors: the registered op then.
        bwd = _direct_bwd if eager_cuda(x) else _rms_norm_linear_bwd
        dx, dnw, dws, dbs = bwd(x, norm_weight, rstd, weights, list(douts), need_dw, need_db, ds, ctx.stacked)
        dws, dbs = _unstack(dws, dbs, weights, need_dw, need_db, ctx.has_bias, ctx.stacked)
        return dx, dnw, None, None, dx if ctx.added else None, None, *dws, *dbs


# ---------------------------------------------------------------- public


def rms_norm_linear(
    x: Tensor,
    norm_weight: Tensor,
    eps: float,
    weights: list[Tensor],
    biases: list[Tensor | None] | None = None,
    stacked: bool = False,
) -> list[Tensor]:
    """``[F.linear(rms_norm(x, norm_weight, eps), W, b) for W, b in zip(weights, biases)]`` without keeping
    the norm's output for the backward. One dtype and device for all; weights ``[O_i, H]``. Under autocast
    this composition itself (its projections cast as autocast casts them), which keeps y. ``stacked``: the
    projections as one GEMM, the results column views of its [..., sum O_i] output (where every weight has
    a bias or none does, and all or none of them need a gradient; otherwise as without)."""
    return _call("rms_norm_linear", x, norm_weight, eps, weights, biases, None, stacked)[1]


def add_rms_norm_linear(
    residual: Tensor,
    x: Tensor,
    norm_weight: Tensor,
    eps: float,
    weights: list[Tensor],
    biases: list[Tensor | None] | None = None,
) -> tuple[Tensor, list[Tensor]]:
    """``(s, rms_norm_linear(s, norm_weight, eps, weights, biases))`` with ``s = residual + x`` (shaped and
    typed like x; under autocast, where a residual stream may be wider than x, as torch's add types it), the
    add inside the norm's kernels both ways."""
    check_tensors("add_rms_norm_linear", residual=residual)  # None would mean no add below
    return _call("add_rms_norm_linear", x, norm_weight, eps, weights, biases, residual)


def _call(
    op, x, norm_weight, eps, weights, biases, residual, stacked=False
) -> tuple[Tensor | None, list[Tensor]]:
    """(s or None, the projections): the checks, then the eager fast path or the registered op."""
    check(
        isinstance(weights, (list, tuple)),
        op,
        lambda: f"weights must be a list of [O, H] tensors, got {type(weights).__name__}",
    )
    check(len(weights) > 0, op, "needs at least one weight")
    norm_weight = unit_stride(norm_weight)
    biases = [None] * len(weights) if biases is None else list(biases)
    check(len(biases) == len(weights), op, lambda: f"{len(weights)} weights but {len(biases)} biases")
    given = [b for b in biases if b is not None]
    extra = () if residual is None else (residual,)
    # Types, devices and dtypes in one pass; the named checks run where it fails (autocast, or an error).
    same = same_floats(x, norm_weight, *weights, *given, *extra)
    if not same:
        check_tensors(op, **_named(x, norm_weight, weights, biases, residual))
    _check_shapes(op, x, norm_weight, weights, biases, residual)
    if autocast_dtype(x) is not None:  # the composition, cast as autocast casts it (dtypes may differ)
        s = None if residual is None else residual + x
        y = rms_norm(x if s is None else s, norm_weight, eps)
        return s, [F.linear(y, w, b) for w, b in zip(weights, biases, strict=True)]
    if not same:
        check_same(op, **_named(x, norm_weight, weights, biases, residual))
    if residual is None:  # the backward reads x (stock keeps the norm's output); s is computed
        x = saveable(x, norm_weight, *weights, *given)
    has_bias = [b is not None for b in biases]
    stacked = (
        stacked
        and len(weights) > 1
        and len(set(has_bias)) == 1
        and len({t.requires_grad for t in (*weights, *given)}) == 1
    )
    if eager_cuda(x, norm_weight, *extra, *weights, *given):
        args = (x, norm_weight, float(eps), has_bias, residual, stacked, *weights, *given)
        outs = list(_RMSNormLinearEager.apply(*args))
    else:
        outs = _rms_norm_linear(
            x, norm_weight, float(eps), list(weights), given, has_bias, residual, stacked
        )[:-1]
    s, outs = (None, outs) if residual is None else (outs[-1], outs[:-1])
    if stacked:
        outs = list(outs[0].split([w.shape[0] for w in weights], dim=-1))
    return s, outs


def _named(x, norm_weight, weights, biases, residual) -> dict:
    named = {"x": x, "norm_weight": norm_weight}
    named.update({f"weights[{i}]": w for i, w in enumerate(weights)})
    named.update({f"biases[{i}]": b for i, b in enumerate(biases) if b is not None})
    if residual is not None:
        named["residual"] = residual
    return named


def _check_shapes(op, x, norm_weight, weights, biases, residual) -> None:
    """Shapes (tensors: checked first), each check naming what is wrong where the one-expression test of all
    of them fails."""
    h = x.shape[-1] if x.dim() else 0
    if (
        (residual is None or residual.shape == x.shape)
        and x.dim() >= 1
        and norm_weight.shape == (h,)
        and all(w.dim() == 2 and w.shape[1] == h for w in weights)
        and all(b is None or b.shape == w.shape[:1] for w, b in zip(weights, biases))
    ):
        return
    if residual is not None:  # no broadcasting, also under autocast: s has x's shape
        check(
            residual.shape == x.shape,
            op,
            lambda: f"residual {tuple(residual.shape)} does not match x {tuple(x.shape)}",
        )
    check(x.dim() >= 1, op, "x must have at least one dim")
    check(
        norm_weight.shape == (h,),
        op,
        lambda: f"norm_weight {tuple(norm_weight.shape)} does not match x's last dim {h}",
    )
    for i, (w, b) in enumerate(zip(weights, biases)):
        check(
            w.dim() == 2 and w.shape[1] == h,
            op,
            lambda i=i, w=w: f"weights[{i}] {tuple(w.shape)} does not match x's last dim {h}",
        )
        check(
            b is None or b.shape == w.shape[:1],
            op,
            lambda i=i, w=w, b=b: (
                f"biases[{i}] {tuple(b.shape)} does not match weights[{i}] {tuple(w.shape)}"
            ),
        )
