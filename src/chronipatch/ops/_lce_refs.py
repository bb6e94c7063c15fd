"""Each row's reference K for the one pass (``_lce_rows``, which says what K is for): the max of the row's
logits over ``SAMPLES`` columns spread evenly over the vocabulary, lowered by a bound on the GEMMs' rounding
and by ``REF_SPREAD`` u_i, one kernel (and, where the rows alone leave the GPU short of programs, a merge of
the sample groups' maxima).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._utils import cdiv, sms_for

SAMPLES = 1024  # vocabulary columns whose logits give each row's reference K
# Each row's K is lowered by REF_SPREAD u_i, u_i = frac(i phi) spread evenly over [0, 1) (row_offsets): with
# ln 2, the rows' p sit at every position of their binade, so their bf16 roundings differ from row to row.
REF_SPREAD = 0.6931471805599453
# The reference kernel's tile: rows per program (64, on tensor cores by wgmma on sm_90; 32 or 16 where blocks
# of 64 would leave more than an eighth of the SMs idle: 8192 rows make 128 programs of 64 on 132 SMs, 2048
# rows 128 of 16), sampled columns and features per step.
REF_ROWS, REF_SAMPLES, REF_K = (64, 32, 16), 128, 64
# Programs a multiprocessor the references aim for: where the rows make fewer, the samples go in groups (8192
# rows: 3 groups; 0.400 -> 0.262 ms at hidden 4096, 0.073 -> 0.064 at 896 on the H100; 4 a multiprocessor ran
# slower than 2; bench/results/2026-12-07-h100-e).
REF_PER_SM = 2
MERGE_ROWS = 1024  # rows per program of the groups' merge


@triton.jit
def _references_kernel(
    H, W, W_NORM, K, n, hdim, stride_h, stride_w, step, samples, per_group, bound_scale, spread,
    BM: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr, UPCAST: tl.constexpr, FINAL: tl.constexpr,
):  # fmt: skip
    """K of BM rows: max_j (z_ij - bound_scale |h_i| |w_j|) over the sampled columns j (weight rows j step,
    their norms in W_NORM), z = h w_j^T summed in fp32 from exact 2-byte products, as the tiles sum, less
    spread u_i (``_row_offset``); nan where any term is nan or the max is +inf. One launch where cuBLAS's
    GEMM and torch's norm, outer product and max took nine (each a host round trip while the GPU waits to
    start the loss). Program (i, g) takes the samples [g per_group, (g + 1) per_group): unless FINAL (one
    group) it writes that group's max (nan as above) into K[g] ([groups, N]), and ``_references_merge_kernel``
    takes the max over the groups. UPCAST as ``_lce_tiles._tile_logits``."""
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    row_ok = rows < n
    h_sq = tl.zeros((BM,), tl.float32)  # apart from the GEMM's loop, which then holds nothing else
    for k0 in range(0, hdim, BK):
        ks = k0 + tl.arange(0, BK)
        mask = row_ok[:, None] & (ks < hdim)[None, :]
        a = tl.load(H + rows[:, None] * stride_h + ks[None, :], mask=mask, other=0.0).to(tl.float32)
        h_sq += tl.sum(a * a, axis=1)
    h_bound = bound_scale * tl.sqrt(h_sq)
    best = tl.full((BM,), float("-inf"), tl.float32)
    nan = tl.zeros((BM,), tl.int32)
    first = tl.program_id(1) * per_group
    for s0 in range(first, tl.minimum(first + per_group, samples), BS):
        cols = s0 + tl.arange(0, BS)
        col_ok = cols < samples
        w_rows = cols.to(tl.int64) * step
        z = tl.zeros((BM, BS), tl.float32)
        for k0 in range(0, hdim, BK):
            ks = k0 + tl.arange(0, BK)
            k_ok = ks < hdim
            a_mask, b_mask = row_ok[:, None] & k_ok[None, :], col_ok[:, None] & k_ok[None, :]
            a = tl.load(H + rows[:, None] * stride_h + ks[None, :], mask=a_mask, other=0.0)
            b = tl.load(W + w_rows[:, None] * stride_w + ks[None, :], mask=b_mask, other=0.0)
            if UPCAST:
                a, b = a.to(tl.float32), b.to(tl.float32)
            z = tl.dot(a, tl.trans(b), z)
        z -= h_bound[:, None] * tl.load(W_NORM + cols, mask=col_ok, other=0.0)[None, :]
        z = tl.where(col_ok[None, :], z, float("-inf"))
        nan = tl.maximum(nan, tl.max((z != z).to(tl.int32), axis=1))  # tl.max may drop a nan
        best = tl.maximum(best, tl.max(z, axis=1))
    best = tl.where((nan > 0) | (best == float("inf")), float("nan"), best)
    if FINAL:
        tl.store(K + rows, best - spread * _row_offset(rows), mask=row_ok)
    else:
        tl.store(K + tl.program_id(1) * n + rows, best, mask=row_ok)


@triton.jit
def _references_merge_kernel(PART, K, n, spread, GROUPS: tl.constexpr, BLOCK: tl.constexpr):
    """K = max over the groups' maxima PART [GROUPS, N] (nan where any is nan), less spread u_i."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    row_ok = rows < n
    best = tl.full((BLOCK,), float("-inf"), tl.float32)
    nan = tl.zeros((BLOCK,), tl.int1)
    for g in tl.static_range(GROUPS):
        part = tl.load(PART + g * n + rows, mask=row_ok, other=float("-inf"))
        nan |= part != part
        best = tl.maximum(best, part)
    best = tl.where(nan, float("nan"), best)
    tl.store(K + rows, best - spread * _row_offset(rows), mask=row_ok)


