"""dW's label rows in the one pass (``_lce_rows``), rounded once as stock's one GEMM rounds them.

Row y of dW is sum_i g_iy h_i over every row i. dW's GEMM sums p^T (r h) (p's label entry q standing for g's
g_y / r) and rounds once per chunk; for a label row that rounding and then the exact remainders'
    dW[y] = sum_i p_iy (r_i h_i)  +  sum_{i: y_i = y} g_y,i h_i - q_i (r_i h_i)
would round it twice or more: 1.40x stock's error at a random-init head in one chunk, 1.98x over five
(bench/results/2026-12-07-h100). So the first sum is kept apart in fp32 for the D distinct labels:
``label_sums`` per chunk, a GEMM [D, R] x [R, H] over p's label columns, gathered in the kernel (2 D N H over
the chunks; D <= min(N, V), known only on the device, so the programs past it return at once); then
``set_label_rows`` adds the remainders, the label's rows in a fixed order, and rounds once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._lce_tiles import _scored
from ._utils import cdiv, device_of, pow2

SUM_J, SUM_R, SUM_H = 64, 64, 128  # the label sums' tile: labels, rows of the chunk a step, features
LABEL_ROWS, LABEL_COLS = 16, 256  # the label-rows kernel's step: rows of one label, and features a program


@triton.jit
def _label_sums_kernel(
    SUMS, P, HR, COLS, COUNT, rows, hdim, stride_s, stride_p, stride_hr,
    BJ: tl.constexpr, BR: tl.constexpr, BH: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """SUMS[j] += sum_i P[i, COLS[j]] HR[i] for BJ distinct labels j < COUNT and BH features, over the chunk's
    rows: p's label columns gathered straight from p (sorted columns: neighbours share sectors), an fp32 dot
    a step. The feature blocks of one label block are neighbouring programs, so their gathers meet in L2.
    UPCAST as ``_lce_tiles._tile_logits`` (the interpreter's dot reads bf16 as raw integers)."""
    j0 = tl.program_id(1) * BJ
    if j0 < tl.load(COUNT):
        js = j0 + tl.arange(0, BJ)
        hs = tl.program_id(0) * BH + tl.arange(0, BH)
        j_ok = js < tl.load(COUNT)
        h_ok = hs < hdim
        cols = tl.load(COLS + js, mask=j_ok, other=0)
        acc = tl.zeros((BJ, BH), dtype=tl.float32)
        for i0 in range(0, rows, BR):
            i = i0 + tl.arange(0, BR)
            i_ok = i < rows
            a_ptrs = P + i[None, :].to(tl.int64) * stride_p + cols[:, None]
            a = tl.load(a_ptrs, mask=j_ok[:, None] & i_ok[None, :], other=0.0)
            b_ptrs = HR + i[:, None].to(tl.int64) * stride_hr + hs[None, :]
            b = tl.load(b_ptrs, mask=i_ok[:, None] & h_ok[None, :], other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc)
        ptrs = SUMS + js[:, None].to(tl.int64) * stride_s + hs[None, :]
        mask = j_ok[:, None] & h_ok[None, :]
        tl.store(ptrs, tl.load(ptrs, mask=mask) + acc, mask=mask)


@triton.jit
def _label_rows_kernel(
    DW, SUMS, H, ORDER, SORTED, SLOT, END, R, GLAB, QLAB, stride_dw, stride_s, stride_h, hdim, vocab,
    ignore_index, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """dW's label rows, BLOCK features of a label y: dW[y] = SUMS[SLOT[j]] + sum_{i: y_i = y} g_i h_i -
    q_i r_i h_i, rounded once: SUMS the fp32 sum of every row's p entry at y times r h (``label_sums``), the
    rest the exact remainders (r h rounded to h's dtype, as the GEMMs took it), exact products summed in fp32
    over the label's rows in sorted order, ROWS at a time (ORDER: a stable argsort of the labels, SORTED the
    sorted labels, SLOT each place's distinct label, END the end of each one's run, j its start). The program
    at the first row of a run does the work, the others return: each row of dW has one writer, in a fixed
    order."""
    j = tl.program_id(0)
    y = tl.load(SORTED + j)
    first = (j == 0) | (tl.load(SORTED + tl.maximum(j - 1, 0)) != y)
    if first & _scored(y, ignore_index, vocab):
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        col_ok = cols < hdim
        end = tl.load(END + j)
        acc = tl.load(SUMS + tl.load(SLOT + j) * stride_s + cols, mask=col_ok, other=0.0)
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


def label_order(labels: Tensor, vocab: int) -> tuple[Tensor, ...]:
    """(sorted labels, a stable argsort, each sorted place's slot among the distinct labels, the distinct
    labels clamped into [0, V) as columns of p (the tail past their count repeats column 0), that count as a
    1-element tensor): the label order of ``label_sums`` and ``set_label_rows``, with no host sync."""
    sorted_y, order = torch.sort(labels, stable=True)
    first = torch.ones_like(sorted_y, dtype=torch.bool)
    first[1:] = sorted_y[1:] != sorted_y[:-1]
    slot = first.cumsum(0) - 1
    cols = torch.zeros_like(sorted_y).scatter_(0, slot, sorted_y.clamp(0, max(vocab - 1, 0)))
    return sorted_y, order, slot, cols, slot[-1:] + 1


def label_sums(sums: Tensor, p: Tensor, h_r: Tensor, cols: Tensor, count: Tensor) -> None:
    """sums[j] += p[:, cols[j]]^T (r h) in fp32 for one chunk and each distinct label j < count: each label
    column's share of dW's GEMM, summed over the chunks without rounding."""
    rows, hdim = h_r.shape
    if rows == 0:
        return
    with device_of(p):
        _label_sums_kernel[(cdiv(hdim, SUM_H), cdiv(cols.shape[0], SUM_J))](
            sums, p, h_r, cols, count, rows, hdim, sums.stride(0), p.stride(0), h_r.stride(0),
            BJ=SUM_J, BR=SUM_R, BH=SUM_H, UPCAST=not p.is_cuda, num_warps=4,
        )  # fmt: skip


def set_label_rows(
    dw: Tensor, sums: Tensor, hidden: Tensor, order: tuple[Tensor, ...], r: Tensor, g_label: Tensor,
    q_label: Tensor, ignore_index: int,
) -> None:  # fmt: skip
    """dW[y] = sums[slot] + sum_{i: y_i = y} g_i h_i - q_i (r_i h_i), rounded once, for every label y in
    place (``order``: ``label_order``'s sorted labels, argsort and slots; r, g_label, q_label: [N] fp32, the
    settle kernel's factor, g's label entry and p's). torch's index_add_ would sum with atomics on CUDA, in
    no fixed order; the rows go in label order instead."""
    n, hdim = hidden.shape
    if n == 0:
        return
    sorted_y, perm, slot = order
    end = torch.searchsorted(sorted_y, sorted_y, right=True)
    block = min(pow2(hdim), LABEL_COLS)
    with device_of(hidden):
        _label_rows_kernel[(n, cdiv(hdim, block))](
            dw, sums, hidden, perm, sorted_y, slot, end, r, g_label, q_label, dw.stride(0), sums.stride(0),
            hidden.stride(0), hdim, dw.shape[0], ignore_index, ROWS=LABEL_ROWS, BLOCK=block, num_warps=4,
        )  # fmt: skip
