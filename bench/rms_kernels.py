"""Tuning table for RMSNorm's kernels (``ops/rms_norm.py``): launch shapes against HF compiled, bf16.

    python bench/rms_kernels.py [--shapes 8192x896,8192x2048,8192x4096,131072x128] [--out DIR] [--smoke]

Per shape (rows x columns): HF's ``LlamaRMSNorm`` under ``torch.compile``, forward + backward, then
chronipatch's forward by (rows per program, warps) and its backward by (rows per step, warps, programs per
SM), each kernel alone, the op's own choice first; backward keys ending in ``d`` sum each step's dw products
in fp64 rather than fp32. GPU time per call of the kernels (``common.kernel_ms``, the sum of dw's partial
rows, the op's ``dw_sum``, included in the backward's). Every variant's y, dx and dw are checked against the
default's: within one bf16 ulp of the largest value (another launch shape sums a row's squares in another
order). ``--smoke`` runs tiny shapes through the Triton interpreter on CPU (no timings; one warp count a
row count, as the interpreter ignores num_warps).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from functools import partial

if "--smoke" in sys.argv:  # before triton is imported: its kernels then run on CPU tensors
    os.environ["TRITON_INTERPRET"] = "1"

import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from common import env_info, kernel_ms, meta_header, write_lines

rms = importlib.import_module("chronipatch.ops.rms_norm")
EPS = 1e-6


def fwd(x, w, rows: int, warps: int):
    m, n = x.shape
    y, rstd = torch.empty_like(x), torch.empty(m, dtype=torch.float32, device=x.device)
    rms._fwd_kernel[(rms.cdiv(m, rows),)](
        x, w, y, rstd, x, y, n, n, n, m, n, EPS, BLOCK_N=rms.pow2(n), ROWS=rows, ADD=False, num_warps=warps
    )
    return y, rstd


def bwd(dy, x, w, rstd, rows: int, warps: int, per_sm: int, step_f32: bool | None = None):
    m, n = x.shape
    dx = torch.empty_like(x)
    progs = max(1, min(rms.cdiv(m, rows), per_sm * rms.sms_for(x)))
    part = torch.empty(progs, n, dtype=torch.float64, device=x.device)
    rms._bwd_kernel[(progs,)](
        dy, dy, dy, x, w, rstd, dx, part, dx, dx, n, n, n, n, n, n, n, m, n, rms.cdiv(m, progs),
        BLOCK_N=rms.pow2(n), ROWS=rows, STORE_Y=False, N_DY=1, ADD_DX=False,
        DW_STEP_F32=rms.dw_step_f32(x, [dy], w) if step_f32 is None else step_f32, num_warps=warps,
    )  # fmt: skip
    return dx, rms.dw_sum(part, w.dtype, wrap=False)


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    ulp = torch.finfo(b.dtype).eps * b.float().abs().max().item()
    return (a.float() - b.float()).abs().max().item() <= ulp


def table(shape: str, dev: str, time_ms, smoke: bool) -> dict:
    """One shape's row: HF compiled's time, then each launch shape's forward and backward."""
    m, n = map(int, shape.split("x"))
    torch.manual_seed(0)
    x = torch.randn(m, n, device=dev, dtype=torch.bfloat16)
    w = 1 + 0.1 * torch.randn(n, device=dev, dtype=torch.bfloat16)
    dy = torch.randn_like(x)
    block, rows0, warps0 = rms._tiles(n)
    _, bwd_rows0, bwd_warps0, per_sm0 = rms._bwd_tiles(n)
    row = {"shape": shape, "default": {"fwd": [rows0, warps0], "bwd": [bwd_rows0, bwd_warps0, per_sm0]}}
    if not smoke:
        # dynamic=False: each shape its own static kernels, not a symbolic row count from an earlier shape's
        hf = torch.compile(LlamaRMSNorm(n, eps=EPS).to(dev, torch.bfloat16), dynamic=False)
        hf.weight.data.copy_(w)
        xg = x.clone().requires_grad_()
        row["hf_compiled_us"] = 1e3 * time_ms(lambda: torch.autograd.grad(hf(xg), (xg, hf.weight), dy))
    y0, rstd = fwd(x, w, rows0, warps0)
    dx0, dw0 = bwd(dy, x, w, rstd, bwd_rows0, bwd_warps0, per_sm0)
    row["fwd_us"], row["bwd_us"] = {}, {}
    for rows in dict.fromkeys((rows0, 1, 2, 4, 8, 16, 32, 64)):  # past 16: short rows alone
        warp_counts = [w for w in dict.fromkeys((warps0, 1, 2, 4, 8, 16)) if 32 * w <= rows * block <= 16384]
        # The interpreter ignores num_warps: in a smoke run one warp count a row count covers every launch.
        for warps in warp_counts[:1] if smoke else warp_counts:
            assert close(fwd(x, w, rows, warps)[0], y0), (shape, rows, warps)
            row["fwd_us"][f"r{rows}w{warps}"] = 1e3 * time_ms(partial(fwd, x, w, rows, warps))
            # 32 programs an SM only for short rows, whose one-warp programs leave the SM room for them
            per_sms = (per_sm0, 1, 2, 3, 4, 8, 16) + ((32,) if block <= 256 else ())
            for per_sm in dict.fromkeys(per_sms) if rows * block <= 8192 else ():
                for f32 in (True, False):  # dw's step sums in fp32 (the op's choice for bf16) or fp64
                    dx, dw = bwd(dy, x, w, rstd, rows, warps, per_sm, f32)
                    assert close(dx, dx0) and close(dw, dw0), (shape, rows, warps, per_sm, f32)
                    key = f"r{rows}w{warps}k{per_sm}" + ("" if f32 else "d")
                    row["bwd_us"][key] = 1e3 * time_ms(partial(bwd, dy, x, w, rstd, rows, warps, per_sm, f32))
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="8192x896,8192x2048,8192x4096,131072x128")
    p.add_argument("--out", default="bench/out")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args()
    dev = "cpu" if args.smoke else "cuda"
    shapes = ["33x96", "40x256"] if args.smoke else args.shapes.split(",")

    def time_ms(fn) -> float:  # nan where nothing is timed (smoke) or the profiler saw no kernel
        return float("nan") if args.smoke else kernel_ms(fn, calls=20) or float("nan")

    out = {"meta": env_info(dev), "shapes": []}
    lines = [meta_header(out["meta"]), ""]
    for shape in shapes:
        row = table(shape, dev, time_ms, args.smoke)
        out["shapes"].append(row)
        (rows0, warps0), (bwd_rows0, bwd_warps0, per_sm0) = row["default"]["fwd"], row["default"]["bwd"]
        f0 = row["fwd_us"][f"r{rows0}w{warps0}"]
        b0 = row["bwd_us"].get(f"r{bwd_rows0}w{bwd_warps0}k{per_sm0}", float("nan"))
        best_f = sorted(row["fwd_us"].items(), key=lambda kv: kv[1])[:3]
        best_b = sorted(row["bwd_us"].items(), key=lambda kv: kv[1])[:3]
        text = (
            f"- {shape}: HF compiled fwd+bwd {row.get('hf_compiled_us', float('nan')):.1f} us; default fwd "
            f"{f0:.1f} + bwd {b0:.1f} us; best fwd {best_f}; best bwd {best_b}"
        )
        lines.append(text)
        print(text, flush=True)
    write_lines("rms_kernels" + ("_smoke" if args.smoke else ""), out, lines, args.out)


if __name__ == "__main__":
    main()
