"""The loss's backward for 2-byte inputs from the forward's row statistics (m, s): the logits again, tile by
tile with ``_lce_tiles``'s function on its grid (a chunk starts at a multiple of BN, so they are bit for bit
those the statistics came from), folded at once into
    g = exp(z - m) / s * dloss,
stored in the weight dtype for one vocabulary chunk of ``G_CHUNK_BYTES`` at a time; the label's entry
(exp(z_y - m) / s - 1) * dloss is put in after, and dh = g W and dW = g^T h of the chunk are cuBLAS GEMMs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.tools.tensor_descriptor import TensorDescriptor

from ._lce_tiles import (
    MERGE_BLOCK,
    P_STAGES,
    _config,
    _group_m,
    _label_logit,
    _loads,
    _scored,
    _tile_coords,
    _tile_logits,
    row_aligned,
)
from ._math import centred, exp_flushed
from ._utils import addmm_acc, cdiv, check, pow2, sms_for

G_CHUNK_BYTES = 192 << 20  # bytes of one [N, Vc] chunk of g in the weight dtype
LABEL_BLOCK = 1024  # rows per program of the kernel that puts the label's entries into g


@triton.jit
def _bwd_tiles_kernel(
    H, W, HD, WD, G, GD, LABELS, STATS, DROWS, stride_h, stride_w, stride_g, n, vocab, hdim, v0, vc,
    ignore_index, group, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, EVEN_K: tl.constexpr,
    UPCAST: tl.constexpr, TMA: tl.constexpr, NUM_PROGS: tl.constexpr,
):  # fmt: skip
    """g = softmax * dloss of the tiles of the chunk [v0, v0 + vc), into G [N, vc] (persistent, as the
    forward), with TMA by the descriptor GD, else by pointers from the tile's corner, both clipped to the
    chunk: a [BM, BN] tile of int64 pointers held 255 registers a thread and spilled 2-2.5 KiB more on sm_90
    with TMA loads (triton 3.6-3.7), 120-700 B with pointer loads (sm_80, sm_90). The label's entry,
    softmax - 1, is ``_label_grad_kernel``'s."""
    n_tiles_v = tl.cdiv(vc, BN)
    num_tiles = tl.cdiv(n, BM) * n_tiles_v
    for tile in tl.range(tl.program_id(0), num_tiles, NUM_PROGS, flatten=True):
        pid_m, pid_v = _tile_coords(tile, n, n_tiles_v, group, BM)
        row0, col0 = pid_m * BM, v0 + pid_v * BN
        acc = _tile_logits(
            H, W, HD, WD, stride_h, stride_w, n, vocab, hdim, row0, col0, BM, BN, BK, EVEN_K, UPCAST, TMA
        )  # fmt: skip
        rows = row0 + tl.arange(0, BM)
        live = rows < n
        y = tl.load(LABELS + rows, mask=live, other=ignore_index)
        m = tl.load(STATS + 2 * rows.to(tl.int64), mask=live, other=0.0)
        s = tl.load(STATS + 2 * rows.to(tl.int64) + 1, mask=live, other=1.0)
        keep = y != ignore_index
        scale = tl.where(keep, tl.load(DROWS + rows, mask=live, other=0.0) / s, 0.0)
        # As centred(), a +inf logit holds its row's probability; the row's test outside the tile (a branch
        # to acc - m where every row max is finite cost more than the select). An ignored row is exactly 0,
        # even where its logits are nan (it takes no part in the loss).
        zc = tl.where((acc == m[:, None]) & (m == float("inf"))[:, None], 0.0, acc - m[:, None])
        g = exp_flushed(tl.where(keep[:, None], zc, float("-inf"))) * scale[:, None]
        if TMA:
            GD.store([row0, col0 - v0], g.to(GD.dtype))
        else:
            # The tile's corner in int64, offsets in it in int32 (BM rows of the chunk: < 2^31 elements,
            # as the launcher checks); int64 addresses for each element held 255 registers and spilled.
            r_in, c_in = tl.arange(0, BM), tl.arange(0, BN)
            corner = G + row0.to(tl.int64) * stride_g + (col0 - v0)
            mask = (r_in < n - row0)[:, None] & (c_in < vc - (col0 - v0))[None, :]
            tl.store(corner + r_in[:, None] * stride_g + c_in[None, :], g.to(G.dtype.element_ty), mask=mask)


