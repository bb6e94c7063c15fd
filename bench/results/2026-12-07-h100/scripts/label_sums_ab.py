"""What the fp32 label sums cost the one pass: ``rows_fwd_bwd`` (bf16, dh and dW) with ``label_sums`` as it is and
with it skipped (dW's label rows then wrong; timing only), medians of ``triton.testing.do_bench``, same process."""

import importlib

import torch
from triton.testing import do_bench

rows = importlib.import_module("chronipatch.ops._lce_rows")
real = rows.label_sums
for n, h, v in ((8192, 896, 151936), (8192, 2048, 128256), (8192, 4096, 128256)):
    g = torch.Generator(device="cuda").manual_seed(0)
    hid = torch.randn(n, h, device="cuda", generator=g).bfloat16()
    w = (torch.randn(v, h, device="cuda", generator=g) * 0.02).bfloat16()
    probs = (1.0 / torch.arange(1, v + 1, device="cuda", dtype=torch.float32)).expand(n, v)
    y = torch.multinomial(probs, 1, generator=g)[:, 0]
    div = torch.tensor(float(n), device="cuda")
    out = {}
    for name, fn in (("with", real), ("without", lambda *a: None), ("with again", real)):
        rows.label_sums = fn
        f = lambda: rows.rows_fwd_bwd(hid, w, y, -100, False, div, True, True)  # noqa: E731
        out[name] = do_bench(f, warmup=25, rep=200, return_mode="median")
    rows.label_sums = real
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    rows.rows_fwd_bwd(hid, w, y, -100, False, div, True, True)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    print(f"{n}x{h} V={v}: " + ", ".join(f"{k} {t:.3f} ms" for k, t in out.items()) + f"; peak {peak:.0f} MiB")
