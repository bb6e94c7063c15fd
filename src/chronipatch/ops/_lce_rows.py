"""The loss and its gradients in one pass, for bf16 training: three GEMMs where the recompute path takes four.

``_lce_tiles_bwd`` computes the logits again (a fourth GEMM) because g needs each row's final
max m and sum s, known only after the whole vocabulary. Here the rows go in chunks of R: per chunk the tile
forward also stores p = exp(z - K) (bf16, [R, V]) against a reference K per row known before the GEMM: the
max of the row's logits over ``SAMPLES`` columns spread over the vocabulary (a kernel of its own, summing
in fp32; 1024 columns: <1% of the work), lowered by a bound on both GEMMs' rounding so that K <= m
(unlowered, cuBLAS's order of summing put K 0.014 above the tiles' m at logits of 7306), and a sampled max
lies far less than ``REF_MARGIN`` = 32 below the row's max for any logits a model produces, so p <= e^32
and no tile needs its own reference. Once the merge has m and s, with s_K = s exp(m - K) and c = 1 / divisor
(the loss's weight of every row),
    g = (c / s_K) p,   g_y = (c / s_K) (exp(z_y - K) - s_K) = (exp(z_y - m) / s - 1) c:
the recompute path's g, with one factor r = c / s_K per row (0 in an ignored row, whose p is 0), once p's
label entry holds exp(z_y - K) - s_K. So dh[chunk] = r (p W) (an fp32 GEMM result, scaled, rounded once) and
dW += p^T (r h) are cuBLAS GEMMs, and no pass over [R, V] turns p into g. A row whose max does exceed K + 32
(a sample far off, or a +inf logit outside it) takes a reference past it
(``_math.p_reference``: a whole number of ln 2 steps from K, so that the settle kernel's rescale of
the row's other tiles is a multiplication by a power of 2, exact).
K is also lowered by ln 2 u_i, u_i spread evenly over [0, 1) by row index (``REF_SPREAD``): where a model
predicts alike in every row, as it does once it has learnt the tokens' frequencies, one shared m - K would
round every row's p alike, and whatever sums over rows (dW, and through dh the norm weight before the head)
would add those roundings up in step. Spread over a binade they average out. Without the spread,
Llama-3.2-1B's tied embedding and final norm took 1.2x stock's gradient error against the fp32 model; a torch
emulation with the row's max as K (p = 1 exactly there) 1.0x (bench/results/2026-12-06-h200); with the spread
1.01x (bench/results/2026-12-07-h100).
The label's entry: in p it is q = exp(z_y - K) - s_K rounded to bf16 (``_settle_kernel``), at the scale of the
row's sum, up to 2^-9 c off where stock rounds g_y = (p_y - 1) c itself (dW 2.5x, dh 1.4x stock's error at a
random-init head, ``bench/lce_grad_error.py``). The exact remainders are added apart: dh adds (g_y - r q) W[y]
before its one rounding, and dW's row y is set after the GEMMs to the fp32 sum over chunks of p[:, y]^T (r h)
plus sum_{i: y_i = y} g_y,i h_i - q_i (r_i h_i), rounded once as stock's one GEMM rounds it
(``_lce_label_rows``, which says what rounding them per chunk cost). g_y is rounded as stock rounds it (where
c = 1 / n is not a power of 2, every label entry of stock's g carries bf16(c)'s rounding, +0.39% at n = 510).
The label's term stays in p for dW's sake: a frequent token's label terms and the rest of its row largely
cancel once a model has learnt its frequency, and added after the GEMM's rounding (p's entry 0) they left that
rounding of the larger part in Llama-3.2-1B's tied embedding, 1.22x stock's error against the fp32 model; this
form, emulated in torch inside the same loop with the row's max as K, 1.00x (bench/results/2026-12-06-h100-g).
The kernels themselves, with the sampled K, 1.19-1.21x, and an emulation with that K (the form before, dW
rounded once) 1.26x (2026-12-06-h200): what the spread above is for. dW's other rows keep r h's rounding, and
one rounding per chunk after the first where they sum over chunks (chunks of ``P_BYTES`` of p keep them few).

The gradients are of the loss itself, so the autograd backward only scales them by its upstream gradient
(``scale_grad``: exact when that is 1 or a power of 2, and in place skipped for 1). fp16 inputs keep the
recompute path: under a loss scaler their gradients, computed before the scale is known, would leave fp16's
range.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._lce_label_rows import label_order, label_sums, set_label_rows, slot_columns, slot_map
from ._lce_tiles import REF_MARGIN, _scored, tiles_fwd
from ._math import centred, exp2_step, p_reference
from ._utils import cdiv, device_of, eager_cuda, mm_f32, pow2, sms_for

# Bytes of one chunk of p at most: rows per chunk <= P_BYTES // (2 V), a multiple of BM, spread evenly
# (8192 x 896, V = 151,936: 5 chunks of 1,664 rows). 1 GiB (3 chunks) ran 1-3% faster, at 0.3-0.6 GB more
# of op peak (bench/results/2026-12-04-h200/chunk_ab_call16.log).
P_BYTES = 512 << 20
SAMPLES = 1024  # vocabulary columns whose logits give each row's reference K
# Each row's K is lowered by REF_SPREAD u_i, u_i = frac(i phi) spread evenly over [0, 1) (row_offsets): with
# ln 2, the rows' p sit at every position of their binade, so their bf16 roundings differ from row to row.
REF_SPREAD = 0.6931471805599453
SETTLE_TILES = 8  # tiles of p per step of the settle kernel's rescale
SETTLE_SCAN = 1024  # tile references per step of its scan
SCALE_BLOCK = 4096  # elements per step of the gradient scaling's programs
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
def _settle_kernel(
    P, RP, REF, M, S, ZLAB, LABELS, DIVISOR, R, GLAB, QLAB, SLOT, LP, stride_p, stride_lp, vocab, n_tiles_v,
    ignore_index, BN: tl.constexpr, MARGIN: tl.constexpr, TILES: tl.constexpr, SCAN: tl.constexpr,
    CAPTURE: tl.constexpr,
):  # fmt: skip
    """One row: K = REF (the sample's max) unless the row's max m exceeds it by more than MARGIN (then K is
    ``p_reference``'s, as the tile holding m chose, and the tiles stored against other references r_j are
    rescaled by ``exp2_step(r_j, K)``, a power of 2: 1 where a +inf r_j is the row's max, nan for a row of
    -inf logits, as its p); the label's entry of p set to q = e_y - s_K and g's, g_y = (p_y - 1) c, both
    rounded to p's dtype and written to QLAB and GLAB; the row's factor r = c / s_K to R, c = 1 / DIVISOR (1
    for a divisor 0). An ignored row keeps its 0s. The row's references are scanned SCAN at a time; only a
    row with a factor other than 1 (rare: its max lay past the margin) walks its tiles, and then only those
    with one (a loop over every tile took 46 us per 1,664-row chunk at 8192 x 896 on the H200, for one label
    entry per row). CAPTURE: what it writes into p's label columns goes into their slots of LP as well (the
    tile forward's copy, ``_lce_tiles``; SLOT the column -> slot map)."""
    row = tl.program_id(0).to(tl.int64)
    y = tl.load(LABELS + row)
    r = 0.0
    g_y = 0.0
    q_y = 0.0
    if y != ignore_index:
        m = tl.load(M + row)
        ref = tl.load(REF + row)
        k = p_reference(m, ref, MARGIN)  # as the tile holding the row's max chose: its p needs no rescale
        s_k = tl.load(S + row) * tl.exp(centred(m, k))
        d = tl.load(DIVISOR).to(tl.float32)
        c = tl.div_rn(1.0, tl.where(d != 0, d, 1.0))  # c = 1 / divisor; nothing supervised: 1
        r = c / s_k
        rescale = 0
        for t0 in range(0, n_tiles_v, SCAN):
            ts = t0 + tl.arange(0, SCAN)
            f = exp2_step(tl.load(RP + row * n_tiles_v + ts, mask=ts < n_tiles_v, other=k), k)
            rescale = tl.maximum(rescale, tl.max((f != 1.0).to(tl.int32), axis=0))
        if rescale > 0:
            for t0 in range(0, n_tiles_v, TILES):
                ts = t0 + tl.arange(0, TILES)
                f = exp2_step(tl.load(RP + row * n_tiles_v + ts, mask=ts < n_tiles_v, other=k), k)
                if tl.max((f != 1.0).to(tl.int32), axis=0) > 0:
                    cols = ts[:, None] * BN + tl.arange(0, BN)[None, :]
                    # Not the label's entry: the store below is its only writer.
                    mask = (f != 1.0)[:, None] & (cols < vocab) & (cols != y)
                    p = tl.load(P + row * stride_p + cols, mask=mask, other=0.0).to(tl.float32)
                    p = (p * f[:, None]).to(P.dtype.element_ty)
                    tl.store(P + row * stride_p + cols, p, mask=mask)
                    if CAPTURE:
                        slot = tl.load(SLOT + cols, mask=mask, other=-1).to(tl.int64)
                        tl.store(LP + slot * stride_lp + row, p, mask=mask & (slot >= 0))
        if (y >= 0) & (y < vocab):  # the label check runs apart
            # g's label entry, rounded as stock rounds it; p's, q = e_y - s_K rounded, so that the GEMMs sum
            # r q (about g_y) with the rest of the row before their one rounding, and dh and dW add the
            # exact remainders (g_y - r q) W[y] and g_y h - q (r h).
            e_y = tl.exp(centred(tl.load(ZLAB + row), k))
            g_y = ((e_y / s_k - 1.0) * c).to(P.dtype.element_ty).to(tl.float32)
            q = (e_y - s_k).to(P.dtype.element_ty)
            tl.store(P + row * stride_p + y, q)
            if CAPTURE:
                tl.store(LP + tl.load(SLOT + y).to(tl.int64) * stride_lp + row, q)
            q_y = q.to(tl.float32)
    tl.store(R + row, r)
    tl.store(GLAB + row, g_y)
    tl.store(QLAB + row, q_y)


@triton.jit
def _scale_rows_kernel(
    PW, H, R, GLAB, QLAB, W, LABELS, DH, HR, stride_pw, stride_h, stride_w, stride_dh, stride_hr, hdim, vocab,
    ignore_index, NEED_DH: tl.constexpr, NEED_DW: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """One row of a chunk: dh = r (p W) + (g_y - r q) W[y] rounded once from the fp32 GEMM result (p's label
    entry q, g's g_y: QLAB, GLAB), and dW's operand r h, 0 in an ignored row (whose hidden state may be inf or
    nan: ``dw_rows``). One launch where torch's broadcasts over mixed dtypes took four."""
    row = tl.program_id(0).to(tl.int64)
    r = tl.load(R + row)
    y = tl.load(LABELS + row)
    keep = y != ignore_index
    labelled = _scored(y, ignore_index, vocab)
    g_y = tl.load(GLAB + row) - r * tl.load(QLAB + row)  # the label's term that p W leaves out
    w_y = W + tl.where(labelled, y, 0) * stride_w
    for k0 in range(0, hdim, BLOCK):
        ks = k0 + tl.arange(0, BLOCK)
        mask = ks < hdim
        if NEED_DH:
            pw = tl.load(PW + row * stride_pw + ks, mask=mask, other=0.0) * r
            pw += g_y * tl.load(w_y + ks, mask=mask & labelled, other=0.0).to(tl.float32)
            tl.store(DH + row * stride_dh + ks, pw.to(DH.dtype.element_ty), mask=mask)
        if NEED_DW:
            h = tl.load(H + row * stride_h + ks, mask=mask, other=0.0).to(tl.float32)
            tl.store(HR + row * stride_hr + ks, tl.where(keep, h * r, 0.0).to(HR.dtype.element_ty), mask=mask)


@triton.jit
def _scale_kernel(X, OUT, G, n, BLOCK: tl.constexpr, SKIP_ONE: tl.constexpr):
    """out = x g, the fp32 product rounded once to out's dtype (g one fp32 element, not rounded to x's dtype
    first: the scale of 1 / accumulation steps stays exact to fp32). SKIP_ONE (in place, out = x): where g
    is 1 nothing is read or written."""
    g = tl.load(G).to(tl.float32)
    end = tl.where(g != 1.0, n, 0) if SKIP_ONE else n
    step = tl.num_programs(0).to(tl.int64) * BLOCK
    for start in range(tl.program_id(0).to(tl.int64) * BLOCK, end, step):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(OUT + offs, (x * g).to(OUT.dtype.element_ty), mask=mask)


def scale_grad(t: Tensor, g: Tensor, in_place: bool) -> Tensor:
    """t * g for the one-pass gradients and the loss's upstream gradient g: in place where nothing reads t
    again. On CUDA one kernel that, in place, skips an upstream 1 (otherwise a read and a write of dW's
    [V, H], 2 x 272 MB at 151,936 x 896); torch elsewhere, or where t is not contiguous."""
    if not (
        eager_cuda(t, g)
        and t.is_contiguous()
        and g.numel() == 1
        and g.dtype == torch.float32
        and g.device == t.device
    ):
        return t.mul_(g) if in_place else torch.mul(t, g)
    out = t if in_place else torch.empty_like(t)
    n = t.numel()
    if n > 0:
        with device_of(t):
            _scale_kernel[(max(1, min(cdiv(n, SCALE_BLOCK), 8 * sms_for(t))),)](
                t, out, g, n, BLOCK=SCALE_BLOCK, SKIP_ONE=in_place, num_warps=4
            )
    return out


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


def dw_rows(hidden: Tensor, labels: Tensor, ignore_index: int) -> Tensor:
    """The hidden rows that dW sums g_i h_i over: an ignored row's g is 0, and its hidden state (inf or nan
    there is allowed) must not make that a nan, so it is zeroed."""
    return torch.where((labels != ignore_index).unsqueeze(1), hidden, 0.0)


class RowsPrep(NamedTuple):
    """What the one pass needs before its first tile, from its inputs alone (no label count): an eager call
    queues it ahead of its label check's wait, so that the GPU runs it while the host waits."""

    ref: Tensor  # each row's reference K (``row_references``)
    order: tuple[Tensor, Tensor, Tensor] | None  # ``label_order``; None without dW
    slots: Tensor | None  # ``slot_map``: the tiles' capture map
    count: Tensor | None  # the distinct labels' count, [1] on the device
    sums: Tensor | None  # [N, H] fp32 zeros: dW's label sums by slot


def rows_prep(hidden: Tensor, weight: Tensor, labels: Tensor, ignore_index: int, need_dw: bool) -> RowsPrep:
    """The one pass's ``RowsPrep`` of these rows."""
    ref = row_references(hidden, weight)
    if not need_dw:
        return RowsPrep(ref, None, None, None, None)
    order = label_order(labels)  # dW's label rows: their GEMM sums kept in fp32 as well, by slot
    slots = slot_map(order, weight.shape[0], ignore_index)
    sums = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    return RowsPrep(ref, order, slots, order[2][-1:] + 1, sums)


def rows_fwd_bwd(
    hidden: Tensor, weight: Tensor, labels: Tensor, ignore_index: int, token_stats: bool, divisor: Tensor,
    need_dh: bool, need_dw: bool, prep: RowsPrep | None = None,
) -> tuple[Tensor, ...]:  # fmt: skip
    """(m, s, entropy sum, argmax, label logit, loss) per row as ``tiles_fwd`` (s 0 in an ignored row without
    ``token_stats``), then dh and dw of sum_i c l_i (bf16 hidden and weight; c = 1 / ``divisor``, one element,
    or 1 where it is 0); one that is not needed is empty. ``prep``: ``rows_prep`` of these rows when the
    caller has queued it already."""
    n = hidden.shape[0]
    vocab = weight.shape[0]
    ref, order, slots, count, sums = (
        rows_prep(hidden, weight, labels, ignore_index, need_dw) if prep is None else prep
    )
    dh = torch.empty_like(hidden) if need_dh else hidden.new_empty(0)
    dw = (torch.empty_like(weight) if n > 0 else torch.zeros_like(weight)) if need_dw else weight.new_empty(0)
    r_all, g_label, q_label = torch.empty(3, n, dtype=torch.float32, device=hidden.device)
    cols = None

    def on_rows(
        r0: int, p: Tensor, rp: Tensor, bn: int, m: Tensor, s: Tensor, zlab: Tensor, lp: Tensor | None
    ) -> None:
        nonlocal cols
        k = p.shape[0]
        y = labels[r0 : r0 + k]
        r, g_y, q_y = (t[r0 : r0 + k].unsqueeze(1) for t in (r_all, g_label, q_label))
        _settle_kernel[(k,)](
            p, rp, ref[r0:], m, s, zlab, y, divisor, r, g_y, q_y, y if lp is None else slots,
            p if lp is None else lp, p.stride(0), 0 if lp is None else lp.stride(0), vocab, rp.shape[1],
            ignore_index, BN=bn, MARGIN=REF_MARGIN, TILES=SETTLE_TILES,
            SCAN=min(SETTLE_SCAN, pow2(rp.shape[1])), CAPTURE=lp is not None, num_warps=4,
        )  # fmt: skip
        hdim = hidden.shape[1]
        pw = mm_f32(p, weight) if need_dh else r
        h, dh_k = hidden[r0 : r0 + k], dh[r0 : r0 + k] if need_dh else r
        h_r = torch.empty_like(h) if need_dw else r
        _scale_rows_kernel[(k,)](
            pw, h, r, g_y, q_y, weight, y, dh_k, h_r, pw.stride(0), h.stride(0), weight.stride(0),
            dh_k.stride(0), h_r.stride(0), hdim, vocab, ignore_index, NEED_DH=need_dh, NEED_DW=need_dw,
            BLOCK=min(pow2(hdim), 1024), num_warps=4,
        )  # fmt: skip
        if need_dw:
            if r0 == 0:
                torch.mm(p.T, h_r, out=dw)
            else:
                dw.addmm_(p.T, h_r)
            if lp is None:  # not captured by the tiles (``tiles_fwd``): gathered from p
                cols = slot_columns(order, vocab) if cols is None else cols
                lp = p.index_select(1, cols).T
            label_sums(sums, lp, h_r, count)

    p_rows = P_BYTES // (2 * vocab)
    out = tiles_fwd(hidden, weight, labels, ignore_index, token_stats, on_rows, p_rows, ref, slots)
    if need_dw:
        set_label_rows(dw, sums, hidden, order, r_all, g_label, q_label, ignore_index)
    return (*out, dh, dw)