@triton.jit
def _label_grad_kernel(
    H, W, LABELS, STATS, DROWS, GY, stride_h, stride_w, vocab, hdim, ignore_index, BLOCK_H: tl.constexpr
):  # fmt: skip
    """g's entry at the label, (exp(z_y - m) / s - 1) * dloss, with z_y = h . w_y (0 for an ignored row).
    Apart from the tiles: a search for the label in each tile cost them a branch and a [BM, BN] select."""
    row = tl.program_id(0).to(tl.int64)
    y = tl.load(LABELS + row)
    gy = 0.0
    if _scored(y, ignore_index, vocab):
        zy = _label_logit(H, W, row, y, stride_h, stride_w, hdim, BLOCK_H)
        m = tl.load(STATS + 2 * row)
        gy = (tl.exp(centred(zy, m)) / tl.load(STATS + 2 * row + 1) - 1.0) * tl.load(DROWS + row)
    tl.store(GY + row, gy)


@triton.jit
def _put_label_grad_kernel(G, LABELS, GY, stride_g, n, v0, vc, BLOCK: tl.constexpr):
    """G[i, y_i - v0] = GY[i] for the rows whose label falls in the chunk [v0, v0 + vc)."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    y = tl.load(LABELS + rows, mask=rows < n, other=-1)
    mine = (rows < n) & (y >= v0) & (y < v0 + vc)
    gy = tl.load(GY + rows, mask=mine, other=0.0)
    tl.store(G + rows.to(tl.int64) * stride_g + (y - v0), gy.to(G.dtype.element_ty), mask=mine)


# ---------------------------------------------------------------- launcher


def g_chunk_width(hidden: Tensor, weight: Tensor, bn: int) -> int:
    """Vocabulary columns per chunk of g (G_CHUNK_BYTES in the weight dtype), a multiple of the tile width
    ``bn``."""
    vc = G_CHUNK_BYTES // max(1, hidden.shape[0] * hidden.element_size())
    return max(bn, min(cdiv(weight.shape[0], bn) * bn, vc // bn * bn))


def tiles_bwd(
    grad_rows: Tensor, hidden: Tensor, weight: Tensor, labels: Tensor, stats: Tensor, ignore_index: int,
    dh: Tensor, dw: Tensor, h_w: Tensor | None,
) -> None:  # fmt: skip
    """Accumulate dh (fp32, [N, H] or empty) and write dw ([V, H] or empty), chunk by chunk of g; ``h_w``
    is hidden with ignored rows zeroed, for dW."""
    n, hdim = hidden.shape
    vocab = weight.shape[0]
    tma, (bm, bn, bk, warps, stages, per_sm) = _config(hidden, weight)
    progs = sms_for(hidden) * per_sm
    vc = g_chunk_width(hidden, weight, bn)
    # One chunk of g alive at a time; the last, narrower one is a view of the same rows.
    buf = row_aligned(n, min(vc, vocab), hidden.dtype, hidden.device)
    # The pointer store's offsets within a tile are int32: BM rows of a chunk (its row stride ~ the vocabulary
    # at most) stay below 2^31 elements for any vocabulary under 16M.
    check(
        tma or bm * buf.stride(0) < 2**31,
        "linear_cross_entropy",
        lambda: f"a vocabulary of {vocab} is past what the backward's pointer stores address (2^31 / {bm})",
    )
    hd, wd = _loads(hidden, weight, tma, bm, bn, bk)
    group_m = _group_m(hidden, bm)
    gy = torch.empty(n, dtype=torch.float32, device=hidden.device)
    _label_grad_kernel[(n,)](
        hidden, weight, labels, stats, grad_rows, gy, hidden.stride(0), weight.stride(0), vocab, hdim,
        ignore_index, BLOCK_H=min(pow2(hdim), MERGE_BLOCK), num_warps=4,
    )  # fmt: skip
    for v0 in range(0, vocab, vc):
        w = weight[v0 : v0 + vc]
        wc = w.shape[0]
        g = buf[:, :wc]
        gd = TensorDescriptor.from_tensor(g, [bm, bn]) if tma else g
        _bwd_tiles_kernel[(min(progs, cdiv(n, bm) * cdiv(wc, bn)),)](
            hidden, weight, hd, wd, g, gd, labels, stats, grad_rows, hidden.stride(0), weight.stride(0),
            g.stride(0), n, vocab, hdim, v0, wc, ignore_index, group_m, BM=bm, BN=bn, BK=bk,
            EVEN_K=hdim % bk == 0, UPCAST=not hidden.is_cuda, TMA=tma, NUM_PROGS=progs,
            num_warps=warps, num_stages=min(stages, P_STAGES) if tma else stages,
        )  # fmt: skip
        _put_label_grad_kernel[(cdiv(n, LABEL_BLOCK),)](
            g, labels, gy, g.stride(0), n, v0, wc, BLOCK=LABEL_BLOCK, num_warps=4
        )  # fmt: skip
        if dw.numel():
            torch.mm(g.T, h_w, out=dw[v0 : v0 + wc])
        if dh.numel():
            addmm_acc(dh, g, w)
