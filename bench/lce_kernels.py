"""Tuning table for the loss's tile kernels (``ops/_lce_tiles.py``, ``_bwd.py``), 2-byte inputs, CUDA only.

    python bench/lce_kernels.py [--n 8192] [--h 896] [--v 151936] [--dtype bf16] [--first K | --only I,J]
        [--out DIR]

For each load path (TMA, pointers) and tile config (BM, BN, BK, warps, stages) it times (median of
``triton.testing.do_bench``) the forward (tile kernel + merge), that forward also storing p (the bf16 one
pass's), the backward kernel of one g chunk scaled to the whole vocabulary, and the whole op forward +
backward; the row statistics and the loss are checked
against fp32 logits from cuBLAS (max |delta| of m, relative of s, absolute of the loss). The cuBLAS logits
GEMM with 2-byte output, over the whole vocabulary, is the reference rate of one of the op's four GEMMs.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
from pathlib import Path

import torch
from triton.testing import do_bench

from chronipatch import ops

tiles = importlib.import_module("chronipatch.ops._lce_tiles")
tiles_bwd = importlib.import_module("chronipatch.ops._lce_tiles_bwd")
# (TMA loads, (BM, BN, BK, warps, stages, programs per SM)); a large last entry: one tile per program
CONFIGS = [  # the two defaults first
    (True, (128, 256, 64, 8, 4, 1)),
    (False, (128, 128, 64, 8, 4, 1)),
    (True, (128, 256, 64, 8, 3, 1)),
    (True, (256, 128, 64, 8, 3, 1)),
    (True, (128, 128, 64, 8, 4, 1)),
    (True, (128, 256, 64, 8, 4, 1000)),
    (False, (64, 128, 64, 4, 4, 2)),
    # One warpgroup a CTA and two CTAs an SM (registers 191-251 a thread, shared 49-131 KB a CTA on sm_90):
    # one CTA's epilogue can run beside the other's GEMM, where one CTA of 8 warps idles the tensor cores.
    (True, (128, 128, 64, 4, 2, 2)),
    (True, (128, 128, 32, 4, 3, 2)),
    (True, (64, 256, 64, 4, 2, 2)),
]


def ms(fn) -> float:
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def _bwd_chunk_ms(tma, cfg, h, w, labels, stats) -> float:
    """The backward tile kernel over one g chunk, scaled to the whole vocabulary."""
    (n, hdim), vocab = h.shape, w.shape[0]
    bm, bn, bk, warps, stages, per_sm = cfg
    progs = tiles.sms_for(h) * per_sm
    cw = tiles_bwd.g_chunk_width(h, w, bn)
    g = torch.empty(n, cw, device=h.device, dtype=h.dtype)
    gd = tiles.TensorDescriptor.from_tensor(g, [bm, bn]) if tma else g
    drows = torch.full((n,), 1.0 / n, device=h.device)
    launch = tiles_bwd._bwd_tiles_kernel[(min(progs, tiles.cdiv(n, bm) * tiles.cdiv(cw, bn)),)]
    args = (h, w, *tiles._loads(h, w, tma, bm, bn, bk), g, gd, labels, stats, drows, h.stride(0), w.stride(0))
    args += (g.stride(0), n, vocab, hdim, 0, cw, -100, tiles._group_m(h, bm))
    consts = dict(BM=bm, BN=bn, BK=bk, EVEN_K=hdim % bk == 0, UPCAST=False, TMA=tma)
    consts["NUM_PROGS"] = progs
    stages = min(stages, tiles.P_STAGES) if tma else stages  # shared memory holds g's tile for its TMA store
    return ms(functools.partial(launch, *args, **consts, num_warps=warps, num_stages=stages)) * vocab / cw


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=8192)
    p.add_argument("--h", type=int, default=896)
    p.add_argument("--v", type=int, default=151936)
    p.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    p.add_argument("--first", type=int, default=len(CONFIGS), help="time only the first K configs")
    p.add_argument("--only", default=None, help="time only these configs, by index (comma list)")
    p.add_argument("--out", default="bench/out")
    a = p.parse_args()
    dev = torch.device("cuda")
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16}[a.dtype]
    torch.manual_seed(0)
    h = torch.randn(a.n, a.h, device=dev, dtype=dt)
    w = (torch.randn(a.v, a.h, device=dev) * a.h**-0.5).to(dt)
    labels = torch.randint(0, a.v, (a.n,), device=dev)
    z = torch.mm(h, w.T, out_dtype=torch.float32)
    ref_m, ref_lse = z.max(1).values, torch.logsumexp(z, 1)
    ref_loss = ref_lse - z.gather(1, labels[:, None])[:, 0]
    vc = 8192
    z16 = torch.empty(a.n, vc, device=dev, dtype=dt)
    gemm = ms(functools.partial(torch.mm, h, w[:vc].T, out=z16)) * a.v / vc
    del z, z16
    rows = [dict(config="cuBLAS logits GEMM, 2-byte out", fwd_ms=round(gemm, 3))]
    hg, wg = h.clone().requires_grad_(), w.clone().requires_grad_()

    def one_pass_loss():  # bf16 with gradients: the one-pass path (three GEMMs)
        return ops.linear_cross_entropy(hg, wg, labels, shift=False)

    def recompute_loss():  # reduction="none" takes the forward-then-recompute path (four GEMMs)
        return ops.linear_cross_entropy(hg, wg, labels, shift=False, reduction="none").sum().div(a.n)

    def step(loss_fn):
        loss_fn().backward()
        hg.grad = wg.grad = None

    op = functools.partial(step, one_pass_loss)
    # The one pass's forward alone: the tiles also store p (its chunks' GEMMs left out).
    rows_mod = importlib.import_module("chronipatch.ops._lce_rows")
    refs_mod = importlib.import_module("chronipatch.ops._lce_refs")
    ref, p_rows = refs_mod.row_references(h, w), rows_mod.P_BYTES // (2 * a.v)

    def fwd_p():
        tiles.tiles_fwd(h, w, labels, -100, False, lambda *args: None, p_rows, ref)

    default = tiles.TILE, tiles.TILE_PTR, tiles.TMA_LOADS
    picked = CONFIGS[: a.first] if a.only is None else [CONFIGS[int(i)] for i in a.only.split(",")]
    for tma, cfg in picked:
        tiles.TMA_LOADS = tma
        setattr(tiles, "TILE" if tma else "TILE_PTR", cfg)
        row: dict = dict(config=f"{'TMA' if tma else 'pointers'} {cfg}")
        try:
            m, s, *_ = tiles.tiles_fwd(h, w, labels, -100, False)
            loss = ops.linear_cross_entropy(h, w, labels, shift=False, reduction="none")
            row["m_err"] = (m - ref_m).abs().max().item()
            row["lse_err"] = (m + s.log() - ref_lse).abs().max().item()
            row["loss_err"] = (loss - ref_loss).abs().max().item()
            row["fwd_ms"] = round(ms(lambda: tiles.tiles_fwd(h, w, labels, -100, False)), 3)
            row["fwd_p_ms"] = round(ms(fwd_p), 3)
            row["bwd_kernel_ms"] = round(_bwd_chunk_ms(tma, cfg, h, w, labels, torch.stack([m, s], -1)), 3)
            row["op_ms"] = round(ms(op), 3)
        except Exception as e:  # a config past the shared memory or register limits
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
        print(row, flush=True)
        rows.append(row)
        tiles.TILE, tiles.TILE_PTR, tiles.TMA_LOADS = default
    # The bf16 op's one-pass path (``_lce_rows``) by chunk size of p, against the recompute path: time, extra
    # peak memory (the two gradients included) and the gradients' difference from the recompute path's.
    default_p = rows_mod.P_BYTES
    recompute_loss().backward()
    ref_dh, ref_dw = hg.grad, wg.grad
    hg.grad = wg.grad = None
    for name, loss_fn, p_bytes in [("op, recompute path", recompute_loss, default_p)] + [
        (f"op, one pass, P_BYTES {b >> 20} MiB", one_pass_loss, b) for b in (256 << 20, 512 << 20, 1 << 30)
    ]:
        rows_mod.P_BYTES = p_bytes
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss_fn().backward()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        dh_err = (hg.grad.float() - ref_dh.float()).abs().max().item()
        dw_err = (wg.grad.float() - ref_dw.float()).abs().max().item()
        hg.grad = wg.grad = None
        row = dict(
            config=name,
            op_ms=round(ms(functools.partial(step, loss_fn)), 3),
            peak_MiB=round(peak, 1),
            dh_diff=dh_err,
            dw_diff=dw_err,
        )
        print(row, flush=True)
        rows.append(row)
    rows_mod.P_BYTES = default_p
    keys = ["config", "fwd_ms", "fwd_p_ms", "bwd_kernel_ms", "op_ms", "m_err", "lse_err", "loss_err"]
    keys += ["peak_MiB", "dh_diff", "dw_diff", "error"]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows]
    text = "\n".join(lines)
    print(text)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    head = (
        f"# lce tile kernels\n\n- device: {torch.cuda.get_device_name()}, torch {torch.__version__}\n"
        f"- {a.n} x {a.h}, V = {a.v}, {a.dtype}; ms over the whole vocabulary (median, do_bench)\n\n"
    )
    (out / "lce_kernels.md").write_text(head + text + "\n")
    (out / "lce_kernels.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
