"""Tuning table for the loss's pieces on one vocabulary chunk (CUDA only).

    python bench/lce_kernels.py [--n 8192] [--h 896] [--v 151936] [--out DIR]

Times (median of ``triton.testing.do_bench``) the logits GEMM of one chunk with bf16 and fp32 output,
the forward softmax kernel of the op at several tile widths and warp counts, two alternative forward
layouts (several rows per program; per-lane running sums with one reduction per chunk), the backward
kernel's configurations, and the whole op forward + backward. Alternatives are checked against the op's
kernel (row max exact, row sum to 1e-6) before they are timed.
"""

from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

from chronipatch import ops

lce = importlib.import_module("chronipatch.ops.linear_cross_entropy")


@triton.jit
def _rows_kernel(Z, M, S, stride_z, n_rows, vc, ROWS: tl.constexpr, BLOCK_V: tl.constexpr):
    """ROWS rows per program: each row's reductions stay inside one warp's share of the tile."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    rmask = rows < n_rows
    base = Z + rows.to(tl.int64)[:, None] * stride_z
    m = tl.load(M + rows, mask=rmask, other=float("-inf"))
    s = tl.load(S + rows, mask=rmask, other=0.0)
    for c0 in range(0, vc, BLOCK_V):
        cols = c0 + tl.arange(0, BLOCK_V)
        mask = rmask[:, None] & (cols < vc)[None, :]
        z = tl.load(base + cols[None, :], mask=mask, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        alpha = tl.where(m == m_new, 1.0, tl.exp(m - m_new))
        s = s * alpha + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m = m_new
    tl.store(M + rows, m, mask=rmask)
    tl.store(S + rows, s, mask=rmask)


@triton.jit
def _lanes_kernel(Z, M, S, stride_z, vc, BLOCK_V: tl.constexpr):
    """Per-lane running (max, sum) with one exp per element; the row reductions run once per chunk."""
    row = tl.program_id(0).to(tl.int64)
    z_row = Z + row * stride_z
    mv = tl.full([BLOCK_V], float("-inf"), tl.float32)
    sv = tl.zeros([BLOCK_V], tl.float32)
    for c0 in range(0, vc, BLOCK_V):
        cols = c0 + tl.arange(0, BLOCK_V)
        z = tl.load(z_row + cols, mask=cols < vc, other=float("-inf")).to(tl.float32)
        e = tl.where(z == float("-inf"), 0.0, tl.exp(-tl.abs(z - mv)))
        sv = tl.where(z > mv, sv * e + 1.0, sv + e)
        mv = tl.maximum(mv, z)
    m_c = tl.max(mv, axis=0)
    s_c = tl.sum(tl.where(mv == float("-inf"), 0.0, sv * tl.exp(mv - m_c)), axis=0)
    m = tl.load(M + row)
    s = tl.load(S + row)
    m_new = tl.maximum(m, m_c)
    s = tl.where(m == float("-inf"), 0.0, s * tl.exp(m - m_new)) + s_c * tl.exp(m_c - m_new)
    tl.store(M + row, m_new)
    tl.store(S + row, s)


def ms(fn) -> float:
    return do_bench(fn, warmup=25, rep=200, return_mode="median")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=8192)
    p.add_argument("--h", type=int, default=896)
    p.add_argument("--v", type=int, default=151936)
    p.add_argument("--out", default="bench/out")
    a = p.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    bf = torch.bfloat16
    h = torch.randn(a.n, a.h, device=dev, dtype=bf)
    w = torch.randn(a.v, a.h, device=dev, dtype=bf) * a.h**-0.5
    labels = torch.randint(0, a.v, (a.n,), device=dev)
    vc = lce._chunk_width(h, w)
    rows: list[tuple[str, float, int]] = []  # (case, ms, chunk columns)
    gb = lambda t: t.numel() * t.element_size() / 1e9

    z16, z32 = torch.empty(a.n, 2 * vc, device=dev, dtype=bf), torch.empty(a.n, vc, device=dev)
    wc, wc2 = w[:vc], w[: 2 * vc]
    gemm16 = ms(lambda: torch.mm(h, wc2.T, out=z16))
    rows.append((f"GEMM [{a.n},{a.h}]x[{a.h},{2 * vc}] bf16 out", gemm16, 2 * vc))
    rows.append(
        (
            f"GEMM [{a.n},{a.h}]x[{a.h},{vc}] fp32 out",
            ms(lambda: torch.mm(h, wc.T, out_dtype=torch.float32, out=z32)),
            vc,
        )
    )
    torch.mm(h, wc.T, out_dtype=torch.float32, out=z32)
    torch.mm(h, wc2.T, out=z16)
    f32 = dict(device=dev, dtype=torch.float32)

    def fresh():
        return torch.full((a.n,), float("-inf"), **f32), torch.zeros(a.n, **f32), torch.zeros(a.n, **f32)

    ref_m, ref_s, zlab = fresh()
    for z, name in ((z32, "fp32"), (z16, "bf16")):
        for block, warps in ((1024, 4), (2048, 4), (2048, 8), (4096, 8), (4096, 16)):
            m, s, zl = fresh()

            def fwd(z=z, m=m, s=s, zl=zl, block=block, warps=warps):
                lce._fwd_chunk_kernel[(a.n,)](
                    z, labels, m, s, s, labels, zl, z.stride(0), z.shape[1], 0, -100,
                    BLOCK_V=block, TOKEN_STATS=False, EXACT=False, num_warps=warps,
                )  # fmt: skip

            t = ms(fwd)
            name_ = f"fwd op kernel {name} [{a.n},{z.shape[1]}] BLOCK_V={block} warps={warps}"
            rows.append((name_, t, z.shape[1]))
        m, s, _ = fresh()
        lce._fwd_chunk_kernel[(a.n,)](
            z, labels, m, s, s, labels, zlab, z.stride(0), z.shape[1], 0, -100,
            BLOCK_V=4096, TOKEN_STATS=False, EXACT=False, num_warps=8,
        )  # fmt: skip
        ref_m, ref_s = m.clone(), s.clone()
        for rws, block, warps in ((4, 1024, 4), (8, 1024, 8), (8, 512, 8), (16, 512, 8), (4, 2048, 8)):
            m, s, _ = fresh()
            grid = (triton.cdiv(a.n, rws),)
            _rows_kernel[grid](
                z, m, s, z.stride(0), a.n, z.shape[1], ROWS=rws, BLOCK_V=block, num_warps=warps
            )
            ok = torch.equal(m, ref_m) and torch.allclose(s, ref_s, rtol=1e-6)

            def run(z=z, m=m, s=s, rws=rws, block=block, warps=warps, grid=grid):
                _rows_kernel[grid](
                    z, m, s, z.stride(0), a.n, z.shape[1], ROWS=rws, BLOCK_V=block, num_warps=warps
                )

            name_ = f"fwd rows {name} ROWS={rws} BLOCK_V={block} warps={warps}{'' if ok else ' MISMATCH'}"
            rows.append((name_, ms(run), z.shape[1]))
        for block, warps in ((1024, 4), (2048, 8), (4096, 8)):
            m, s, _ = fresh()
            _lanes_kernel[(a.n,)](z, m, s, z.stride(0), z.shape[1], BLOCK_V=block, num_warps=warps)
            ok = torch.equal(m, ref_m) and torch.allclose(s, ref_s, rtol=1e-6)

            def run(z=z, m=m, s=s, block=block, warps=warps):
                _lanes_kernel[(a.n,)](z, m, s, z.stride(0), z.shape[1], BLOCK_V=block, num_warps=warps)

            name_ = f"fwd lanes {name} BLOCK_V={block} warps={warps}{'' if ok else ' MISMATCH'}"
            rows.append((name_, ms(run), z.shape[1]))

    stats = torch.stack([ref_m, ref_s], -1).contiguous()
    drows = torch.full((a.n,), 1.0 / a.n, **f32)
    g16 = torch.empty(a.n, vc, device=dev, dtype=bf)
    narrow = z32.view(bf)[:, :vc]  # the op's layout: g over the first half of each fp32 row
    cases = (
        (z32, g16, "fp32 -> bf16 buffer", False),
        (z16, z16, "bf16 in place", False),
        (z32, narrow, "fp32 -> bf16 over it (the op)", True),  # last: it overwrites z32
    )
    for z, g, name, nar in cases:
        for block, warps in ((1024, 4), (2048, 4), (2048, 8), (4096, 8)):

            def bwd(z=z, g=g, block=block, warps=warps, nar=nar):
                lce._bwd_chunk_kernel[(a.n,)](
                    z, g, labels, stats, drows, z.stride(0), g.stride(0), z.shape[1], 0, -100,
                    BLOCK_V=block, EXACT=False, NARROW=nar, num_warps=warps,
                )  # fmt: skip

            name_ = f"bwd kernel {name} [{a.n},{z.shape[1]}] BLOCK_V={block} warps={warps}"
            rows.append((name_, ms(bwd), z.shape[1]))

    hg, wg = h.clone().requires_grad_(), w.clone().requires_grad_()

    def op():
        ops.linear_cross_entropy(hg, wg, labels, shift=False).backward()
        hg.grad = wg.grad = None

    rows.append((f"op fwd+bwd {a.n}x{a.h} V={a.v} (chunks of {vc} fp32 columns)", ms(op), a.v))
    print(f"chunk bytes: fp32 {gb(z32):.3f} GB, bf16 x2 width {gb(z16):.3f} GB")
    lines = [
        "| case | ms | ms over the whole vocabulary |",
        "|---|---|---|",
        *(f"| {k} | {t:.4f} | {t * a.v / cols:.3f} |" for k, t, cols in rows),
    ]
    text = "\n".join(lines)
    print(text)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    head = f"# lce kernels\n\n- device: {torch.cuda.get_device_name()}, torch {torch.__version__}\n\n"
    (out / "lce_kernels.md").write_text(head + text + "\n")
    (out / "lce_kernels.json").write_text(json.dumps({k: t for k, t, _ in rows}, indent=1))


if __name__ == "__main__":
    main()
