"""(Runs at 2cd4003.) What the fp32 label sums cost the one pass, by how p's label columns reach their GEMM:
``rows_fwd_bwd`` (bf16, dh and dW, Zipf labels) with the columns captured by the tile forward, gathered from p
after the settle kernel (``slot_columns`` + index_select: the tiles given no slot map, as on the pointer
path) and without label sums at all (dW's label rows then wrong; timing only), medians of
``triton.testing.do_bench`` in one process; then dW's largest difference between the first two forms (the
same fp32 sums: expect 0) and the call's peak above its inputs."""

import functools
import importlib

import torch
from triton.testing import do_bench

rows = importlib.import_module("chronipatch.ops._lce_rows")
real_tiles, real_sums, real_cols = rows.tiles_fwd, rows.label_sums, rows.slot_columns


def uncaptured(*args):
    return real_tiles(*args[:8])  # no slot map: the tiles store p alone


def form(name: str) -> None:
    rows.tiles_fwd = real_tiles if name == "captured" else uncaptured
    rows.label_sums = real_sums if name != "without" else (lambda *a: None)
    rows.slot_columns = real_cols if name != "without" else (lambda order, v: order[0][:0])


for n, h, v in ((8192, 896, 151936), (32768, 896, 151936), (8192, 2048, 128256), (8192, 4096, 128256)):
    g = torch.Generator(device="cuda").manual_seed(0)
    hid = torch.randn(n, h, device="cuda", generator=g).bfloat16()
    w = (torch.randn(v, h, device="cuda", generator=g) * 0.02).bfloat16()
    zipf = 1.0 / torch.arange(1, v + 1, device="cuda", dtype=torch.float32)
    y = torch.multinomial(zipf, n, replacement=True, generator=g)
    div = torch.tensor(float(n), device="cuda")
    call = functools.partial(rows.rows_fwd_bwd, hid, w, y, -100, False, div, True, True)
    out, dws = {}, {}
    for name in ("captured", "gathered", "without", "captured again"):
        form(name.split()[0])
        out[name] = do_bench(call, warmup=25, rep=200, return_mode="median")
        if name in ("captured", "gathered"):
            dws[name] = call()[-1].float()
    form("captured")
    diff = (dws["captured"] - dws["gathered"]).abs().max().item()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    call()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    times = ", ".join(f"{k} {t:.3f} ms" for k, t in out.items())
    print(
        f"{n}x{h} V={v} ({y.unique().numel()} labels): {times}; dW max diff {diff:.3g}; peak {peak:.0f} MiB",
        flush=True,
    )
