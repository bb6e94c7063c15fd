"""Where RMSNorm's eager backward spends GPU time past its two kernels; what summing dw's partials costs.

    python bench/rms_dw_sum.py [--out DIR] [--smoke]

Per shape, bf16: the kernels one eager fwd + bwd launches and one compiled fwd + bwd launches (profiler, top
kernels, GPU time per call), then the sum of the backward's fp64 partial rows of dw and its cast to the
weight's dtype, as torch's ``sum(0).to()`` and as the op's ``dw_sum`` (its Triton kernel took the place of
torch's) by (rows per step, columns per program), results checked within one bf16 ulp of the
largest sum. ``--smoke`` runs the Triton kernel through the interpreter on CPU (no timings).
"""

from __future__ import annotations

import importlib
import os
import sys

if "--smoke" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"

import torch

from common import env_info, gpu_time_breakdown, kernel_ms, meta_header, smoke_args, write_lines

rms = importlib.import_module("chronipatch.ops.rms_norm")
ops = importlib.import_module("chronipatch.ops")


def shape_row(m: int, n: int, dev: str, smoke: bool) -> dict:
    torch.manual_seed(0)
    x = torch.randn(m, n, device=dev, dtype=torch.bfloat16, requires_grad=True)
    w = (1 + 0.1 * torch.randn(n, device=dev, dtype=torch.bfloat16)).requires_grad_()
    dy = torch.randn_like(x)
    row = {"shape": f"{m}x{n}"}
    if not smoke:
        compiled = torch.compile(ops.rms_norm, dynamic=False)
        for name, f in (("eager", ops.rms_norm), ("compiled", compiled)):

            def step(f=f):
                return torch.autograd.grad(f(x, w, 1e-6), (x, w), dy)

            step()
            prof = gpu_time_breakdown(step, calls=10)
            row[name] = {"gpu_busy_ms": prof["gpu_busy_ms"], "top": prof["top_kernels_ms"]}
    progs = rms._bwd_tiles(n)[3] * rms.sms_for(x)
    part = torch.randn(progs, n, device=dev, dtype=torch.float64)
    ref = part.sum(0).to(torch.bfloat16)
    row["progs"], row["sum_us"] = progs, {}
    if not smoke:
        row["sum_us"]["torch"] = 1e3 * kernel_ms(lambda: part.sum(0).to(torch.bfloat16), calls=20)
    for br in (16, 32, 64, 128):
        for bc in (4, 8, 16, 32, 64):
            got = rms.dw_sum(part, torch.bfloat16, wrap=False, tiles=(br, bc))
            # within one bf16 ulp of the largest sum (fp64 sums in another order may round apart)
            ulp = torch.finfo(torch.bfloat16).eps * ref.float().abs().max().item()
            assert (got.float() - ref.float()).abs().max().item() <= ulp, (m, n, br, bc)
            if not smoke:
                t = kernel_ms(
                    lambda t=(br, bc): rms.dw_sum(part, torch.bfloat16, wrap=False, tiles=t), calls=20
                )
                row["sum_us"][f"r{br}c{bc}"] = 1e3 * t
    return row


def main() -> None:
    args, dev = smoke_args(__doc__)
    shapes = [(40, 96), (8, 300)] if args.smoke else [(8192, 896), (8192, 2048), (8192, 4096), (131072, 128)]
    out = {"meta": env_info(dev), "shapes": []}
    lines = [meta_header(out["meta"]), ""]
    for m, n in shapes:
        row = shape_row(m, n, dev, args.smoke)
        out["shapes"].append(row)
        best = sorted(row["sum_us"].items(), key=lambda kv: kv[1])[:4]
        torch_us = row["sum_us"].get("torch", float("nan"))
        text = f"- {m}x{n}: partial rows {row['progs']}; torch sum+cast {torch_us:.1f} us; best {best}"
        for name in ("eager", "compiled"):
            if name in row:
                kern = "; ".join(f"{k['kernel'][:60]} {1e3 * k['ms']:.1f}" for k in row[name]["top"])
                text += f"\n  - {name} {1e3 * row[name]['gpu_busy_ms']:.1f} us: {kern}"
        lines.append(text)
        print(text, flush=True)
    write_lines("rms_dw_sum" + ("_smoke" if args.smoke else ""), out, lines, args.out)


if __name__ == "__main__":
    main()
