"""dW's label rows in the one pass (``_lce_rows``), rounded once as stock's one GEMM rounds them.

Row y of dW is sum_i g_iy h_i over every row i. dW's GEMM sums p^T (r h) (p's label entry q standing for g's
g_y / r) and rounds once per chunk; for a label row that rounding and then the exact remainders'
    dW[y] = sum_i p_iy (r_i h_i)  +  sum_{i: y_i = y} g_y,i h_i - q_i (r_i h_i)
would round it twice or more: 1.40x stock's error at a random-init head in one chunk, 1.98x over five
(bench/results/2026-12-07-h100). So the first sum is kept apart in fp32: each distinct label gets a slot
(``label_order``; ``slot_map``: column -> slot), the tile forward stores p's label columns as it stores p into
an [N, R] buffer by slot (``_lce_tiles``: CAPTURE), the settle kernel its label entries q there too, and
``label_sums`` adds that buffer times r h per chunk, a Triton GEMM over the slots of the D distinct labels
(2 D N H over the chunks; D is known only on the device, so the programs past it return at once; the slots
past it are never written); then ``set_label_rows`` adds the remainders, the label's rows in a fixed order,
and rounds once. Gathering the columns from p after the tile forward (``slot_columns``: what the pointer-load
path still does) read 40% of p's sectors again: 0.45 ms at 8192 x 896, 6.5 at 32,768 x 896 (H200,
bench/results/2026-12-07-h200). Captured, the pass ran 0.1-0.2 ms faster at 8192 x 896 and 1.5-3.5 ms at
32,768 x 896 on the H100, dW the same bit for bit (2026-12-07-h100-b).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.tools.tensor_descriptor import TensorDescriptor

from ._lce_tiles import _scored, _tma, tile_columns
from ._utils import cdiv, device_of, pow2

# The label sums' tile (slots, features, rows of the chunk a step), warps and stages; programs past the count
# return. Operands by TMA (the tiles' copy of p's columns), 5 stages: 15-21% faster a chunk than pointer
# loads in 4 stages at hidden 896, 2048 and 4096, uniform and Zipf-like label counts (0.081 -> 0.067 ms at
# 896, 0.322 -> 0.267 at 4096); of eight TMA tiles the least in total, fastest in three of the six cases
# (bench/results/2026-12-07-h100-e).
SUMS_TILE = (128, 128, 64, 8, 5)
# The label-rows kernel's program: sorted places whose runs it writes, rows of one run a step, features, and
# warps. Of ten blocks on the H100 these ran fastest or near it with uniform labels and with Zipf's long runs
# (0.033 and 0.092 ms at 8192 x 896, against 0.042 and 0.288 with 16 rows of 256 features a step;
# bench/results/2026-12-07-h100-d, call 2).
LABEL_RUNS, LABEL_ROWS, LABEL_COLS, LABEL_WARPS = 16, 64, 64, 4


@triton.jit
def _label_sums_kernel(
    SUMS, LP, HR, LPD, HRD, COUNT, rows, hdim, stride_s, stride_lp, stride_lp_i, stride_hr,
    BJ: tl.constexpr, BH: tl.constexpr, BR: tl.constexpr, UPCAST: tl.constexpr, TMA: tl.constexpr,
):  # fmt: skip
    """SUMS[j] += sum_i LP[j, i] HR[i] for BJ slots j < COUNT (one element: the distinct labels' count, known
    only on the device) and BH features, an fp32 dot over the chunk's rows BR at a time (LP: the tiles' copy,
    unit stride over rows, or the gathered one's transpose). With TMA the operands come through the
    descriptors LPD, HRD (past the chunk's rows they read 0; slots past the count are read, never stored).
    Feature blocks of one slot block are neighbouring programs: LP's rows meet in L2. UPCAST as
    ``_lce_tiles._tile_logits``."""
    j0 = tl.program_id(1) * BJ
    count = tl.load(COUNT)
    if j0 < count:
        h0 = tl.program_id(0) * BH
        js = j0 + tl.arange(0, BJ)
        hs = h0 + tl.arange(0, BH)
        j_ok = js < count  # LP's slots past the count hold whatever the buffer held
        h_ok = hs < hdim
        acc = tl.zeros((BJ, BH), dtype=tl.float32)
        for i0 in range(0, rows, BR):
            if TMA:
                a = LPD.load([j0, i0])
                b = HRD.load([i0, h0])
            else:
                i = i0 + tl.arange(0, BR)
                i_ok = i < rows
                a_ptrs = LP + js[:, None].to(tl.int64) * stride_lp + i[None, :].to(tl.int64) * stride_lp_i
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
def _remainders(H, R, GLAB, QLAB, rows, live, cols, col_ok, stride_h):
    """g_i h_i - q_i (r_i h_i) of the rows ``rows`` (0 where ``live`` is not) over the features ``cols``: r h
    rounded to h's dtype, as dW's GEMM took it, and the products of the 2-byte values exact in fp32."""
    g = tl.load(GLAB + rows, mask=live, other=0.0)[:, None]
    q = tl.load(QLAB + rows, mask=live, other=0.0)[:, None]
    r = tl.load(R + rows, mask=live, other=0.0)[:, None]
    mask = live[:, None] & col_ok[None, :]
    h = tl.load(H + rows[:, None] * stride_h + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    h_r = (h * r).to(H.dtype.element_ty).to(tl.float32)  # h holds H's values exactly
    return g * h - q * h_r


@triton.jit
def _label_rows_kernel(
    DW, SUMS, H, ORDER, SORTED, SLOTS, END, R, GLAB, QLAB, n, stride_dw, stride_s, stride_h, hdim, vocab,
    ignore_index, RUNS: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """dW's label rows, BLOCK features of the labels whose runs start at RUNS sorted places: dW[y] =
    SUMS[slot] + sum_{i: y_i = y} g_i h_i - q_i r_i h_i, rounded once: SUMS the fp32 sum of every row's p
    entry at y times r h (``label_sums``), the rest the exact remainders (r h rounded to h's dtype, as the
    GEMMs took it), exact products summed in fp32 over the label's rows in sorted order (ORDER: a stable
    argsort of the labels, SORTED the sorted labels, SLOTS their slots, END the end of each one's run). Each
    row of dW has one writer, the program holding its run's first place, and a fixed order. A label of one
    row (most, where labels are spread over a large vocabulary) takes one [RUNS, BLOCK] step for all of them;
    a longer run, ROWS of its rows a step, so that a frequent token's run (a few % of the rows in text) takes
    few dependent loads. At 8192 x 896 on the H100 this took 0.033 ms with uniform labels (0.092 with Zipf's),
    where one program per place took 0.30 (bench/results/2026-12-07-h100-d)."""
    idx = tl.arange(0, RUNS)
    j = tl.program_id(0) * RUNS + idx
    j_ok = j < n
    y = tl.load(SORTED + j, mask=j_ok, other=ignore_index)
    first = j_ok & ((j == 0) | (tl.load(SORTED + tl.maximum(j - 1, 0), mask=j_ok) != y))
    first &= _scored(y, ignore_index, vocab)
    end = tl.load(END + j, mask=first, other=0)
    single = first & (end == j + 1)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    col_ok = cols < hdim
    # The runs of one row, together.
    mask = single[:, None] & col_ok[None, :]
    rows = tl.load(ORDER + j, mask=single, other=0)
    slot = tl.load(SLOTS + j, mask=single, other=0).to(tl.int64)
    acc = tl.load(SUMS + slot[:, None] * stride_s + cols[None, :], mask=mask, other=0.0)
    acc += _remainders(H, R, GLAB, QLAB, rows, single, cols, col_ok, stride_h)
    tl.store(DW + y.to(tl.int64)[:, None] * stride_dw + cols[None, :], acc.to(DW.dtype.element_ty), mask=mask)
    # The longer runs, one at a time (the smallest place left first).
    todo = first & (end > j + 1)
    for _ in range(0, tl.sum(todo.to(tl.int32), axis=0)):
        at = tl.min(tl.where(todo, idx, RUNS), axis=0)
        todo &= idx != at
        j1 = tl.program_id(0) * RUNS + at
        y1 = tl.load(SORTED + j1)
        end1 = tl.load(END + j1)
        acc1 = tl.load(SUMS + tl.load(SLOTS + j1).to(tl.int64) * stride_s + cols, mask=col_ok, other=0.0)
        for i0 in range(j1, end1, ROWS):
            i = i0 + tl.arange(0, ROWS)
            live = i < end1
            rows1 = tl.load(ORDER + i, mask=live, other=0)
            acc1 += tl.sum(_remainders(H, R, GLAB, QLAB, rows1, live, cols, col_ok, stride_h), axis=0)
        tl.store(DW + y1 * stride_dw + cols, acc1.to(DW.dtype.element_ty), mask=col_ok)


def label_order(labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(sorted labels, a stable argsort, each sorted label's slot: its rank among the distinct labels): the
    label order of ``slot_map``, ``label_sums`` and ``set_label_rows`` (no host sync)."""
    sorted_y, order = torch.sort(labels, stable=True)
    first = torch.ones_like(sorted_y, dtype=torch.int32)
    first[1:] = sorted_y[1:] != sorted_y[:-1]
    return sorted_y, order, first.cumsum(0, dtype=torch.int32) - 1


def slot_map(order: tuple[Tensor, Tensor, Tensor], vocab: int, ignore_index: int) -> Tensor:
    """[``tile_columns(V)`` + 1] int32: each scored label's slot at its column, -1 elsewhere (the tile
    forward's CAPTURE map; ignored and out-of-range labels go to a spare last entry, which no tile reads)."""
    sorted_y, _, slots = order
    spare = tile_columns(vocab)
    out = torch.full((spare + 1,), -1, dtype=torch.int32, device=sorted_y.device)
    out[torch.where(_scored_rows(sorted_y, ignore_index, vocab), sorted_y, spare)] = slots
    return out


def slot_columns(order: tuple[Tensor, Tensor, Tensor], vocab: int) -> Tensor:
    """[N] int64: each slot's column of p (0 past the distinct labels' count; ignored labels' slots clamped
    into [0, V)), for gathering p's label columns where the tiles did not capture them."""
    sorted_y, _, slots = order
    cols = torch.zeros_like(sorted_y)
    cols[slots.long()] = sorted_y.clamp(0, max(vocab - 1, 0))
    return cols


def _scored_rows(y: Tensor, ignore_index: int, vocab: int) -> Tensor:
    """``_scored`` in torch."""
    return (y != ignore_index) & (y >= 0) & (y < vocab)


def label_sums(sums: Tensor, lp: Tensor, h_r: Tensor, count: Tensor) -> None:
    """sums[j] += lp[j] (r h) in fp32 for one chunk and each slot j < count (lp: the chunk's label columns of
    p by slot, [N, k]; count: ``label_order``'s last slot + 1, on the device): each label column's share of
    dW's GEMM, summed over the chunks without rounding; the slots past the count untouched."""
    rows, hdim = h_r.shape
    if rows == 0:
        return
    bj, bh, br, warps, stages = SUMS_TILE
    tma = _tma(lp, h_r)  # the tiles' copy (rows of unit stride, 16-byte aligned) on Hopper or newer
    lpd = TensorDescriptor.from_tensor(lp, [bj, br]) if tma else lp
    hrd = TensorDescriptor.from_tensor(h_r, [br, bh]) if tma else h_r
    with device_of(h_r):
        _label_sums_kernel[(cdiv(hdim, bh), cdiv(lp.shape[0], bj))](
            sums, lp, h_r, lpd, hrd, count, rows, hdim, sums.stride(0), *lp.stride(), h_r.stride(0), BJ=bj,
            BH=bh, BR=br, UPCAST=not h_r.is_cuda, TMA=tma, num_warps=warps, num_stages=stages,
        )  # fmt: skip


def set_label_rows(
    dw: Tensor, sums: Tensor, hidden: Tensor, order: tuple[Tensor, Tensor, Tensor], r: Tensor,
    g_label: Tensor, q_label: Tensor, ignore_index: int,
) -> None:  # fmt: skip
    """dW[y] = sums[slot] + sum_{i: y_i = y} g_i h_i - q_i (r_i h_i), rounded once, for every label y in
    place (``order``: ``label_order``'s; r, g_label, q_label: [N] fp32, the settle kernel's factor, g's label
    entry and p's). torch's index_add_ would sum with atomics on CUDA, in no fixed order; the rows go in label
    order instead."""
    n, hdim = hidden.shape
    if n == 0:
        return
    sorted_y, perm, slots = order
    end = torch.searchsorted(sorted_y, sorted_y, right=True)
    block = min(pow2(hdim), LABEL_COLS)
    with device_of(hidden):
        _label_rows_kernel[(cdiv(n, LABEL_RUNS), cdiv(hdim, block))](
            dw, sums, hidden, perm, sorted_y, slots, end, r, g_label, q_label, n, dw.stride(0),
            sums.stride(0), hidden.stride(0), hdim, dw.shape[0], ignore_index, RUNS=LABEL_RUNS,
            ROWS=LABEL_ROWS, BLOCK=block, num_warps=LABEL_WARPS,
        )  # fmt: skip
