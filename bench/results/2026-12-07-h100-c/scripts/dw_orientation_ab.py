"""dW's chunk GEMM p^T (r h) at 8192 x 896, V = 151,936 (chunks of 1,664 rows): as `_lce_rows` calls it
(dw.addmm_(p.T, h_r), an [V, H] output whose H = 896 fills 3.5 tiles of 256) against the transposed problem
(dw.T.addmm_(h_r.T, p): the same product, [H, V] seen by cuBLAS); p W likewise. do_bench medians, ms."""

import torch
from triton.testing import do_bench

torch.manual_seed(0)
dev = "cuda"
v, h, k = 151936, 896, 1664
p = (torch.rand(k, v, device=dev) * 1e-4).bfloat16()
hr = torch.randn(k, h, device=dev).bfloat16()
w = (torch.randn(v, h, device=dev) * 0.03).bfloat16()
for name, fn in [
    ("dw.addmm_(p.T, h_r)", lambda d: d.addmm_(p.T, hr)),
    ("dw.T.addmm_(h_r.T, p)", lambda d: d.T.addmm_(hr.T, p)),
    ("torch.mm(p.T, h_r, out=dw)", lambda d: torch.mm(p.T, hr, out=d)),
    ("torch.mm(h_r.T, p, out=dw.T)", lambda d: torch.mm(hr.T, p, out=d.T)),
    ("p @ W (fp32 out)", lambda d: torch.mm(p, w, out_dtype=torch.float32)),
    ("(W.T @ p.T).T (fp32 out)", lambda d: torch.mm(w.T, p.T, out_dtype=torch.float32).T),
]:
    d = torch.zeros(v, h, device=dev, dtype=torch.bfloat16)
    try:
        ms = [do_bench(lambda fn=fn, d=d: fn(d), warmup=50, rep=300, return_mode="median") for _ in range(3)]
        print(f"{name:32s} " + " ".join(f"{m:.3f}" for m in ms), flush=True)
    except Exception as e:
        print(f"{name:32s} error {type(e).__name__}: {str(e)[:150]}", flush=True)
a = torch.zeros(v, h, device=dev, dtype=torch.bfloat16).addmm_(p.T, hr)
b = torch.zeros(v, h, device=dev, dtype=torch.bfloat16)
b.T.addmm_(hr.T, p)
print("max |a - b|", (a.float() - b.float()).abs().max().item(), "max |a|", a.float().abs().max().item())
