# ruff: noqa: B023  (each closure runs within its loop iteration)
"""The label-rows kernel's blocks (RUNS, ROWS, BLOCK, warps) at the bench's shapes, uniform and Zipf labels
(10% ignored); dW against the first config's (max |diff| over max |dW|: the long runs' fp32 sums go in another
order with another ROWS). do_bench medians, ms."""

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

from chronipatch.ops import _lce_label_rows as lr
from chronipatch.ops._lce_tiles import _scored
from chronipatch.ops._utils import cdiv

dev = "cuda"


@triton.jit
def _label_rows_acc_kernel(
    DW, SUMS, H, ORDER, SORTED, SLOTS, END, R, GLAB, QLAB, n, stride_dw, stride_s, stride_h, hdim, vocab,
    ignore_index, RUNS: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """lr._label_rows_kernel with the long runs summed into a [ROWS, BLOCK] accumulator (one reduction at the
    end, not one a step) and the next step's row indices loaded ahead."""
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
    mask = single[:, None] & col_ok[None, :]
    rows = tl.load(ORDER + j, mask=single, other=0)
    slot = tl.load(SLOTS + j, mask=single, other=0).to(tl.int64)
    g = tl.load(GLAB + rows, mask=single, other=0.0)[:, None]
    q = tl.load(QLAB + rows, mask=single, other=0.0)[:, None]
    r = tl.load(R + rows, mask=single, other=0.0)[:, None]
    acc = tl.load(SUMS + slot[:, None] * stride_s + cols[None, :], mask=mask, other=0.0)
    h = tl.load(H + rows[:, None] * stride_h + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    h_r = (h * r).to(H.dtype.element_ty).to(tl.float32)
    acc += g * h - q * h_r
    tl.store(DW + y.to(tl.int64)[:, None] * stride_dw + cols[None, :], acc.to(DW.dtype.element_ty), mask=mask)
    todo = first & (end > j + 1)
    ar = tl.arange(0, ROWS)
    for _ in range(0, tl.sum(todo.to(tl.int32), axis=0)):
        at = tl.min(tl.where(todo, idx, RUNS), axis=0)
        todo &= idx != at
        j1 = tl.program_id(0) * RUNS + at
        y1 = tl.load(SORTED + j1)
        end1 = tl.load(END + j1)
        acc1 = tl.load(SUMS + tl.load(SLOTS + j1).to(tl.int64) * stride_s + cols, mask=col_ok, other=0.0)
        acc2 = tl.zeros((ROWS, BLOCK), dtype=tl.float32)
        rows1 = tl.load(ORDER + j1 + ar, mask=j1 + ar < end1, other=0)
        for i0 in range(j1, end1, ROWS):
            i = i0 + ar
            live = i < end1
            g1 = tl.load(GLAB + rows1, mask=live, other=0.0)[:, None]
            q1 = tl.load(QLAB + rows1, mask=live, other=0.0)[:, None]
            r1 = tl.load(R + rows1, mask=live, other=0.0)[:, None]
            mask1 = live[:, None] & col_ok[None, :]
            h1 = tl.load(H + rows1[:, None] * stride_h + cols[None, :], mask=mask1, other=0.0).to(tl.float32)
            nxt = i + ROWS
            rows1 = tl.load(ORDER + nxt, mask=nxt < end1, other=0)
            h_r1 = (h1 * r1).to(H.dtype.element_ty).to(tl.float32)
            acc2 += g1 * h1 - q1 * h_r1
        acc1 += tl.sum(acc2, axis=0)
        tl.store(DW + y1 * stride_dw + cols, acc1.to(DW.dtype.element_ty), mask=col_ok)


def make_labels(n, v, kind):
    g = torch.Generator(device=dev).manual_seed(0)
    if kind == "uniform":
        y = torch.randint(0, v, (n,), device=dev, generator=g)
    else:
        probs = torch.arange(1, v + 1, device=dev, dtype=torch.float64) ** -1.1
        pick = torch.multinomial(probs / probs.sum(), n, True, generator=g)
        y = torch.randperm(v, device=dev, generator=g)[pick]
    y[torch.rand(n, device=dev, generator=g) < 0.1] = -100
    return y


CONFIGS = [  # (kernel, RUNS, ROWS, BLOCK, warps); the module's kernel at its blocks first
    ("module", 16, 16, 256, 8),
    ("module", 16, 32, 128, 8),
    ("module", 16, 64, 64, 4),
    ("module", 16, 64, 128, 8),
    ("acc", 16, 16, 256, 8),
    ("acc", 16, 32, 128, 8),
    ("acc", 16, 64, 64, 4),
    ("acc", 16, 64, 128, 8),
    ("acc", 16, 32, 64, 4),
    ("acc", 16, 128, 32, 4),
]
for n, h, v in [(8192, 896, 151936), (8192, 4096, 128256)]:
    for kind in ("uniform", "zipf"):
        torch.manual_seed(0)
        y = make_labels(n, v, kind)
        sorted_y, perm, slots = lr.label_order(y)
        runs = torch.unique_consecutive(sorted_y[sorted_y >= 0], return_counts=True)[1]
        end = torch.searchsorted(sorted_y, sorted_y, right=True)
        hid = torch.randn(n, h, device=dev).bfloat16()
        sums = torch.randn(n, h, device=dev)
        r = torch.rand(n, device=dev) * 1e-3
        g = -torch.rand(n, device=dev) * 1e-4
        q = (g / r).bfloat16().float()
        dw0 = (torch.randn(v, h, device=dev) * 1e-3).bfloat16()
        first = None
        for name, runs_, rows_, block, warps in CONFIGS:
            kernel = lr._label_rows_kernel if name == "module" else _label_rows_acc_kernel

            def run(dw):
                kernel[(cdiv(n, runs_), cdiv(h, block))](
                    dw,
                    sums,
                    hid,
                    perm,
                    sorted_y,
                    slots,
                    end,
                    r,
                    g,
                    q,
                    n,
                    dw.stride(0),
                    sums.stride(0),
                    hid.stride(0),
                    h,
                    v,
                    -100,
                    RUNS=runs_,
                    ROWS=rows_,
                    BLOCK=block,
                    num_warps=warps,
                )

            try:
                dw = dw0.clone()
                run(dw)
                first = dw if first is None else first
                rel = ((dw.float() - first.float()).abs().max() / first.float().abs().max()).item()
                t = do_bench(lambda dw=dw: run(dw), warmup=25, rep=200, return_mode="median")
                print(
                    f"{n}x{h} {kind:7s} longest run {int(runs.max())} runs>1 {int((runs > 1).sum())} "
                    f"{(name, runs_, rows_, block, warps)}: {t:.4f} ms rel diff {rel:.2g}",
                    flush=True,
                )
            except Exception as e:
                print(
                    f"{(name, runs_, rows_, block, warps)}: error {type(e).__name__}: {str(e)[:200]}",
                    flush=True,
                )
