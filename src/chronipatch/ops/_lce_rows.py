"""The loss and its gradients in one pass, for bf16 training: three GEMMs where the recompute path takes four.

The backward of ``_lce_tiles`` computes the logits again (its fourth GEMM) because g needs each row's final
max m and sum s, known only after the whole vocabulary. Here the rows go in chunks of R: per chunk the tile
forward also stores p = exp(z - m_j) (fp16, [R, V]; m_j the max of the row in the tile of column j); once the
merge has the row's m and s, one memory-bound pass turns p into g in place,
    g = p exp(m_j - m) / s * c,   g_y = (exp(z_y - m) / s - 1) * c,   g = 0 in an ignored row,
with c = 1 / divisor the loss's weight of every row; then dh[chunk] = g W and dW += g^T h are cuBLAS GEMMs.
exp(z - m_j) exp(m_j - m) = exp(z - m): the same g as the recompute path's, up to p's fp16 rounding (2^-12,
below the 2^-9 of g's bf16 one; a p below fp16's normal range adds at most 2^-25 c, far below the sums' bf16
resolution). dW adds one bf16 rounding per chunk after the first; chunks of ``P_BYTES`` of p keep them few.

The gradients are of the loss itself, so the autograd backward only scales them by its upstream gradient
(exact when that is 1 or a power of 2). fp16 inputs keep the recompute path: under a loss scaler their
gradients, computed before the scale is known, would leave fp16's range.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._lce_tiles import tiles_fwd
from ._math import centred
from ._utils import cdiv

P_BYTES = 512 << 20  # bytes of one chunk of p (and g): rows per chunk = P_BYTES // (2 V), a multiple of BM
GRAD_BLOCK = 2048  # columns per program of the kernel that turns p into g


@triton.jit
def _grad_kernel(
    P, G, MP, M, S, ZLAB, LABELS, SCALE, stride_g, vocab, n_tiles_v, ignore_index, BN: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """In place over a row's p = exp(z - m_j) (P, fp16) as g (G, bf16: another view of the same memory):
    g = p exp(m_j - m) / s * c, the label's entry (exp(z_y - m) / s - 1) * c, 0 in an ignored row. The forms
    are the recompute path's: exp(centred(m_j, m)) is 1 where a +inf tile max is the row's, and a nan logit
    makes its row nan, as stock's."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    live = cols < vocab
    y = tl.load(LABELS + row)
    m = tl.load(M + row)
    s = tl.load(S + row)
    scale = tl.load(SCALE)
    mj = tl.load(MP + row * n_tiles_v + cols // BN, mask=live, other=float("-inf"))
    p = tl.load(P + row * stride_g + cols, mask=live, other=0.0).to(tl.float32)
    g = p * tl.exp(centred(mj, m)) * (scale / s)
    gy = (tl.exp(centred(tl.load(ZLAB + row), m)) / s - 1.0) * scale
    g = tl.where(cols == y, gy, g)
    g = tl.where(y != ignore_index, g, 0.0)  # exactly 0, even where the row's logits are nan
    tl.store(G + row * stride_g + cols, g.to(G.dtype.element_ty), mask=live)


def dw_rows(hidden: Tensor, labels: Tensor, ignore_index: int) -> Tensor:
    """The hidden rows that dW sums g_i h_i over: an ignored row's g is 0, and its hidden state (inf or nan
    there is allowed) must not make that a nan, so it is zeroed."""
    return torch.where((labels != ignore_index).unsqueeze(1), hidden, 0.0)


def rows_fwd_bwd(
    hidden: Tensor, weight: Tensor, labels: Tensor, ignore_index: int, token_stats: bool, scale: Tensor,
    need_dh: bool, need_dw: bool,
) -> tuple[Tensor, ...]:  # fmt: skip
    """(m, s, entropy sum, argmax, label logit) per row as ``tiles_fwd``, then dh and dw of sum_i c l_i
    (bf16 hidden and weight; ``scale`` = c, one fp32 element); one that is not needed is empty."""
    n = hidden.shape[0]
    vocab = weight.shape[0]
    dh = torch.empty_like(hidden) if need_dh else hidden.new_empty(0)
    dw = (torch.empty_like(weight) if n > 0 else torch.zeros_like(weight)) if need_dw else weight.new_empty(0)
    h_w = dw_rows(hidden, labels, ignore_index) if need_dw else None

    def on_rows(r0: int, p: Tensor, mp: Tensor, bn: int, m: Tensor, s: Tensor, zlab: Tensor) -> None:
        k = p.shape[0]
        g = p.view(torch.bfloat16)
        _grad_kernel[(k, cdiv(vocab, GRAD_BLOCK))](
            p, g, mp, m, s, zlab, labels[r0:], scale, p.stride(0), vocab, mp.shape[1], ignore_index, BN=bn,
            BLOCK=GRAD_BLOCK, num_warps=4,
        )  # fmt: skip
        if need_dh:
            torch.mm(g, weight, out=dh[r0 : r0 + k])
        if need_dw:
            if r0 == 0:
                torch.mm(g.T, h_w[:k], out=dw)
            else:
                dw.addmm_(g.T, h_w[r0 : r0 + k])

    out = tiles_fwd(hidden, weight, labels, ignore_index, token_stats, on_rows, P_BYTES // (2 * vocab))
    return (*out, dh, dw)
