"""The loss's kernels for 2-byte inputs (bf16, fp16): the logits GEMM and the softmax in one kernel.

Each program computes one [BM, BN] tile of z = h W^T in fp32 registers (the GEMM's accumulator, never
stored) and folds it at once:
    forward:  per row, the tile's max m_j and, against a reference r_j (m_j, or the one-pass path's row
              reference), s_j = sum exp(z - r_j) (and entropy sum e_j, first argmax), written as [N, T]
              partials (T = ceil(V / BN)); one program per row merges them, m = max_j m_j,
              s = sum_j s_j exp(r_j - m), e = sum_j exp(r_j - m) (e_j + s_j (r_j - m)), takes the
              label's logit z_y = h . w_y and writes the row's loss log s - (z_y - m);
    backward: g = exp(z - m) / s * dloss (``_lce_tiles_bwd``), or, in bf16 training, from p stored by
              the forward (``_lce_rows``).
So the fp32 logits never reach memory. Both passes compute every tile with the same function on the same
tile grid (a backward chunk starts at a multiple of BN): the backward's logits are bit for bit those the
statistics came from. The tiles carry no per-label work and no branch on the rows' finiteness (4.7 -> 3.7
ms forward at 8192 x 896 on the H200; bench/results/2026-12-03-h200/lce_kernels_call8.md). On Hopper and
newer the operands arrive by TMA (16-byte aligned rows; past the end reads 0) in 128 x 256 tiles (4.7 ms
forward against 5.8 with pointer loads in 128 x 128 tiles; 2026-12-02-h200/lce_kernels_call21.md), and the
one-pass path's p leaves by TMA store from shared memory (its forward 0.1-0.3 ms faster than by pointer
stores; 2026-12-04-h200/tma_store_call9.log). Pointer loads and stores serve older GPUs and unaligned rows.
The epilogue that folds a tile runs on the warps of its GEMM, the tensor cores idle meanwhile (triton 3.6
gives sm_90 no warp specialization here): it is kept to few instructions, which ``bench/lce_sass.py`` counts.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.tools.tensor_descriptor import TensorDescriptor

from ._math import centred, exp_flushed, p_reference, recentred_entropy
from ._utils import capability, cdiv, pow2, sms_for

# (BM, BN, BK, warps, stages, programs per SM), one config for both passes, which must tile alike (see
# above): TILE with TMA loads, TILE_PTR with pointer loads (its 128 KiB of stages also fit an A100).
TILE = (128, 256, 64, 8, 4, 1)
TILE_PTR = (128, 128, 64, 8, 4, 1)
TMA_LOADS = True  # off: pointer loads everywhere (tests of that path on aligned shapes)
L2_ROWS_BYTES = 16 << 20  # hidden rows per group of programs sharing a weight tile (kept in L2)
MERGE_BLOCK = 1024  # partials (or hidden features) per step of the merge kernel's loops
PART_BYTES = 128 << 20  # the forward's [rows, T] partials per launch: its rows are walked in chunks of this
# How far a tile's max may exceed its row's reference before the tile takes its own max as p's (p <= e^32,
# whose sums stay in range; the one-pass path's row scale c / s e^(r - m) stays within bf16's normal range).
REF_MARGIN = 32.0
# Pipeline stages of the kernels that store a tile by TMA (the forward's p, the recompute backward's g): the
# [BM, BN] tile is staged in shared memory, which holds 3 of TILE's stages beside it (4 exceed its 227 KiB).
P_STAGES = 3


@triton.jit
def _tile_logits(
    H, W, HD, WD, stride_h, stride_w, n, vocab, hdim, row0, col0,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, EVEN_K: tl.constexpr, UPCAST: tl.constexpr,
    TMA: tl.constexpr,
):  # fmt: skip
    """fp32 z[row0 : row0 + BM, col0 : col0 + BN] = h W^T, from the descriptors HD, WD with TMA, else from
    pointers. Rows and columns past the end read 0 (TMA) or the last one (no masks in the K loop); the
    callers mask them out. UPCAST (CPU tensors: the interpreter, whose dot reads bf16 as raw integers)
    multiplies in fp32, where 2-byte products are exact as on tensor cores."""
    if TMA:
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, hdim, BK):
            a = HD.load([row0, k0])
            b = WD.load([col0, k0])
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b.T, acc)
        return acc
    rows = tl.minimum(row0 + tl.arange(0, BM), n - 1).to(tl.int64)
    cols = tl.minimum(col0 + tl.arange(0, BN), vocab - 1).to(tl.int64)
    ks = tl.arange(0, BK)
    a_ptr = H + rows[:, None] * stride_h + ks[None, :]
    b_ptr = W + cols[:, None] * stride_w + ks[None, :]
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, hdim, BK):
        if EVEN_K:
            a = tl.load(a_ptr)
            b = tl.load(b_ptr)
        else:
            kmask = (k0 + ks) < hdim
            a = tl.load(a_ptr, mask=kmask[None, :], other=0.0)
            b = tl.load(b_ptr, mask=kmask[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, tl.trans(b), acc)
        a_ptr += BK
        b_ptr += BK
    return acc


@triton.jit
def _tile_coords(tile, n, n_tiles_v, group, BM: tl.constexpr):
    """(row block, vocabulary tile) of a tile index: row blocks vary fastest within a group of ``group``, so
    the programs running together read one weight tile from memory and the group's hidden rows from L2."""
    n_tiles_m = tl.cdiv(n, BM)
    per_group = group * n_tiles_v
    first_m = (tile // per_group) * group
    group_m = tl.minimum(n_tiles_m - first_m, group)
    local = tile % per_group
    return first_m + local % group_m, local // group_m


@triton.jit
def _fold(z, m, keep, TOKEN_STATS: tl.constexpr, KEEP: tl.constexpr):
    """(p = exp(z - m), its row sums, entropy sums or m) of a tile, one form for every row max: z - m is
    taken as 0 where z == m, so a +inf logit holds its row's probability (1 per +inf logit) and the other
    logits of that row add 0. A row of -inf logits only counts 1 per column; the merge drops a partial whose
    max is -inf. (A branch on the rows' finiteness cost 0.5-1.3 ms of an 8192 x 2048 forward on the H200.)
    KEEP: p and its sums are exactly 0 in the rows ``keep`` leaves out, even where their logits are nan (the
    exponent's select, where one on p itself cost sm_90 two byte permutes for each pair of bf16 it stores)."""
    zc = tl.where(z == m[:, None], 0.0, z - m[:, None])
    if KEEP:
        zc = tl.where(keep[:, None], zc, float("-inf"))
    p = exp_flushed(zc)
    # p (z - m) is 0 where p is (no 0 * -inf): the floor leaves every zc with p > 0 as it is, and a nan zc's
    # p is nan already. One max where a test and a select took two and kept the product from the sum's add.
    e = tl.sum(p * tl.maximum(zc, -3.4e38), axis=1) if TOKEN_STATS else m
    return p, tl.sum(p, axis=1), e


@triton.jit
def _fwd_tiles_kernel(
    H, W, HD, WD, MP, SP, EP, AP, P, PD, RP, REF, LABELS, SLOT, LP, stride_h, stride_w, stride_p, stride_lp,
    n, vocab, hdim, n_tiles_v, group, ignore_index, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    EVEN_K: tl.constexpr, EVEN_V: tl.constexpr, UPCAST: tl.constexpr, TMA: tl.constexpr,
    TOKEN_STATS: tl.constexpr, STORE_P: tl.constexpr, CAPTURE: tl.constexpr, MARGIN: tl.constexpr,
    NUM_PROGS: tl.constexpr,
):  # fmt: skip
    """Per row of each tile: max, sum exp(z - r) (with TOKEN_STATS the entropy sum and the first argmax) into
    the [N, T] partials, r the tile's max. With STORE_P also p = exp(z - r) into P [N, V] (bf16; 0 in an
    ignored row) and r into RP, where r is the row's REF unless the tile's max exceeds it by more than MARGIN
    (then ``p_reference``'s step at or above that max): with REF near the row's max, every tile of the row
    shares it; without TOKEN_STATS an ignored row's partial sums are 0 too (its loss is 0, and nothing else
    reads its s). With CAPTURE p's columns that are some row's label (SLOT [columns]: the column's slot, -1
    for none) also into LP [slots, rows] (``_lce_label_rows``: gathered from P afterwards, they read 40% of
    its sectors again). Persistent: NUM_PROGS programs walk the tiles, and the pipelined loop issues the next
    tile's loads during this one's epilogue (the loop asks for warp specialization, which triton 3.6 does not
    apply on sm_90: the same machine code with or without). The label's logit is the merge's: searched for
    here, in the tiles that hold one, it cost 1 ms of 4.7 at 8192 x 896.
    """
    num_tiles = tl.cdiv(n, BM) * n_tiles_v
    for tile in tl.range(tl.program_id(0), num_tiles, NUM_PROGS, flatten=True, warp_specialize=TMA):
        pid_m, pid_v = _tile_coords(tile, n, n_tiles_v, group, BM)
        row0, col0 = pid_m * BM, pid_v * BN
        rows = row0 + tl.arange(0, BM)
        live = rows < n
        acc = _tile_logits(
            H, W, HD, WD, stride_h, stride_w, n, vocab, hdim, row0, col0, BM, BN, BK, EVEN_K, UPCAST, TMA
        )  # fmt: skip
        # Columns past the end (TMA reads them as 0) are masked in every tile unless BN divides the vocabulary
        # (EVEN_V: Llama's, Mistral's): a branch to the last tile alone makes the loop wait for each wgmma
        # (sm_90, triton 3.6). Against the column range (not col0 + range) the compare needs no index
        # arithmetic per element.
        z = acc
        if not EVEN_V:
            z = tl.where((tl.arange(0, BN) < vocab - col0)[None, :], acc, float("-inf"))
        m = tl.max(z, axis=1)
        part = rows.to(tl.int64) * n_tiles_v + pid_v
        tl.store(MP + part, m, mask=live)
        # The first maximum, as torch.argmax where no logit is nan (the GPU's max skips nan: a tile of nan and
        # -inf logits may point past the vocabulary, and the merge never takes a partial whose max is -inf).
        if TOKEN_STATS:
            first = tl.min(tl.where(z == m[:, None], tl.arange(0, BN)[None, :], BN), axis=1)
            tl.store(AP + part, col0 + tl.where(first < BN, first, 0), mask=live)
        r = m
        keep = live
        if STORE_P:
            # Read after the GEMM. Loaded at the tile's start, the pipelined loop carries them to the epilogue
            # with the tile's coordinates (p bit for bit the same) and the kernel runs no faster (H200, triton
            # 3.6; bench/results/2026-12-07-h200-b/capture_ab_call1.log).
            ref = tl.load(REF + rows, mask=live, other=0.0)
            r = p_reference(m, ref, MARGIN)
            tl.store(RP + part, r, mask=live)
            keep = tl.load(LABELS + rows, mask=live, other=ignore_index) != ignore_index
        # Token stats are of every row: there p is zeroed in ignored rows after the sums.
        p, s, e = _fold(z, r, keep, TOKEN_STATS, STORE_P and not TOKEN_STATS)
        tl.store(SP + part, s, mask=live)
        if TOKEN_STATS:
            tl.store(EP + part, e, mask=live)
        if STORE_P:
            if TOKEN_STATS:
                p = tl.where(keep[:, None], p, 0.0)  # exactly 0, even where the row's logits are nan
            p = p.to(tl.bfloat16)
            if TMA:  # by TMA from shared memory, off the epilogue's critical path; clipped to [n, V]
                PD.store([row0, col0], p)
            else:
                cols = col0 + tl.arange(0, BN)
                p_ptr = P + rows.to(tl.int64)[:, None] * stride_p + cols[None, :]
                tl.store(p_ptr, p, mask=live[:, None] & (cols < vocab)[None, :])
            if CAPTURE:
                # SLOT covers whole tiles (-1 past the vocabulary) and LP whole row blocks: no mask but the
                # slot's (with the rows' too: 519 instructions a tile, this 182; bench/lce_sass.py, sm_90).
                slot = tl.load(SLOT + col0 + tl.arange(0, BN))
                tl.store(LP + (slot * stride_lp)[None, :] + rows[:, None], p, mask=(slot >= 0)[None, :])


@triton.jit
def _scored(y, ignore_index, vocab):
    """Whether a row's label is scored and in range (the label check runs apart: no read out of bounds)."""
    return (y != ignore_index) & (y >= 0) & (y < vocab)


@triton.jit
def _label_logit(H, W, row, y, stride_h, stride_w, hdim, BLOCK_H: tl.constexpr):
    """h_row . w_y in fp32 (the products of 2-byte inputs are exact)."""
    zy = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for k0 in range(0, hdim, BLOCK_H):
        ks = k0 + tl.arange(0, BLOCK_H)
        h = tl.load(H + row * stride_h + ks, mask=ks < hdim, other=0.0)
        w = tl.load(W + y * stride_w + ks, mask=ks < hdim, other=0.0)
        zy += h.to(tl.float32) * w.to(tl.float32)
    return tl.sum(zy, axis=0)


@triton.jit
def _merge_kernel(
    MP, RP, SP, EP, AP, M, S, E, ARG, H, W, LABELS, ZLAB, LOSS, stride_h, stride_w, vocab, hdim, n_tiles_v,
    ignore_index, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, TOKEN_STATS: tl.constexpr,
):  # fmt: skip
    """One row's partials merged. Each tile's sums are against its reference r_j (its max m_j, or above it
    on the one-pass path), so they are gathered against c = max r_j, where no factor exceeds 1:
    s_c = sum s_j a_j with a_j = exp(r_j - c) (1 where r_j == c, also for infinite ones), e_c = sum a_j (e_j
    + s_j (r_j - c)); then moved to the row max m = max m_j, s = s_c exp(c - m) (c - m is 0 where every
    r_j = m_j, at most a few rounding ulps otherwise). Argmax from the first tile holding m; a partial of
    -inf logits only adds 0. Then the label's logit z_y = h . w_y (0 for an ignored or out-of-range label),
    its fp32 products exact (2-byte inputs) and summed in fp32 like the tiles', and the row's loss
    log s - (z_y - m), 0 where ignored: the order of z_y's sum differs, so a last-ulp negative is clamped to
    CE's 0 (a nan stays)."""
    row = tl.program_id(0).to(tl.int64)
    base = row * n_tiles_v
    m = float("-inf")
    c = float("-inf")
    s = 0.0
    e = 0.0
    arg = tl.full((), 0, tl.int64)
    for t0 in range(0, n_tiles_v, BLOCK_T):
        ts = t0 + tl.arange(0, BLOCK_T)
        mask = ts < n_tiles_v
        mj = tl.load(MP + base + ts, mask=mask, other=float("-inf"))
        rj = tl.load(RP + base + ts, mask=mask, other=float("-inf"))
        # A partial of -inf logits adds nothing. One whose max is -inf only because tl.max skips nan on the
        # GPU (a tile of nan and -inf logits alone) keeps its nan sum: the row's loss is nan, as stock's.
        sj = tl.load(SP + base + ts, mask=mask, other=0.0)
        sj = tl.where((mj == float("-inf")) & (sj == sj), 0.0, sj)
        m_new = tl.maximum(m, tl.max(mj, axis=0))
        # Against the running max of m_j instead, a reference above it (from a later block of tiles) gave
        # exp(r_j - m) = inf, and 0 * inf = nan where s_j had underflowed to 0.
        c_new = tl.maximum(c, tl.max(rj, axis=0))
        a_old = tl.where(c == c_new, 1.0, tl.exp(c - c_new))
        aj = tl.where(rj == c_new, 1.0, tl.exp(rj - c_new))
        if TOKEN_STATS:
            ej = tl.where(mj == float("-inf"), 0.0, tl.load(EP + base + ts, mask=mask, other=0.0))
            argj = tl.load(AP + base + ts, mask=mask, other=0)
            # Strictly greater keeps the earlier blocks' first maximum.
            first = tl.argmax(tl.where(mj == m_new, 1, 0), axis=0)
            arg = tl.where(m_new > m, tl.sum(tl.where(tl.arange(0, BLOCK_T) == first, argj, 0), axis=0), arg)
            e = recentred_entropy(e, s, a_old, c, c_new)
            e += tl.sum(recentred_entropy(ej, sj, aj, rj, c_new), axis=0)
        s = s * a_old + tl.sum(sj * aj, axis=0)  # a nan partial sum (a nan logit) stays nan, as stock's
        m = m_new
        c = c_new
    a = tl.where(c == m, 1.0, tl.exp(c - m))
    if TOKEN_STATS:
        e = recentred_entropy(e, s, a, c, m)
    s = s * a
    tl.store(M + row, m)
    tl.store(S + row, s)
    if TOKEN_STATS:
        tl.store(E + row, e)
        tl.store(ARG + row, arg)
    y = tl.load(LABELS + row)
    zy = tl.zeros((), tl.float32)
    if _scored(y, ignore_index, vocab):
        zy = _label_logit(H, W, row, y, stride_h, stride_w, hdim, BLOCK_H)
    tl.store(ZLAB + row, zy)
    loss = tl.log(s) - centred(zy, m)
    loss = tl.where(loss < 0.0, 0.0, loss)
    # A label out of range (compiled calls skip the check, which needs a host sync): nan, not the loss of a
    # label logit of 0.
    loss = tl.where((y >= 0) & (y < vocab), loss, float("nan"))
    tl.store(LOSS + row, tl.where(y != ignore_index, loss, 0.0))


# ---------------------------------------------------------------- launchers


def _tma(hidden: Tensor, weight: Tensor) -> bool:
    """Whether the kernels load by TMA: rows contiguous, 16-byte aligned (bases and row strides), on a
    Hopper or newer GPU (CPU tensors: the interpreter, which models the descriptors)."""
    if not TMA_LOADS or (hidden.is_cuda and capability(hidden.device.index or 0) < (9, 0)):
        return False
    return all(
        t.stride(1) == 1 and t.stride(0) * t.element_size() % 16 == 0 and t.data_ptr() % 16 == 0
        for t in (hidden, weight)
    )


def _config(hidden: Tensor, weight: Tensor) -> tuple[bool, tuple]:
    """(whether the kernels load by TMA, the tile config of that load path)."""
    tma = _tma(hidden, weight)
    return tma, TILE if tma else TILE_PTR


def _loads(hidden: Tensor, weight: Tensor, tma: bool, bm: int, bn: int, bk: int) -> tuple:
    """The kernels' (HD, WD) operands: TMA descriptors of [BM, BK] and [BN, BK] boxes, or the tensors as
    stand-ins the kernels never read."""
    if not tma:
        return hidden, weight
    return TensorDescriptor.from_tensor(hidden, [bm, bk]), TensorDescriptor.from_tensor(weight, [bn, bk])


def tile_columns(vocab: int) -> int:
    """The vocabulary rounded up to whole tiles of every config (the length of ``tiles_fwd``'s slot map)."""
    bn = max(TILE[1], TILE_PTR[1])  # a multiple of the other's
    return cdiv(vocab, bn) * bn


def row_aligned(rows: int, cols: int, dtype: torch.dtype, device) -> Tensor:
    """An empty 2-byte [rows, cols] whose rows start 16-byte aligned (the stride a TMA store needs); its
    leading columns are views with that stride too."""
    return torch.empty(rows, cdiv(cols, 8) * 8, dtype=dtype, device=device)[:, :cols]


def _group_m(hidden: Tensor, bm: int) -> int:
    """Row blocks per group: as many as keep the group's hidden rows within L2_ROWS_BYTES (the kernels clip
    the last group). A runtime argument: as a compile-time one it compiled the kernels anew for every
    hidden size (and, with the row count in it, for every batch length)."""
    return max(1, L2_ROWS_BYTES // (bm * hidden.shape[1] * hidden.element_size()))


def tiles_fwd(
    hidden: Tensor, weight: Tensor, labels: Tensor, ignore_index: int, token_stats: bool,
    on_rows: Callable[..., None] | None = None, p_rows: int = 0, ref: Tensor | None = None,
    slot_map: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """(m, s, entropy sum e, argmax, label logit, loss) per row; e and argmax empty without ``token_stats``.
    With ``on_rows`` and without ``token_stats`` an ignored row's s is 0 (its p is 0, and its loss).

    With ``on_rows`` the rows go in chunks of at most ``p_rows`` (a multiple of BM), whose p = exp(z - r_j)
    [k, V] (bf16, 0 in ignored rows) the tiles also store, r_j the row's ``ref`` ([N] fp32) unless the
    tile's max exceeds it by more than ``REF_MARGIN``; after each chunk's merge ``on_rows(r0, p, rp, bn, m,
    s, zlab, lp)`` runs: rp the chunk's [k, T] references r_j over tiles of ``bn`` columns, then the chunk's
    m, s and label logits, and lp: with ``slot_map`` (int32, at least ``tile_columns(V)`` long, each
    column's slot or -1; with ``on_rows``) on the TMA path the chunk's label columns of p, [N, k] bf16:
    p[:, c] in row slot_map[c] (other rows unwritten), else None."""
    n, hdim = hidden.shape
    vocab = weight.shape[0]
    tma, (bm, bn, bk, warps, stages, per_sm) = _config(hidden, weight)
    t = cdiv(vocab, bn)
    progs = sms_for(hidden) * per_sm
    # Rows per launch, a multiple of BM (the backward's row blocks), whose partials fit PART_BYTES: m and s
    # in fp32, with token stats also e (fp32) and the argmax (int64).
    per_row = t * (20 if token_stats else 8)
    chunk = max(bm, PART_BYTES // per_row // bm * bm)
    if on_rows is not None:
        chunk = min(chunk, max(bm, p_rows // bm * bm))
    # As many launches as the cap asks for, of equal rows: no short last chunk (whose GEMMs on p run below
    # rate) and no more of p than that needs.
    chunk = cdiv(cdiv(n, cdiv(n, chunk)), bm) * bm if n > 0 else chunk
    cap = min(n, chunk)
    f32 = dict(dtype=torch.float32, device=hidden.device)
    mp, sp = torch.empty(cap, t, **f32), torch.empty(cap, t, **f32)
    # Without token stats the kernels never touch E and ARG: any tensors of their dtypes stand in; without
    # on_rows, nor P.
    ep = torch.empty(cap, t, **f32) if token_stats else sp
    ap = torch.empty(cap, t, dtype=torch.int64, device=hidden.device) if token_stats else labels
    # With on_rows also p and the tiles' references; else stand-ins never touched.
    # p's rows padded to 16 bytes: the stride a TMA store needs.
    p = row_aligned(cap, vocab, torch.bfloat16, hidden.device) if on_rows else hidden
    rp = torch.empty(cap, t, **f32) if on_rows else mp
    # LP's columns: whole row blocks (the tiles' rows past the chunk land where no one reads; a multiple of
    # 8, so also row_aligned's stride). Captured on the TMA path, by 32-bit offsets (64-bit ones spilled
    # registers with token stats, and pointer stores on sm_80): where LP is under 2^31 elements. Decided
    # before LP is allocated: an uncaptured pass holds none.
    lp_cols = cdiv(cap, bm) * bm
    capture = slot_map is not None and tma and n * lp_cols < 2**31
    if capture:
        assert slot_map.dtype == torch.int32 and slot_map.shape[0] >= t * bn, "slot_map: see tile_columns"
    lp = row_aligned(n, lp_cols, torch.bfloat16, hidden.device) if capture else p
    zlab, loss = torch.empty(n, **f32), torch.empty(n, **f32)  # every row written by the merge
    m, s = torch.empty(n, **f32), torch.empty(n, **f32)
    e = torch.empty(n, **f32) if token_stats else None
    arg = torch.empty(n, dtype=torch.int64, device=hidden.device) if token_stats else None
    for r0 in range(0, n, chunk):
        h, y, k = hidden[r0 : r0 + chunk], labels[r0 : r0 + chunk], min(chunk, n - r0)
        pd = TensorDescriptor.from_tensor(p[:k], [bm, bn]) if tma and on_rows else p
        parts = (mp, sp, ep, ap, p, pd, rp, sp if ref is None else ref[r0:], y)
        parts += (slot_map if capture else y, lp)
        _fwd_tiles_kernel[(min(progs, cdiv(k, bm) * t),)](
            h, weight, *_loads(h, weight, tma, bm, bn, bk), *parts, h.stride(0), weight.stride(0),
            p.stride(0), lp.stride(0), k, vocab, hdim, t, _group_m(hidden, bm), ignore_index, BM=bm, BN=bn,
            BK=bk, EVEN_K=hdim % bk == 0, EVEN_V=vocab % bn == 0, UPCAST=not hidden.is_cuda, TMA=tma,
            TOKEN_STATS=token_stats, STORE_P=on_rows is not None, CAPTURE=capture, MARGIN=REF_MARGIN,
            NUM_PROGS=progs, num_warps=warps,
            num_stages=min(stages, P_STAGES) if tma and on_rows else stages,
        )  # fmt: skip
        outs = (m, s, e, arg) if token_stats else (m, s, s, labels)  # the last two stand-ins again
        merge = (mp, rp, sp, ep, ap, *(o[r0 : r0 + k] for o in outs), h, weight, y, zlab[r0:], loss[r0:])
        merge += (h.stride(0),)
        _merge_kernel[(k,)](
            *merge, weight.stride(0), vocab, hdim, t, ignore_index, BLOCK_T=min(pow2(t), MERGE_BLOCK),
            BLOCK_H=min(pow2(hdim), MERGE_BLOCK), TOKEN_STATS=token_stats, num_warps=4,
        )  # fmt: skip
        if on_rows is not None:
            chunk_lp = lp[:, :k] if capture else None
            on_rows(r0, p[:k], rp[:k], bn, m[r0 : r0 + k], s[r0 : r0 + k], zlab[r0 : r0 + k], chunk_lp)
    if not token_stats:
        e, arg = m.new_empty(0), labels.new_empty(0)
    return m, s, e, arg, zlab, loss