@triton.jit
def _row_offset(rows):
    """u_i = frac(i phi) (phi the golden ratio, in 32-bit fixed point): any run of rows spreads evenly over
    [0, 1). ``row_offsets`` in torch."""
    return ((rows.to(tl.int64) * 2654435769) & 0xFFFFFFFF).to(tl.float32) * 2.0**-32


def row_offsets(n: int, device=None) -> Tensor:
    """u_i of ``_row_offset`` for rows 0..n-1, as fp32."""
    rows = torch.arange(n, dtype=torch.int64, device=device)
    return ((rows * 2654435769) & 0xFFFFFFFF).to(torch.float32) * 2.0**-32


def row_references(hidden: Tensor, weight: Tensor) -> Tensor:
    """Each row's reference K ([N] fp32): its max logit over ``SAMPLES`` columns evenly spread over the
    vocabulary, each logit first lowered by a bound on the two GEMMs' rounding, so that K is not above the
    row's max as the tiles compute it. Both GEMMs (this kernel's and the tiles') sum the same exact products
    in fp32, in their own orders, each within H 2^-24 sum_k |h_k w_k| <= H 2^-24 |h| |w| of the exact logit:
    4 H 2^-24 |h| |w| is twice both. That is ~0.03 at Qwen2.5-0.5B's scale; where logits cancel heavily it
    is more, and a row whose max then lies past the margin takes its tiles' own maxima. A K above m by more
    than ~88 would underflow every p of its row into a nan row (its rescale exp(K - m) overflows); +inf (an
    overflow in one order of summing) or nan becomes nan, which every tile takes as past the margin. Row i's
    K is then lowered by ``REF_SPREAD`` u_i (``row_offsets``), a different place in p's binade per row."""
    n, hdim = hidden.shape
    step = max(1, weight.shape[0] // SAMPLES)
    sample = weight[::step][:SAMPLES]
    k = torch.empty(n, dtype=torch.float32, device=hidden.device)
    if n > 0:
        w_norm = torch.linalg.vector_norm(sample, dim=1, dtype=torch.float32)
        sms = sms_for(hidden)
        bm = next((bm for bm in REF_ROWS if cdiv(n, bm) >= sms * 7 // 8), REF_ROWS[-1])
        # The samples in groups, so that the programs fill REF_PER_SM a multiprocessor where the rows alone
        # leave them short.
        blocks = cdiv(sample.shape[0], REF_SAMPLES)
        per_group = cdiv(blocks, max(1, min(blocks, cdiv(REF_PER_SM * sms, cdiv(n, bm))))) * REF_SAMPLES
        groups = cdiv(sample.shape[0], per_group)
        part = k if groups == 1 else torch.empty(groups, n, dtype=torch.float32, device=hidden.device)
        _references_kernel[(cdiv(n, bm), groups)](
            hidden, weight, w_norm, part, n, hdim, hidden.stride(0), weight.stride(0), step, sample.shape[0],
            per_group, 4 * hdim * 2.0**-24, REF_SPREAD, BM=bm, BS=REF_SAMPLES, BK=REF_K,
            UPCAST=not hidden.is_cuda, FINAL=groups == 1, num_warps=4, num_stages=3,
        )  # fmt: skip
        if groups > 1:
            _references_merge_kernel[(cdiv(n, MERGE_ROWS),)](
                part, k, n, REF_SPREAD, GROUPS=groups, BLOCK=MERGE_ROWS, num_warps=4
            )
    return k
