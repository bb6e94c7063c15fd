"""RMSNorm with HF semantics (LlamaRMSNorm, Qwen2/Qwen3/Mistral RMSNorm).

    rstd = 1 / sqrt(mean(x^2) + eps)            (fp32, per row)
    y    = w * cast_to_x_dtype(x * rstd)         (output dtype = promote(x, w))

Backward, with h = x * rstd and dh = dy * w:
    dx = rstd * (dh - h * mean(dh * h))
    dw = sum_rows(dy * cast(h))                 (fp64 accumulation; 16-bit inputs add fp32 sums of a few
                                                 rows' products, each product exact in fp32)
rstd is the op's second output, so the backward never recomputes the row statistics. For
``rms_norm_linear``, which keeps x instead of y, the backward kernel can also write y again (bit for bit the
forward's), and takes dy as up to three terms, summed in fp32 as it loads them (the projections' input
gradients, each its own GEMM's output). Its residual form normalises x = r + d (rounded to the dtype, as
torch's add), written by the forward kernel; the backward adds the sum's own gradient dx_ext to dx.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from . import reference
from ._utils import (
    HALF,
    as_rows,
    cdiv,
    check,
    check_tensors,
    direct,
    eager_cuda,
    last_dense,
    on_gpu,
    once_differentiable,
    pow2,
    same_floats,
    saveable,
    sms_for,
    unit_stride,
)

DY_TERMS = 3  # the most terms of dy the backward kernel sums as it loads them

# ---------------------------------------------------------------- kernels


@triton.jit
def _fwd_kernel(
    X, W, Y, RSTD, R, S, stride_x, stride_y, stride_r, n_rows, N, eps, BLOCK_N: tl.constexpr,
    ROWS: tl.constexpr, ADD: tl.constexpr,
):  # fmt: skip
    """y = rms_norm(x); with ADD, of x + r instead, that sum (rounded to x's dtype) written to S."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    rmask, cmask = rows < n_rows, cols < N
    mask = rmask[:, None] & cmask[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    x = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if ADD:  # torch's add of two tensors of x's dtype: the fp32 sum, rounded once
        x += tl.load(R + rows64 * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        x = x.to(X.dtype.element_ty)
        tl.store(S + rows64 * N + cols[None, :], x, mask=mask)
        x = x.to(tl.float32)
    # IEEE sqrt and division (not rsqrt.approx): rstd is correctly rounded twice, as accurate as stock's.
    # eps rounded to fp32 first, as stock adds it to an fp32 tensor (Inductor passes Python floats as fp64).
    rstd = tl.div_rn(1.0, tl.sqrt_rn(tl.sum(x * x, axis=1) / N + tl.cast(eps, tl.float32)))
    # Round h to the input dtype before the weight multiply, exactly as HF does.
    h = (x * rstd[:, None]).to(X.dtype.element_ty).to(tl.float32)
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    tl.store(Y + rows64 * stride_y + cols[None, :], (h * w[None, :]).to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=rmask)


@triton.jit
def _bwd_kernel(
    DY,
    DY1,
    DY2,
    X,
    W,
    RSTD,
    DX,
    DW_PART,
    Y,
    DX_EXT,
    stride_dy,
    stride_dy1,
    stride_dy2,
    stride_x,
    stride_dx,
    stride_y,
    stride_dx_ext,
    n_rows,
    N,
    rows_per_prog,
    BLOCK_N: tl.constexpr,
    ROWS: tl.constexpr,
    STORE_Y: tl.constexpr,
    N_DY: tl.constexpr,
    ADD_DX: tl.constexpr,
    DW_STEP_F32: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    cmask = cols < N
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    # dw sums dy * h over every row, often with heavy cancellation: accumulated in fp64, so the rounding
    # that is left is far below the final cast's (stock rounds each product to the input dtype).
    dw = tl.zeros([BLOCK_N], dtype=tl.float64)
    start = pid * rows_per_prog
    end = tl.minimum(start + rows_per_prog, n_rows)
    for r0 in range(start, end, ROWS):
        rows = r0 + tl.arange(0, ROWS)
        rmask = rows < end
        mask = rmask[:, None] & cmask[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        x = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if N_DY > 1:
            dy += tl.load(DY1 + rows64 * stride_dy1 + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if N_DY > 2:
            dy += tl.load(DY2 + rows64 * stride_dy2 + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
        h = x * rstd[:, None]
        if DW_STEP_F32:
            # 16-bit x and one 16-bit dy term: each product is exact in fp32 (11 + 11 significant bits at
            # most) unless it leaves fp32's normal range. A step's ROWS products are summed in fp32 and only
            # that sum is widened: one conversion to fp64 per column a step, not two per element (they issue
            # at a fraction of fp32's rate; 0-0.7 us of the H100's backward at the default tiles).
            dw += tl.sum(dy * h.to(X.dtype.element_ty).to(tl.float32), axis=0).to(tl.float64)
        else:
            dw += tl.sum(dy.to(tl.float64) * h.to(X.dtype.element_ty).to(tl.float64), axis=0)
        dh = dy * w[None, :]
        dx = rstd[:, None] * (dh - h * (tl.sum(dh * h, axis=1) / N)[:, None])
        if ADD_DX:  # x's gradient from its other uses (the residual form's sum)
            ext = tl.load(DX_EXT + rows64 * stride_dx_ext + cols[None, :], mask=mask, other=0.0)
            dx += ext.to(tl.float32)
        # dx may be written over dy (``into_dy``): each row's dy is loaded above, by this program alone.
        tl.store(DX + rows64 * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        if STORE_Y:  # the forward's output again, rounded as ``_fwd_kernel`` rounds it
            y = h.to(X.dtype.element_ty).to(tl.float32) * w[None, :]
            tl.store(Y + rows64 * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    # One fp64 partial row per program, summed in a fixed order afterwards: deterministic.
    tl.store(DW_PART + pid * N + cols, dw, mask=cmask)


@triton.jit
def _dw_sum_kernel(PART, DW, progs, N, stride, BR: tl.constexpr, BC: tl.constexpr, VIA_F32: tl.constexpr):
    """dw = the column sums of the backward's [progs, N] fp64 partial rows, in the weight's dtype: BC columns
    a program, BR rows a step, summed in a fixed order. One launch of 2.7-4.5 us where torch's sum and cast
    took two of 10-13 in the eager backward (H100; bench/rms_dw_sum.py, 2026-12-06)."""
    cols = tl.program_id(0) * BC + tl.arange(0, BC)
    cmask = cols < N
    acc = tl.zeros([BR, BC], dtype=tl.float64)
    for r0 in range(0, progs, BR):
        rows = r0 + tl.arange(0, BR)
        mask = (rows < progs)[:, None] & cmask[None, :]
        acc += tl.load(PART + rows.to(tl.int64)[:, None] * stride + cols[None, :], mask=mask, other=0.0)
    dw = tl.sum(acc, axis=0)
    if VIA_F32:  # a 16-bit weight: through fp32, as torch casts fp64 to a 16-bit dtype
        dw = dw.to(tl.float32)
    tl.store(DW + cols, dw.to(DW.dtype.element_ty), mask=cmask)


# ---------------------------------------------------------------- launchers


def _tiles(n: int) -> tuple[int, int, int]:
    block = max(pow2(n), 1)  # rows of width 0 launch nothing, but size the launch all the same
    rows = max(1, min(16, 2048 // block))  # several short rows per program (Qwen3 q/k_norm, d=128)
    warps = 4 if block <= 1024 else 8 if block <= 4096 else 16
    return block, rows, warps


def _bwd_tiles(n: int) -> tuple[int, int, int, int]:
    """The backward's (block, rows per step, warps, programs per SM). Each program stores an fp64 partial row
    of dw: more programs keep more rows in flight, and each costs a partial row written and summed.
    - Rows of 128 or fewer (Qwen3's q/k norms; measured at 128): 4 rows, one warp, 16 programs an SM, 48 us
      at 131,072 x 128, where the forward's tiles (16 rows, 4 warps) at 8 an SM took 85 (H100,
      bench/rms_kernels.py, 2026-12-06).
    - 2048 columns: 2 rows, 4 warps, 3 programs an SM, 52 us at 8192 rows (one row, 8 warps: 57; 4 rows: 51,
      but they spill registers in rms_norm_linear's form; the same sweep).
    - Otherwise the forward's tiles, 8 programs an SM up to 1024 columns and 2 above: the fastest of 1 to 16
      on the H200 at 8192 rows (fwd + bwd 36 us at 896 columns and 112 at 4096, where 4 took 40 and 124;
      bench/results/2026-12-03-h200/rms_ab_call20.log).
    The H100 times include torch's sum of the partial rows, which ``dw_sum`` has since replaced."""
    block, rows, warps = _tiles(n)
    if block <= 128:
        return block, 4, 1, 16
    if block == 2048:
        return block, 2, 4, 3
    return block, rows, warps, 8 if block <= 1024 else 2


def _sum_tiles(block: int) -> tuple[int, int]:
    """``_dw_sum_kernel``'s (rows a step, columns a program): of bench/rms_dw_sum.py's tiles on the H100, the
    fastest at 896, 2048 and 128 columns (1,056, 396 and 2,112 partial rows), 0.1 us behind it at 4096."""
    return (128, 4) if block <= 1024 else (64, 8)


def dw_step_f32(x: Tensor, dys: Sequence[Tensor], weight: Tensor) -> bool:
    """Whether the backward may sum a step's dw products in fp32 before widening them: where each product
    is exact in fp32, of one 16-bit dy term and 16-bit x, and dw is rounded to 16 bits at the end (an fp32
    weight's rounding would be as fine as the step sums')."""
    return len(dys) == 1 and x.dtype in HALF and dys[0].dtype in HALF and weight.dtype in HALF


def _out_dtype(x: Tensor, weight: Tensor) -> torch.dtype:
    # torch.promote_types is a dispatched op (~1 us of host per call); the common case needs none.
    return x.dtype if x.dtype == weight.dtype else torch.promote_types(x.dtype, weight.dtype)


def _rows(t: Tensor) -> Tensor:
    return last_dense(as_rows(t))


def rms_norm_fwd_triton(x: Tensor, weight: Tensor, eps: float, wrap: bool = True) -> tuple[Tensor, Tensor]:
    return _fwd(x, weight, eps, wrap)[:2]


def rms_norm_add_fwd_triton(
    x: Tensor, residual: Tensor, weight: Tensor, eps: float, wrap: bool = True
) -> tuple[Tensor, Tensor, Tensor]:
    """(y, rstd, s) of s = residual + x (x's dtype and shape, contiguous): y = rms_norm(s)."""
    return _fwd(x, weight, eps, wrap, residual)


def _fwd(x, weight, eps, wrap, residual=None):
    n = x.shape[-1]
    x2 = _rows(x)
    m = x2.shape[0]
    y = torch.empty(x.shape, dtype=_out_dtype(x, weight), device=x.device)
    rstd = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    add = residual is not None
    r2 = _rows(residual) if add else x2  # stand-ins never read or written without the residual
    s = torch.empty(x.shape, dtype=x.dtype, device=x.device) if add else y
    block, rows, warps = _tiles(n)
    if n == 0:  # the mean of no squares: NaN, as stock's (the output is empty)
        rstd.fill_(float("nan"))
    if m > 0 and n > 0:
        (wrap_triton(_fwd_kernel) if wrap else _fwd_kernel)[(cdiv(m, rows),)](
            x2, weight, y, rstd, r2, s, x2.stride(0), n, r2.stride(0), m, n, eps, BLOCK_N=block, ROWS=rows,
            ADD=add, num_warps=warps,
        )  # fmt: skip
    return y, rstd, s if add else None


def rms_norm_bwd_triton(
    dy: Tensor, x: Tensor, weight: Tensor, rstd: Tensor, wrap: bool = True
) -> tuple[Tensor, Tensor]:
    return _bwd(dy, x, weight, rstd, wrap, store_y=False)[:2]


def rms_norm_bwd_y_triton(
    dy: Tensor | Sequence[Tensor], x: Tensor, weight: Tensor, rstd: Tensor, wrap: bool = True,
    store_y: bool = True, into_dy: bool = False, dx_ext: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:  # fmt: skip
    """(dx, dweight, y): the backward that also writes the forward's output again (None unless
    ``store_y``). ``dy`` may be a sequence of 1 to ``DY_TERMS`` tensors shaped like x, whose sum is the
    gradient; ``dx_ext``, shaped like x, is added to dx (x's gradient from its other uses).
    With ``into_dy`` dx is written over the first (a temporary of the caller's): one [N, H] buffer less."""
    return _bwd(dy, x, weight, rstd, wrap, store_y=store_y, into_dy=into_dy, dx_ext=dx_ext)


def _bwd(dy, x, weight, rstd, wrap, store_y, into_dy=False, dx_ext=None):
    dys = [dy] if isinstance(dy, Tensor) else list(dy)
    if not 1 <= len(dys) <= DY_TERMS:  # the kernel would silently drop a fourth
        raise ValueError(f"rms_norm backward: 1 to {DY_TERMS} gradient terms, got {len(dys)}")
    dy = dys[0]
    n = x.shape[-1]
    x2, dy2 = _rows(x), _rows(dy)
    more = [_rows(d) for d in dys[1:]]
    more += [dy2] * (2 - len(more))  # stand-ins, never read
    m = x2.shape[0]
    reuse = into_dy and dy2.is_contiguous() and dy.dtype == x.dtype and dy.shape == x.shape
    dx = dy2.view(x.shape) if reuse else torch.empty(x.shape, dtype=x.dtype, device=x.device)
    # dx stands in for y where it is not stored: never written as y.
    y = torch.empty(x.shape, dtype=_out_dtype(x, weight), device=x.device) if store_y else dx
    ext = _rows(dx_ext) if dx_ext is not None else dx  # a stand-in never read without it
    block, rows, warps, per_sm = _bwd_tiles(n)
    progs = max(1, min(cdiv(m, rows), per_sm * sms_for(x)))
    rows_per_prog = cdiv(max(m, 1), progs)
    # Every launched program stores its partial row (zeros when it has no rows): no fill unless nothing runs.
    dw_part = (torch.empty if m > 0 else torch.zeros)(progs, n, dtype=torch.float64, device=x.device)
    if m > 0 and n > 0:
        (wrap_triton(_bwd_kernel) if wrap else _bwd_kernel)[(progs,)](
            dy2,
            *more,
            x2,
            weight,
            rstd,
            dx,
            dw_part,
            y,
            ext,
            dy2.stride(0),
            *(d.stride(0) for d in more),
            x2.stride(0),
            n,
            n,
            ext.stride(0) if dx_ext is not None else n,
            m,
            n,
            rows_per_prog,
            BLOCK_N=block,
            ROWS=rows,
            STORE_Y=store_y,
            N_DY=len(dys),
            ADD_DX=dx_ext is not None,
            DW_STEP_F32=dw_step_f32(x, dys, weight),
            num_warps=warps,
        )
    return dx, dw_sum(dw_part, weight.dtype, wrap), y if store_y else None


def dw_sum(
    part: Tensor, dtype: torch.dtype, wrap: bool = True, tiles: tuple[int, int] | None = None
) -> Tensor:
    """The column sums of the backward's [programs, N] fp64 partial rows of dw, in ``dtype``; ``tiles``
    (rows a step, columns a program) in place of ``_sum_tiles``'s, for bench/rms_dw_sum.py's sweep."""
    part = last_dense(part)
    progs, n = part.shape
    dw = torch.empty(n, dtype=dtype, device=part.device)
    br, bc = tiles or _sum_tiles(pow2(n))
    if n > 0:
        (wrap_triton(_dw_sum_kernel) if wrap else _dw_sum_kernel)[(cdiv(n, bc),)](
            part, dw, progs, n, part.stride(0), BR=br, BC=bc, VIA_F32=dtype in HALF, num_warps=4
        )
    return dw


# ---------------------------------------------------------------- registration


@triton_op("chronipatch::rms_norm", mutates_args=())
def _rms_norm(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    if on_gpu(x):
        return rms_norm_fwd_triton(x, weight, eps)
    return reference.rms_norm_fwd(x, weight, eps)


@triton_op("chronipatch::rms_norm_bwd", mutates_args=())
def _rms_norm_bwd(dy: Tensor, x: Tensor, weight: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor]:
    if on_gpu(x):
        return rms_norm_bwd_triton(dy, x, weight, rstd)
    return reference.rms_norm_bwd(dy, x, weight, rstd)


def _setup(ctx, inputs, output):
    x, weight, _ = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dw = _rms_norm_bwd(dy, x, weight, rstd)
    return dx, dw, None


_rms_norm.register_autograd(_backward, setup_context=_setup)


_direct_fwd, _direct_bwd = direct(rms_norm_fwd_triton), direct(rms_norm_bwd_triton)


class _RMSNormEager(torch.autograd.Function):
    """The same launchers without custom-op dispatch, for eager CUDA calls (``eager_cuda``)."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        y, rstd = _direct_fwd(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        # Compiled autograd traces this backward with fake tensors: the registered op then.
        bwd = _direct_bwd if eager_cuda(dy) else _rms_norm_bwd
        dx, dw = bwd(dy, *ctx.saved_tensors)
        return dx, dw, None


# ---------------------------------------------------------------- public


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """HF RMSNorm over the last dim of ``x`` (any leading shape) with weight ``[N]``."""
    weight = unit_stride(weight)
    if not (same_floats(x, weight) and x.dim() >= 1 and weight.dim() == 1 and weight.shape[0] == x.shape[-1]):
        _check(x, weight)
    x = saveable(x, weight)  # the backward reads x (stock keeps its normalised copy)
    if eager_cuda(x, weight):
        return _RMSNormEager.apply(x, weight, float(eps))
    return _rms_norm(x, weight, float(eps))[0]


def _check(x: Tensor, weight: Tensor) -> None:
    """The arguments' checks, each naming what is wrong (``rms_norm`` runs them where its one test fails)."""
    check_tensors("rms_norm", x=x, weight=weight)
    check(
        x.is_floating_point() and weight.is_floating_point(),
        "rms_norm",
        lambda: f"x and weight must be floating point, got {x.dtype} and {weight.dtype}",
    )
    check(
        x.device == weight.device, "rms_norm", lambda: f"weight is on {weight.device} but x is on {x.device}"
    )
    check(x.dim() >= 1, "rms_norm", "x must have at least one dim")
    check(
        weight.dim() == 1 and weight.shape[0] == x.shape[-1],
        "rms_norm",
        lambda: f"weight shape {tuple(weight.shape)} does not match the last dim of x {tuple(x.shape)}",
    )
