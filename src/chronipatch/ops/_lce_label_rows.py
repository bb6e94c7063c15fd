"""dW's label rows in the one pass (``_lce_rows``), rounded once as stock's one GEMM rounds them.

Row y of dW is sum_i g_iy h_i over every row i. dW's GEMM sums p^T (r h) (p's label entry q standing for g's
g_y / r) and rounds once per chunk; for a label row that rounding and then the exact remainders'
    dW[y] = sum_i p_iy (r_i h_i)  +  sum_{i: y_i = y} g_y,i h_i - q_i (r_i h_i)
would round it twice or more: 1.40x stock's error at a random-init head in one chunk, 1.98x over five
(bench/results/2026-12-07-h100). So the first sum is kept apart in fp32: ``label_sums`` per chunk, p's
columns at every row's label gathered (index_select, in label order: a frequent label's column repeats)
and an fp32-output cuBLAS GEMM, [N, R] x [R, H] (2 N^2 H over the chunks); then ``set_label_rows`` adds the
remainders, the label's rows in a fixed order, and rounds once. A Triton GEMM over the D distinct labels
alone, gathering p's columns itself, took 1.3 ms at 8192 x 896 where this form takes 0.45 (H200,
bench/results/2026-12-07-h200): the gather's scattered reads, not the GEMM, are the cost.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._lce_tiles import _scored
from ._utils import addmm_acc, cdiv, device_of, pow2

LABEL_ROWS, LABEL_COLS = 16, 256  # the label-rows kernel's step: rows of one label, and features a program


@triton.jit
def _label_rows_kernel(
    DW, SUMS, H, ORDER, SORTED, END, R, GLAB, QLAB, stride_dw, stride_s, stride_h, hdim, vocab,
    ignore_index, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """dW's label rows, BLOCK features of a label y: dW[y] = SUMS[j] + sum_{i: y_i = y} g_i h_i -
    q_i r_i h_i, rounded once: SUMS the fp32 sum of every row's p entry at y times r h (``label_sums``), the
    rest the exact remainders (r h rounded to h's dtype, as the GEMMs took it), exact products summed in fp32
    over the label's rows in sorted order, ROWS at a time (ORDER: a stable argsort of the labels, SORTED the
    sorted labels, END the end of each one's run, j its start). The program at the first row of a run does
    the work, the others return: each row of dW has one writer, in a fixed order."""
    j = tl.program_id(0)
    y = tl.load(SORTED + j)
    first = (j == 0) | (tl.load(SORTED + tl.maximum(j - 1, 0)) != y)
    if first & _scored(y, ignore_index, vocab):
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        col_ok = cols < hdim
        end = tl.load(END + j)
        acc = tl.load(SUMS + j.to(tl.int64) * stride_s + cols, mask=col_ok, other=0.0)
        # ROWS rows a step: a frequent token's run (a few % of the rows in text) in few dependent loads.
        for i0 in range(j, end, ROWS):
            i = i0 + tl.arange(0, ROWS)
            live = i < end
            rows = tl.load(ORDER + i, mask=live, other=0)
            g = tl.load(GLAB + rows, mask=live, other=0.0)[:, None]
            q = tl.load(QLAB + rows, mask=live, other=0.0)[:, None]
            r = tl.load(R + rows, mask=live, other=0.0)[:, None]
            mask = live[:, None] & col_ok[None, :]
            h = tl.load(H + rows[:, None] * stride_h + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            h_r = (h * r).to(H.dtype.element_ty).to(tl.float32)  # h holds H's values exactly
            acc += tl.sum(g * h - q * h_r, axis=0)
        tl.store(DW + y * stride_dw + cols, acc.to(DW.dtype.element_ty), mask=col_ok)


def label_order(labels: Tensor, vocab: int) -> tuple[Tensor, Tensor, Tensor]:
    """(sorted labels, a stable argsort, the sorted labels clamped into [0, V) as columns of p): the label
    order of ``label_sums`` and ``set_label_rows`` (no host sync)."""
    sorted_y, order = torch.sort(labels, stable=True)
    return sorted_y, order, sorted_y.clamp(0, max(vocab - 1, 0))


def label_sums(sums: Tensor, p: Tensor, cols: Tensor, h_r: Tensor) -> None:
    """sums += p[:, cols]^T (r h) in fp32 for one chunk: each label column's share of dW's GEMM, summed over
    the chunks without rounding (a label in every row's sorted place)."""
    addmm_acc(sums, p.index_select(1, cols).T, h_r)


def set_label_rows(
    dw: Tensor, sums: Tensor, hidden: Tensor, order: tuple[Tensor, Tensor], r: Tensor, g_label: Tensor,
    q_label: Tensor, ignore_index: int,
) -> None:  # fmt: skip
    """dW[y] = sums[j] + sum_{i: y_i = y} g_i h_i - q_i (r_i h_i), rounded once, for every label y in place,
    j its first place in label order (``order``: ``label_order``'s sorted labels and argsort; r, g_label,
    q_label: [N] fp32, the settle kernel's factor, g's label entry and p's). torch's index_add_ would sum with
    atomics on CUDA, in no fixed order; the rows go in label order instead."""
    n, hdim = hidden.shape
    if n == 0:
        return
    sorted_y, perm = order
    end = torch.searchsorted(sorted_y, sorted_y, right=True)
    block = min(pow2(hdim), LABEL_COLS)
    with device_of(hidden):
        _label_rows_kernel[(n, cdiv(hdim, block))](
            dw, sums, hidden, perm, sorted_y, end, r, g_label, q_label, dw.stride(0), sums.stride(0),
            hidden.stride(0), hdim, dw.shape[0], ignore_index, ROWS=LABEL_ROWS, BLOCK=block, num_warps=4,
        )  # fmt: skip
