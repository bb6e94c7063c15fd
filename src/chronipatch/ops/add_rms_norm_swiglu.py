"""The decoder layer's second half up to its last residual add: the residual add and the MLP's norm
inside the gate/up projections (``add_rms_norm_linear``), then the gating and the down projection
(``swiglu_linear``):
    s       = residual + x
    g, u    = rms_norm(s, w_n, eps) [W_g; W_u]^T (+ b)
    out     = (silu(g) * u) W_d^T (+ b_d)
Eager CUDA calls run both as one autograd Function (one node per layer where the two ops made two, each a
host cost per layer and step), whose backward runs ``swiglu_linear``'s and then ``add_rms_norm_linear``'s:
the same kernels, so every output and gradient is the composition's bit for bit. Traced, or off CUDA, the
composition of the two registered ops itself.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import rms_norm_linear as rnl
from . import swiglu_linear as sl
from ._utils import (
    autocast_dtype,
    check,
    check_tensors,
    eager_cuda,
    once_differentiable,
    same_floats,
    unit_stride,
)
from .rms_norm_linear import add_rms_norm_linear
from .swiglu_linear import swiglu_linear


class _AddRMSNormSwiGLUEager(torch.autograd.Function):
    """Arguments: residual, x, norm weight, eps, which of gate/up/down are biased, then the gate, up and down
    weights and the biases given."""

    @staticmethod
    def forward(ctx, residual, x, norm_weight, eps, biased, *params):
        wg, wu, wd, *biases = params
        bg, bu, bd = (biases.pop(0) if b else None for b in biased)
        gate_up_b = [b for b in (bg, bu) if b is not None]
        g, u, s, rstd = rnl._direct_fwd(x, norm_weight, eps, [wg, wu], gate_up_b, list(biased[:2]), residual)
        out = sl._direct_fwd(g, u, wd, bd)
        ctx.save_for_backward(s, norm_weight, rstd, wg, wu, g, u, wd)
        ctx.biased = biased
        return s, out

    @staticmethod
    @once_differentiable
    def backward(ctx, ds, dout):
        s, norm_weight, rstd, wg, wu, g, u, wd = ctx.saved_tensors
        need = ctx.needs_input_grad[5:]  # the three weights, then the biases given
        need_b = iter(need[3:])
        bg, bu, bd = (b and next(need_b) for b in ctx.biased)
        dg, du, dwd, dbd = sl._direct_bwd(dout, g, u, wd, need[2], bd)
        douts, need_dw, need_db = [dg, du], [need[0], need[1]], [bg, bu]
        dx, dnw, dws, dbs = rnl._direct_bwd(s, norm_weight, rstd, [wg, wu], douts, need_dw, need_db, ds)
        dws, dbs = rnl._unstack(dws, dbs, [wg, wu], need_dw, need_db, list(ctx.biased[:2]), False)
        dbd = [dbd if bd else None] if ctx.biased[2] else []
        return dx, dx, dnw, None, None, *dws, dwd if need[2] else None, *dbs, *dbd


def add_rms_norm_swiglu(
    residual: Tensor,
    x: Tensor,
    norm_weight: Tensor,
    eps: float,
    gate_up: list[Tensor],
    down: Tensor,
    gate_up_biases: list[Tensor | None] | None = None,
    down_bias: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``(s, swiglu_linear(g, u, down, down_bias))`` of ``(s, [g, u]) = add_rms_norm_linear(residual, x,
    norm_weight, eps, gate_up, gate_up_biases)``: the MLP of the normalised sum s = residual + x, and s."""
    biases = [None, None] if gate_up_biases is None else list(gate_up_biases)
    norm_weight = unit_stride(norm_weight)
    if _eager(residual, x, norm_weight, gate_up, down, biases, down_bias):
        biased = tuple(b is not None for b in (*biases, down_bias))
        given = [b for b in (*biases, down_bias) if b is not None]
        args = (residual, x, norm_weight, float(eps), biased, *gate_up, down, *given)
        return _AddRMSNormSwiGLUEager.apply(*args)
    _check(gate_up, biases, down)
    # The composition, whose ops check the rest: the same results.
    s, (g, u) = add_rms_norm_linear(residual, x, norm_weight, eps, gate_up, biases)
    return s, swiglu_linear(g, u, down, down_bias)


def _eager(residual, x, norm_weight, gate_up, down, biases, down_bias) -> bool:
    """Whether the call takes the one Function: plain CUDA tensors of one dtype outside tracing and autocast,
    and arguments that pass both ops' checks (tested here at once, formatting no message)."""
    if not (isinstance(gate_up, (list, tuple)) and len(gate_up) == 2 and len(biases) == 2):
        return False
    wg, wu = gate_up
    given = [b for b in (*biases, down_bias) if b is not None]
    tensors = (residual, x, norm_weight, wg, wu, down, *given)
    if not (
        same_floats(*tensors)
        and wg.dim() == 2
        and wg.shape == wu.shape
        and down.dim() == 2
        and down.shape[1] == wg.shape[0]
        and (down_bias is None or down_bias.shape == down.shape[:1])
        and autocast_dtype(x) is None
        and eager_cuda(*tensors)
    ):
        return False
    rnl._check_shapes("add_rms_norm_linear", x, norm_weight, gate_up, biases, residual)
    return True


def _check(gate_up, biases, down) -> None:
    """What the composition needs beyond its two ops' own checks, named before either runs."""
    op = "add_rms_norm_swiglu"
    check(
        isinstance(gate_up, (list, tuple)) and len(gate_up) == 2,
        op,
        lambda: (
            "gate_up must be a list [W_gate, W_up], got "
            + (f"{len(gate_up)} items" if isinstance(gate_up, (list, tuple)) else type(gate_up).__name__)
        ),
    )
    check(len(biases) == 2, op, lambda: f"gate_up_biases must be [b_gate, b_up] or None, got {len(biases)}")
    check_tensors(op, W_gate=gate_up[0], W_up=gate_up[1], down=down)
    wg, wu = gate_up
    check(
        wg.shape == wu.shape,
        op,
        lambda: f"W_gate {tuple(wg.shape)} and W_up {tuple(wu.shape)} differ in shape",
    )
    check(
        down.dim() == 2 and wg.dim() == 2 and down.shape[1] == wg.shape[0],
        op,
        lambda: f"down {tuple(down.shape)} is not [H_out, {wg.shape[0] if wg.dim() == 2 else '?'}]",
    )
