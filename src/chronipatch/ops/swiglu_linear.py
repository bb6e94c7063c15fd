"""The MLP's gating and down projection in one op: out = (silu(g) * u) @ W.T + b.

The product h = silu(g) * u is an [N, I] activation that autograd would keep for dW. Here the backward
recomputes it, in the kernel that reads g and u for their gradients anyway (``swiglu``):
    dh         = dout @ W
    dg, du, h  = the SwiGLU backward of dh, and the forward's product again (bit-identical)
    dW         = dout.T @ h,   db = sum of dout over rows
so a layer keeps g and u only: one [N, I] tensor less per layer (80 MB at Qwen2.5-0.5B's 8192 x 4864 in bf16),
at the cost of writing h once more. dg is written over dh (each element read just before), so the backward
holds three [N, I] buffers, not four: it runs while every layer's activations are alive, and in a training
step its scratch sets the memory peak. Every result equals ``F.linear(swiglu(g, u), W, b)`` and its
gradients.
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
    autocast_like_linear,
    check,
    check_same,
    check_tensors,
    direct,
    eager_cuda,
    on_gpu,
    once_differentiable,
    same_floats,
    saveable,
)
from .swiglu import check_pair, swiglu, swiglu_bwd_h_triton, swiglu_bwd_triton, swiglu_fwd_triton

# ---------------------------------------------------------------- launchers (kernels: ``swiglu``)


def _fwd(gate: Tensor, up: Tensor, weight: Tensor, bias: Tensor | None, wrap: bool = True) -> Tensor:
    h = swiglu_fwd_triton(gate, up, wrap=wrap) if on_gpu(gate) else reference.swiglu_fwd(gate, up)
    return F.linear(h, weight, bias)


def _bwd(
    dout: Tensor, gate: Tensor, up: Tensor, weight: Tensor, need_dw: bool, need_db: bool, wrap: bool = True
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    do = as_rows(dout)
    dh = (do @ weight).view(gate.shape)
    # A frozen projection (LoRA elsewhere) needs no dW: no h then, and no dW GEMM.
    if on_gpu(gate) and need_dw:
        dg, du, h = swiglu_bwd_h_triton(dh, gate, up, wrap=wrap, into_dout=True)
    elif on_gpu(gate):
        (dg, du), h = swiglu_bwd_triton(dh, gate, up, wrap=wrap, into_dout=True), None
    else:
        (dg, du), h = (
            reference.swiglu_bwd(dh, gate, up),
            (reference.swiglu_fwd(gate, up) if need_dw else None),
        )
    dw = do.T @ as_rows(h) if need_dw else weight.new_empty(0)
    db = do.sum(0) if need_db else weight.new_empty(0)
    return dg, du, dw, db


# ---------------------------------------------------------------- registration


@triton_op("chronipatch::swiglu_linear", mutates_args=())
def _swiglu_linear(gate: Tensor, up: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return _fwd(gate, up, weight, bias)


@triton_op("chronipatch::swiglu_linear_bwd", mutates_args=())
def _swiglu_linear_bwd(
    dout: Tensor, gate: Tensor, up: Tensor, weight: Tensor, need_dw: bool, need_db: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _bwd(dout, gate, up, weight, need_dw, need_db)


def _setup(ctx, inputs, output):
    gate, up, weight, _ = inputs
    ctx.save_for_backward(gate, up, weight)


def _backward(ctx, dout):
    gate, up, weight = ctx.saved_tensors
    need_dw, need_db = ctx.needs_input_grad[2:]
    dg, du, dw, db = _swiglu_linear_bwd(dout, gate, up, weight, need_dw, need_db)
    return dg, du, dw if need_dw else None, db if need_db else None


_swiglu_linear.register_autograd(_backward, setup_context=_setup)


_direct_fwd, _direct_bwd = direct(_fwd), direct(_bwd)


class _SwiGLULinearEager(torch.autograd.Function):
    """The same launchers without custom-op dispatch, for eager CUDA calls (``eager_cuda``)."""

    @staticmethod
    def forward(ctx, gate, up, weight, bias):
        ctx.save_for_backward(gate, up, weight)
        return _direct_fwd(gate, up, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        need_dw, need_db = ctx.needs_input_grad[2:]
        # Compiled autograd traces this backward with fake tensors: the registered op then.
        bwd = _direct_bwd if eager_cuda(dout) else _swiglu_linear_bwd
        dg, du, dw, db = bwd(dout, *ctx.saved_tensors, need_dw, need_db)
        return dg, du, dw if need_dw else None, db if need_db else None


# ---------------------------------------------------------------- public


def swiglu_linear(gate: Tensor, up: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(silu(gate) * up, weight, bias)`` for gate, up ``[..., I]`` and weight ``[O, I]``, without
    keeping ``silu(gate) * up`` for the backward."""
    op = "swiglu_linear"
    tensors = (gate, up, weight) if bias is None else (gate, up, weight, bias)
    # Types, devices and dtypes in one pass; the named checks run where it fails (autocast, or an error).
    same = same_floats(*tensors)
    if not same:
        check_tensors(op, gate=gate, up=up, weight=weight, **({} if bias is None else {"bias": bias}))
    check_pair(op, gate, up)
    check(
        gate.dim() >= 1 and weight.dim() == 2 and weight.shape[1] == gate.shape[-1],
        op,
        lambda: f"weight {tuple(weight.shape)} does not match gate {tuple(gate.shape)} in its last dim",
    )
    check(
        bias is None or bias.shape == weight.shape[:1],
        op,
        lambda: f"bias {tuple(bias.shape)} does not match weight {tuple(weight.shape)}",
    )
    dtype = autocast_dtype(gate)
    if dtype is not None and gate.dtype not in (dtype, torch.float64):
        # Stock rounds h to the autocast dtype after computing it in gate's: its composition, as written.
        return F.linear(swiglu(gate, up), weight, bias)
    if dtype is not None:  # as F.linear under autocast
        weight, bias = autocast_like_linear(dtype, weight, bias)
        same = same_floats(gate, up, weight, *(() if bias is None else (bias,)))
    if not same:
        check_same(op, gate=gate, up=up, weight=weight, **({} if bias is None else {"bias": bias}))
    # The backward reads gate and up (stock keeps their product).
    gate, up = saveable(gate, weight, bias), saveable(up, weight, bias)
    tensors = (gate, up, weight) if bias is None else (gate, up, weight, bias)
    if eager_cuda(*tensors):
        return _SwiGLULinearEager.apply(gate, up, weight, bias)
    return _swiglu_linear(gate, up, weight, bias)
