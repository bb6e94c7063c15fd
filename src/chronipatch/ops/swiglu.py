"""SwiGLU gating of the Llama-family MLP: out = silu(g) * u, computed in fp32.

Backward recomputes sigmoid(g) from the saved inputs instead of keeping activations:
    s  = sigmoid(g)
    dg = dout * u * s * (1 + g * (1 - s))
    du = dout * g * s
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from . import reference
from ._math import exp_for
from ._utils import (
    HALF,
    cdiv,
    check,
    check_same,
    check_tensors,
    direct,
    eager_cuda,
    on_gpu,
    once_differentiable,
    same_floats,
)

BLOCK = 2048

# ---------------------------------------------------------------- kernels


@triton.jit
def _sigmoid(g, EXACT: tl.constexpr):
    """1 / (1 + exp(-g)) with an IEEE division; EXACT (fp32 results) takes the few-ulp ``exp_f32``, else the
    hardware exp (``exp_for``): ``exp_f32`` is three hardware exp2 per element, which made the forward
    compute-bound."""
    return tl.div_rn(1.0, 1.0 + exp_for(-g, EXACT))


@triton.jit
def _fwd_kernel(G, U, O, n, BLOCK: tl.constexpr, EXACT: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(O + offs, (g * _sigmoid(g, EXACT) * u).to(O.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_kernel(DO, G, U, DG, DU, H, n, BLOCK: tl.constexpr, EXACT: tl.constexpr, STORE_H: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    do = tl.load(DO + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    s = _sigmoid(g, EXACT)
    tl.store(DG + offs, (do * u * s * (1.0 + g * (1.0 - s))).to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + offs, (do * g * s).to(DU.dtype.element_ty), mask=mask)
    if STORE_H:  # the forward's product again, as the forward kernel computes it (``swiglu_linear``)
        tl.store(H + offs, (g * s * u).to(H.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------- launchers


def swiglu_fwd_triton(gate: Tensor, up: Tensor, wrap: bool = True) -> Tensor:
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty_like(gate)
    n = gate.numel()
    if n > 0:
        kernel = wrap_triton(_fwd_kernel) if wrap else _fwd_kernel
        # 16-bit results' rounding hides the hardware exp's error; fp32 (and fp64 handed to the launcher
        # directly) takes the exact one
        exact = gate.dtype not in HALF
        kernel[(cdiv(n, BLOCK),)](gate, up, out, n, BLOCK=BLOCK, EXACT=exact, num_warps=8)
    return out


def swiglu_bwd_triton(
    dout: Tensor, gate: Tensor, up: Tensor, wrap: bool = True, into_dout: bool = False
) -> tuple[Tensor, Tensor]:
    return _bwd(dout, gate, up, wrap, store_h=False, into_dout=into_dout)[:2]


def swiglu_bwd_h_triton(
    dout: Tensor, gate: Tensor, up: Tensor, wrap: bool = True, into_dout: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """(dgate, dup, silu(gate) * up): the backward that also recomputes the forward's result. With
    ``into_dout`` dgate is written over ``dout`` (a temporary of the caller's, read element by element just
    before): one [N, I] buffer less at the backward's peak."""
    return _bwd(dout, gate, up, wrap, store_h=True, into_dout=into_dout)


def _bwd(dout, gate, up, wrap, store_h, into_dout=False):
    dout, gate, up = dout.contiguous(), gate.contiguous(), up.contiguous()
    reuse = into_dout and dout.dtype == gate.dtype and dout.shape == gate.shape
    dg, du = dout if reuse else torch.empty_like(gate), torch.empty_like(up)
    h = torch.empty_like(gate) if store_h else dg  # dg: a placeholder the kernel never writes
    n = gate.numel()
    if n > 0:
        kernel = wrap_triton(_bwd_kernel) if wrap else _bwd_kernel
        exact = gate.dtype not in HALF
        kernel[(cdiv(n, BLOCK),)](
            dout, gate, up, dg, du, h, n, BLOCK=BLOCK, EXACT=exact, STORE_H=store_h, num_warps=8
        )
    return dg, du, h


# ---------------------------------------------------------------- registration


@triton_op("chronipatch::swiglu", mutates_args=())
def _swiglu(gate: Tensor, up: Tensor) -> Tensor:
    if on_gpu(gate):
        return swiglu_fwd_triton(gate, up)
    return reference.swiglu_fwd(gate, up)


@triton_op("chronipatch::swiglu_bwd", mutates_args=())
def _swiglu_bwd(dout: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    if on_gpu(gate):
        return swiglu_bwd_triton(dout, gate, up)
    return reference.swiglu_bwd(dout, gate, up)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, dout):
    gate, up = ctx.saved_tensors
    return _swiglu_bwd(dout, gate, up)


_swiglu.register_autograd(_backward, setup_context=_setup)


_direct_fwd, _direct_bwd = direct(swiglu_fwd_triton), direct(swiglu_bwd_triton)


class _SwiGLUEager(torch.autograd.Function):
    """The same launchers without custom-op dispatch, for eager CUDA calls (``eager_cuda``)."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return _direct_fwd(gate, up)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        # Compiled autograd traces this backward with fake tensors: the registered op then.
        return (_direct_bwd if eager_cuda(dout) else _swiglu_bwd)(dout, *ctx.saved_tensors)


# ---------------------------------------------------------------- public


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """``silu(gate) * up`` for same-shape, same-dtype tensors."""
    if not (same_floats(gate, up) and gate.shape == up.shape):
        check_tensors("swiglu", gate=gate, up=up)
        check_same("swiglu", gate=gate, up=up)
        check_pair("swiglu", gate, up)
    if eager_cuda(gate, up):
        return _SwiGLUEager.apply(gate, up)
    return _swiglu(gate, up)


def check_pair(op: str, gate: Tensor, up: Tensor) -> None:
    """gate and up have one shape (dtype and device: ``check_same``)."""
    check(
        gate.shape == up.shape,
        op,
        lambda: f"gate {tuple(gate.shape)} and up {tuple(up.shape)} differ in shape",
    )
