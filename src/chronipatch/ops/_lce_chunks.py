"""The loss's fp32 path (``linear_cross_entropy``): the vocabulary in chunks of Vc fp32 logits from cuBLAS.

The logits are IEEE fp32 GEMMs, as stock's (or TF32 where the user turned it on). The forward folds each
chunk into every row's running (max m, sum s = sum exp(z - m), label logit; entropy sum and first argmax
when asked for); the backward recomputes the same chunks (the same GEMM shapes give the same logits bit
for bit), writes g = (softmax - onehot) * dloss over each, and computes dW[chunk] = g^T h in one GEMM and
dh += g W[chunk]. With ``wide`` (``linear_cross_entropy._wide``) those two GEMMs and the dh sum run in
fp64, half a chunk at a time.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._math import centred, exp_f32, recentred_entropy
from ._utils import addmm_acc

CHUNK_BYTES = 192 << 20  # fp32 inputs: bytes of one [N, Vc] logits chunk (fewer, larger GEMMs and launches)
BLOCK_V = 1024  # backward: no reductions, bandwidth-bound at this width
# Forward over fp32 logits: tiles 1024-4096 wide ran within 3% (H200, bench/results/2026-12-02-h200/
# lce_kernels_call1.md); 2048 with 4 warps divides the 6144-column chunks of 8192 rows.
FWD_BLOCK_V, FWD_WARPS = 2048, 4

# ---------------------------------------------------------------- kernels


@triton.jit
def _fwd_chunk_kernel(
    Z, LABELS, M, S, E, ARG, ZLAB, stride_z, vc, v0, ignore_index,
    BLOCK_V: tl.constexpr, TOKEN_STATS: tl.constexpr,
):  # fmt: skip
    """Fold one logits chunk into each row's running (max m, sum s); with TOKEN_STATS also the entropy sum e
    and the argmax (a training step that logs neither skips their per-element work)."""
    row = tl.program_id(0).to(tl.int64)
    z_row = Z + row * stride_z
    m = tl.load(M + row)  # running max; s = sum exp(z - m); e = sum exp(z - m) * (z - m)
    s = tl.load(S + row)
    if TOKEN_STATS:
        e = tl.load(E + row)
        arg = tl.load(ARG + row)
    for c0 in range(0, vc, BLOCK_V):
        cols = c0 + tl.arange(0, BLOCK_V)
        z = tl.load(z_row + cols, mask=cols < vc, other=float("-inf")).to(tl.float32)
        tile_max = tl.max(z, axis=0)
        m_new = tl.maximum(m, tile_max)
        # Infinite maxima: m == m_new (-inf before any finite logit, or +inf twice) keeps the sums as
        # they are, and a +inf logit counts exp(0) = 1 against m = +inf, not exp(inf - inf) = nan.
        alpha = tl.where(m == m_new, 1.0, exp_f32(m - m_new))
        zc = centred(z, m_new)
        p = exp_f32(zc)
        if TOKEN_STATS:
            # Strictly greater keeps the first maximum, as torch.argmax does.
            arg = tl.where(tile_max > m, v0 + c0 + tl.argmax(z, axis=0), arg)
            e = recentred_entropy(e, s, alpha, m, m_new)
            e += tl.sum(tl.where(p > 0, p * zc, 0.0), axis=0)  # -inf logits add 0, not 0 * -inf
        s = s * alpha + tl.sum(p, axis=0)
        m = m_new
    tl.store(M + row, m)
    tl.store(S + row, s)
    if TOKEN_STATS:
        tl.store(E + row, e)
        tl.store(ARG + row, arg)
    y = tl.load(LABELS + row)
    if (y != ignore_index) & (y >= v0) & (y < v0 + vc):
        tl.store(ZLAB + row, tl.load(z_row + (y - v0)).to(tl.float32))


@triton.jit
def _bwd_chunk_kernel(
    Z, LABELS, STATS, DROWS, stride_z, vc, v0, ignore_index, BLOCK_V: tl.constexpr
):  # fmt: skip
    """Write g = (softmax - onehot) * dloss of the fp32 logits chunk Z over Z, in place."""
    row = tl.program_id(0).to(tl.int64)
    z_row = Z + row * stride_z
    y = tl.load(LABELS + row)
    m = tl.load(STATS + 2 * row)
    s = tl.load(STATS + 2 * row + 1)
    keep = y != ignore_index
    scale = tl.where(keep, tl.load(DROWS + row), 0.0)
    for c0 in range(0, vc, BLOCK_V):
        cols = c0 + tl.arange(0, BLOCK_V)
        mask = cols < vc
        z = tl.load(z_row + cols, mask=mask, other=0.0)
        p = tl.div_rn(exp_f32(centred(z, m)), s)  # IEEE division: g keeps all 24 bits
        g = p - tl.where(v0 + cols == y, 1.0, 0.0)
        # An ignored row is exactly 0, even where its logits are nan (it takes no part in the loss).
        tl.store(z_row + cols, tl.where(keep, g * scale, 0.0), mask=mask)


# ---------------------------------------------------------------- launchers


def _chunk_width(hidden: Tensor, weight: Tensor) -> int:
    """Vocabulary columns per fp32 logits chunk of CHUNK_BYTES (a multiple of 256, at least 256)."""
    vc = CHUNK_BYTES // max(1, hidden.shape[0] * 4)
    return max(256, min(weight.shape[0], 65536, vc // 256 * 256))


def _logit_chunks(hidden: Tensor, weight: Tensor):
    """Yield (v0, weight chunk, fp32 logits chunk = hidden @ chunk.T) over the vocabulary; every chunk is
    written into one preallocated buffer, so a single [N, Vc] chunk is ever alive. Forward and backward walk
    the same chunks: the same GEMM shapes recompute bit for bit the logits the row statistics came from
    (another shape can pick another kernel, and a logit of 1e4 one ulp off moves its softmax)."""
    n, vocab = hidden.shape[0], weight.shape[0]
    vc = _chunk_width(hidden, weight)
    buf = hidden.new_empty(n * vc)
    for v0 in range(0, vocab, vc):
        w = weight[v0 : v0 + vc]
        z = buf[: n * w.shape[0]].view(n, w.shape[0])
        torch.mm(hidden, w.T, out=z)
        yield v0, w, z


def chunks_fwd(
    hidden: Tensor, weight: Tensor, labels: Tensor, ignore_index: int, token_stats: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(m, s, entropy sum e, argmax, label logit) per row; without ``token_stats`` e and argmax are
    stand-ins the kernel never touched."""
    n = hidden.shape[0]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    m = torch.full((n,), float("-inf"), **f32)
    s, zlab = torch.zeros(n, **f32), torch.zeros(n, **f32)
    e = torch.zeros(n, **f32) if token_stats else s
    arg = torch.zeros(n, dtype=torch.int64, device=hidden.device) if token_stats else labels
    for v0, _, z in _logit_chunks(hidden, weight) if n > 0 else ():
        chunk = (z.stride(0), z.shape[1], v0, ignore_index)
        _fwd_chunk_kernel[(n,)](
            z, labels, m, s, e, arg, zlab, *chunk,
            BLOCK_V=FWD_BLOCK_V, TOKEN_STATS=token_stats, num_warps=FWD_WARPS,
        )  # fmt: skip
    return m, s, e, arg, zlab


