"""The loss and its gradients in one pass, for bf16 training: three GEMMs where the recompute path takes four.

``_lce_tiles_bwd`` computes the logits again (a fourth GEMM) because g needs each row's final
max m and sum s, known only after the whole vocabulary. Here the rows go in chunks of R: per chunk the tile
forward also stores p = exp(z - K) (bf16, [R, V]) against a reference K per row known before the GEMM: the
max of the row's logits over ``SAMPLES`` columns spread over the vocabulary (``_lce_refs``, summing
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
K is also lowered by ln 2 u_i, u_i spread evenly over [0, 1) by row index (``_lce_refs.REF_SPREAD``): where
a model predicts alike in every row, as it does once it has learnt the tokens' frequencies, one shared m - K
would round every row's p alike, and whatever sums over rows (dW, and through dh the norm weight before the
head) would add those roundings up in step. Spread over a binade they average out. Without the spread,
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
from ._lce_refs import row_references
from ._lce_tiles import REF_MARGIN, _scored, tiles_fwd
from ._math import centred, exp2_step, p_reference
from ._utils import cdiv, device_of, eager_cuda, mm_f32, pow2, sms_for

# Bytes of one chunk of p at most: rows per chunk <= P_BYTES // (2 V), a multiple of BM, spread evenly
# (8192 x 896, V = 151,936: 5 chunks of 1,664 rows). 1 GiB (3 chunks) ran 1-3% faster, at 0.3-0.6 GB more
# of op peak (bench/results/2026-12-04-h200/chunk_ab_call16.log).
P_BYTES = 512 << 20
SETTLE_TILES = 8  # tiles of p per step of the settle kernel's rescale
SETTLE_SCAN = 1024  # tile references per step of its scan
SCALE_BLOCK = 4096  # elements per step of the gradient scaling's programs


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
