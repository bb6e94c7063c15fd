# ruff: noqa: B023  (as run on the GPU: closures run within their loop iteration)
"""The rows' references (``row_references``) with the samples in groups (REF_PER_SM programs a multiprocessor)
against one group (REF_PER_SM = 0, the form before): do_bench medians, ms; K equal bit for bit?"""

import importlib

import torch
from triton.testing import do_bench

rows = importlib.import_module("chronipatch.ops._lce_rows")
dev = "cuda"
for n, h, v in [(8192, 896, 151936), (8192, 2048, 128256), (8192, 4096, 128256), (32768, 896, 151936)]:
    g = torch.Generator(device=dev).manual_seed(0)
    hid = torch.randn(n, h, device=dev, generator=g).bfloat16()
    w = (torch.randn(v, h, device=dev, generator=g) * h**-0.5).bfloat16()
    base = None
    for per_sm in (0, 2, 4, 8):
        rows.REF_PER_SM = per_sm
        k = rows.row_references(hid, w)
        base = k if base is None else base
        t = do_bench(lambda: rows.row_references(hid, w), warmup=10, rep=100, return_mode="median")
        print(f"{n}x{h} V={v} REF_PER_SM={per_sm}: {t:.4f} ms, equal {torch.equal(k, base)}", flush=True)
rows.REF_PER_SM = 4