def chunks_bwd(
    grad_rows: Tensor, hidden: Tensor, weight: Tensor, labels: Tensor, stats: Tensor, ignore_index: int,
    dh: Tensor, dw: Tensor, h_w: Tensor | None, wide: bool,
) -> None:  # fmt: skip
    """Accumulate dh ([N, H] in fp32, fp64 if ``wide``, or empty) and write dw ([V, H] or empty), chunk by
    chunk; ``h_w`` is hidden with ignored rows zeroed, for dW."""
    n = hidden.shape[0]
    h_w = h_w.double() if wide and h_w is not None else h_w
    for v0, w, g in _logit_chunks(hidden, weight):
        _bwd_chunk_kernel[(n,)](
            g, labels, stats, grad_rows, g.stride(0), g.shape[1], v0, ignore_index, BLOCK_V=BLOCK_V
        )  # g written over the logits
        if wide:
            # fp64 copies of half a chunk at a time: no larger than the fp32 chunk itself.
            half = (g.shape[1] + 1) // 2
            for c0 in range(0, g.shape[1], half):
                g64, w64 = g[:, c0 : c0 + half].double(), w[c0 : c0 + half].double()
                if dw.numel():
                    dw[v0 + c0 : v0 + c0 + w64.shape[0]] = g64.T @ h_w
                if dh.numel():
                    dh.addmm_(g64, w64)
                del g64, w64  # before the next half's copies are made
        else:
            if dw.numel():
                torch.mm(g.T, h_w, out=dw[v0 : v0 + w.shape[0]])
            if dh.numel():
                addmm_acc(dh, g, w)
