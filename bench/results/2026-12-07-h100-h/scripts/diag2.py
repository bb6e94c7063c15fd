# ruff: noqa: F821  (as run on the GPU, but for this line, the import order and the formatting)
"""The one pass's tile forward (storing p, capturing the label columns) with p leaving by TMA in 1, 2 or 4
column subtiles: triton then stages them through one [BM, BN / k] buffer of shared memory (a store waits for
the one before it), which frees 32 or 48 KiB, enough for a fourth pipeline stage with 4 subtiles. p, the tile
references and the captured columns checked bit for bit against the landed kernel. Three interleaved rounds
of do_bench medians (L2 flushed), ms."""

import importlib
import os
import sys

import torch
from triton.testing import do_bench

sys.path.insert(0, "abl")
import tiles_var

rows_mod = importlib.import_module("chronipatch.ops._lce_rows")
tiles = importlib.import_module("chronipatch.ops._lce_tiles")
aligned = tiles.row_aligned
DRY = os.environ.get("DRY") == "1"
dev = "cpu" if DRY else "cuda"
if DRY:
    do_bench = lambda fn, **k: (fn(), 0.0)[1]
else:
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)


def var(sub, stages):
    def run(cb=None):
        tiles_var.SUB_P, tiles_var.P_STAGES = sub, stages
        try:
            return tiles_var.tiles_fwd(h, w, y, -100, False, cb or noop, p_rows, prep.ref, prep.slots)
        finally:
            tiles_var.SUB_P, tiles_var.P_STAGES = 1, 3

    return run


def landed(cb=None):
    return tiles.tiles_fwd(h, w, y, -100, False, cb or noop, p_rows, prep.ref, prep.slots)


def zeroed(rows, cols, dtype, device):  # LP's unwritten entries compare equal
    return torch.zeros(rows, (cols + 7) // 8 * 8, dtype=dtype, device=device)[:, :cols]


def grab(fwd):
    got = []
    tiles.row_aligned = tiles_var.row_aligned = zeroed
    try:
        out = fwd(lambda r0, p, rp, bn, m, s, z, lp: got.append((p.clone(), rp.clone(), lp.clone())))
    finally:
        tiles.row_aligned = tiles_var.row_aligned = aligned
    return got, out


for n, hd, v in [(300, 64, 1000)] if DRY else [(8192, 896, 151936), (8192, 4096, 128256)]:
    g = torch.Generator(device=dev).manual_seed(0)
    h = torch.randn(n, hd, device=dev, generator=g).bfloat16()
    w = (torch.randn(v, hd, device=dev, generator=g) * hd**-0.5).bfloat16()
    y = torch.randint(0, v, (n,), device=dev, generator=g)
    y[::7] = -100
    prep = rows_mod.rows_prep(h, w, y, -100, True)
    p_rows = rows_mod.P_BYTES // (2 * v)
    noop = lambda *a: None
    forms = {
        "landed (1 store, 3 stages)": landed,
        "2 subtiles, 3 stages": var(2, 3),
        "4 subtiles, 3 stages": var(4, 3),
        "4 subtiles, 4 stages": var(4, 4),
    }
    ga, oa = grab(landed)
    for k, fn in list(forms.items())[1:]:
        try:
            gb, ob = grab(fn)
        except Exception as e:  # e.g. out of shared memory
            print(f"{n}x{hd}: {k}: {type(e).__name__}: {str(e)[:200]}", flush=True)
            del forms[k]
            continue
        same = [torch.equal(a, b) for ca, cb in zip(ga, gb) for a, b in zip(ca, cb)]
        same += [torch.equal(a, b) for a, b in zip(oa, ob) if a.numel()]
        print(f"{n}x{hd}: {k}: p, rp, lp and outputs equal to landed: {all(same)}", flush=True)
        del gb, ob
    del ga, oa
    res = {k: [] for k in forms}
    for _ in range(3):
        for k, fn in forms.items():
            res[k].append(do_bench(fn, warmup=20, rep=250, return_mode="median"))
    for k, ts in res.items():
        print(
            f"{n}x{hd}: {k:28s} " + " ".join(f"{t:.3f}" for t in ts) + f"  median {sorted(ts)[1]:.3f}",
            flush=True,
        )
    del h, w, prep
    if not DRY:
        torch.cuda.empty_cache()
