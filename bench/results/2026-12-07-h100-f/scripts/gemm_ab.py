# ruff: noqa: B023, E402, E501, F821  (as run on the GPU: closures run within their loop iteration)
"""The one pass's two cuBLAS GEMMs per chunk of p at 8192 x 896 (V = 151,936) by chunk rows and form, and the
op's kernels by P_BYTES: where does dW's GEMM lose to p W's (656 against 780 TFLOP/s)?"""

import importlib

import torch
from triton.testing import do_bench

from chronipatch import ops
from chronipatch.ops._utils import mm_f32

rows_mod = importlib.import_module("chronipatch.ops._lce_rows")
dev = "cuda"
v, h = 151936, 896
g = torch.Generator(device=dev).manual_seed(0)
w = (torch.randn(v, h, device=dev, generator=g) * h**-0.5).bfloat16()
dw = torch.empty(v, h, device=dev, dtype=torch.bfloat16)
dwt = torch.empty(h, v, device=dev, dtype=torch.bfloat16)


def tf(ms, rows):
    return 2 * v * h * rows / ms / 1e9


for rows in (1664, 2048, 8192):
    p = torch.rand(rows, v, device=dev, generator=g).bfloat16()
    hr = (torch.randn(rows, h, device=dev, generator=g) * 0.01).bfloat16()
    for lib in ("cublas", "cublaslt"):
        torch.backends.cuda.preferred_blas_library(lib)
        cases = {
            "dW bz": lambda: torch.mm(p.T, hr, out=dw),
            "dW badd": lambda: dw.addmm_(p.T, hr),
            "dWT bz": lambda: torch.mm(hr.T, p, out=dwt),
            "dWT badd": lambda: dwt.addmm_(hr.T, p),
            "pW f32": lambda: mm_f32(p, w),
            "pW bf16": lambda: torch.mm(p, w),
        }
        for name, fn in cases.items():
            try:
                t = do_bench(fn, warmup=10, rep=60, return_mode="median")
                print(f"rows {rows} {lib:8s} {name:9s}: {t:.4f} ms  {tf(t, rows):.0f} TFLOP/s", flush=True)
            except Exception as e:
                print(f"rows {rows} {lib} {name}: error {type(e).__name__}: {str(e)[:120]}", flush=True)
    del p, hr
torch.backends.cuda.preferred_blas_library("cublas")

# the op at three chunk sizes: kernels by profiler (3 calls), do_bench and peak
n = 8192
hid = torch.randn(n, h, device=dev, generator=g).bfloat16().requires_grad_()
wq = w.clone().requires_grad_()
y = torch.randint(0, v, (n,), device=dev, generator=g)
check = ops.prefetch_label_check(y, v, -100, shift=False)


def step():
    hid.grad = wq.grad = None
    ops.linear_cross_entropy(hid, wq, y, shift=False, label_check=check).backward()


from torch.profiler import ProfilerActivity, profile

for rnd in range(1):
    for pb in (512 << 20, 600 << 20, 1 << 30):
        rows_mod.P_BYTES = pb
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        t = do_bench(step, warmup=25, rep=150, return_mode="median")
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                step()
            torch.cuda.synchronize()
        k = (
            sum(e.device_time_total for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
            / 3e3
        )
        print(
            f"round {rnd} P_BYTES {pb >> 20} MiB: do_bench {t:.3f} ms, kernels {k:.3f} ms, peak {peak:.1f} MiB",
            flush=True,
        )
rows_mod.P_BYTES = 512 << 20
