"""What the fp32 label sums cost the one pass: ``rows_fwd_bwd`` (bf16, dh and dW) with ``label_sums`` as it
is and with it skipped (dW's label rows then wrong; timing only), medians of ``triton.testing.do_bench``,
one process; then the call's peak above its inputs (its outputs included). Its GEMM is [N, chunk] x [chunk, H]
a chunk, 2 N^2 H in all (a label per row, repeats included): 32,768 rows show how that grows."""

import functools
import importlib

import torch
from triton.testing import do_bench

rows = importlib.import_module("chronipatch.ops._lce_rows")
real = rows.label_sums


def skipped(*args) -> None:
    return None


for n, h, v in ((8192, 896, 151936), (32768, 896, 151936), (8192, 2048, 128256), (8192, 4096, 128256)):
    g = torch.Generator(device="cuda").manual_seed(0)
    hid = torch.randn(n, h, device="cuda", generator=g).bfloat16()
    w = (torch.randn(v, h, device="cuda", generator=g) * 0.02).bfloat16()
    probs = (1.0 / torch.arange(1, v + 1, device="cuda", dtype=torch.float32)).expand(n, v)
    y = torch.multinomial(probs, 1, generator=g)[:, 0]
    div = torch.tensor(float(n), device="cuda")
    call = functools.partial(rows.rows_fwd_bwd, hid, w, y, -100, False, div, True, True)
    out = {}
    for name, fn in (("with", real), ("without", skipped), ("with again", real)):
        rows.label_sums = fn
        out[name] = do_bench(call, warmup=25, rep=200, return_mode="median")
    rows.label_sums = real
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    call()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    times = ", ".join(f"{k} {t:.3f} ms" for k, t in out.items())
    print(f"{n}x{h} V={v} ({y.unique().numel()} labels): {times}; peak {peak:.0f} MiB", flush=True)
