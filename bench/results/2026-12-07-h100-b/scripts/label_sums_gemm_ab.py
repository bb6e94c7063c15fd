"""(Runs at 24969de.) The label sums' GEMM over the captured label columns: ``rows_fwd_bwd`` (bf16, dh and
dW, Zipf labels) with ``label_sums`` as landed (a Triton GEMM over the D distinct labels' slots, programs past
D returning), as 2cd4003 had it (an fp32-output cuBLAS GEMM over all N slots) and skipped (dW's label rows
then wrong; timing only), medians of ``triton.testing.do_bench``, one process, each form twice in turn; then
dW's largest difference between the first two forms in bf16 steps of dW's largest entry."""

import functools
import importlib

import torch
from triton.testing import do_bench

from chronipatch.ops._utils import addmm_acc

rows = importlib.import_module("chronipatch.ops._lce_rows")
forms = {
    "triton": rows.label_sums,
    "cublas": lambda sums, lp, h_r, count: addmm_acc(sums, lp, h_r),
    "without": lambda *a: None,
}

for n, h, v in ((8192, 896, 151936), (32768, 896, 151936), (8192, 2048, 128256), (8192, 4096, 128256)):
    g = torch.Generator(device="cuda").manual_seed(0)
    hid = torch.randn(n, h, device="cuda", generator=g).bfloat16()
    w = (torch.randn(v, h, device="cuda", generator=g) * 0.02).bfloat16()
    zipf = 1.0 / torch.arange(1, v + 1, device="cuda", dtype=torch.float32)
    y = torch.multinomial(zipf, n, replacement=True, generator=g)
    div = torch.tensor(float(n), device="cuda")
    call = functools.partial(rows.rows_fwd_bwd, hid, w, y, -100, False, div, True, True)
    out, dws = {}, {}
    for name in ("triton", "cublas", "without", "triton", "cublas", "without"):
        rows.label_sums = forms[name]
        t = do_bench(call, warmup=25, rep=200, return_mode="median")
        out.setdefault(name, []).append(f"{t:.3f}")
        if name != "without" and name not in dws:
            dws[name] = call()[-1].float()
    rows.label_sums = forms["triton"]
    step = dws["cublas"].abs().max() * 2.0**-8
    diff = ((dws["triton"] - dws["cublas"]).abs().max() / step).item()
    times = "; ".join(f"{k} {', '.join(t)} ms" for k, t in out.items())
    print(f"{n}x{h} V={v} ({y.unique().numel()} labels): {times}; dW max diff {diff:.3g} steps", flush=True)
