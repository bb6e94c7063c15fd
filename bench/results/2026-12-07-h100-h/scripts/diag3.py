# ruff: noqa: B023, E501, F821, RUF005  (as run on the GPU, but for this line, the import order and the formatting)
"""(clock run: 8192 x 896 only, rep 1000 ms, each form's wall window printed for the nvidia-smi log) Where the one pass's tile forward spends the 0.64 ms of storing p: the statistics-only forward at its 4
pipeline stages and at the p-storing kernel's 3, and on 66 and 99 of the SMs (a shared-resource bound
runs them at less than 2x and 1.33x); p stored (no capture) to its place and, as a stand-in for
the write traffic, every tile to one [BM, BN] box; p with the label capture (landed). Three interleaved
rounds of do_bench medians (L2 flushed), ms."""

import importlib
import os
import sys
import time

import torch
from triton.testing import do_bench

sys.path.insert(0, "abl")
import tiles_var

rows_mod = importlib.import_module("chronipatch.ops._lce_rows")
tiles = importlib.import_module("chronipatch.ops._lce_tiles")
DRY = os.environ.get("DRY") == "1"
dev = "cpu" if DRY else "cuda"
if DRY:
    do_bench = lambda fn, **k: (fn(), 0.0)[1]
else:
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)

TILE = tiles.TILE


def now():
    t = time.time()
    return time.strftime("%H:%M:%S", time.localtime(t)) + f"{t % 1:.3f}"[1:]


def stats(stages):
    def run():
        tiles.TILE = TILE[:4] + (stages,) + TILE[5:]
        try:
            tiles.tiles_fwd(h, w, y, -100, False)
        finally:
            tiles.TILE = TILE

    return run


def progs(k):
    def run():
        old = tiles.sms_for
        tiles.sms_for = lambda t: k
        try:
            tiles.tiles_fwd(h, w, y, -100, False)
        finally:
            tiles.sms_for = old

    return run


def var(same, cap):
    def run():
        tiles_var.SAME_P = same
        try:
            tiles_var.tiles_fwd(h, w, y, -100, False, noop, p_rows, prep.ref, prep.slots if cap else None)
        finally:
            tiles_var.SAME_P = False

    return run


for n, hd, v in [(300, 64, 1000)] if DRY else [(8192, 896, 151936)]:
    g = torch.Generator(device=dev).manual_seed(0)
    h = torch.randn(n, hd, device=dev, generator=g).bfloat16()
    w = (torch.randn(v, hd, device=dev, generator=g) * hd**-0.5).bfloat16()
    y = torch.randint(0, v, (n,), device=dev, generator=g)
    y[::7] = -100
    prep = rows_mod.rows_prep(h, w, y, -100, True)
    p_rows = rows_mod.P_BYTES // (2 * v)
    noop = lambda *a: None
    forms = {
        "stats, 4 stages (landed)": stats(4),
        "stats, 3 stages": stats(3),
        "stats, 66 programs": progs(66),
        "stats, 99 programs": progs(99),
        "p, no capture": var(False, False),
        "p to one box, no capture": var(True, False),
        "p + capture (landed form)": var(False, True),
        "cuBLAS h W^T, bf16 out": lambda: torch.mm(h, w.T),
        "p + capture, landed module": lambda: tiles.tiles_fwd(
            h, w, y, -100, False, noop, p_rows, prep.ref, prep.slots
        ),
    }
    res = {k: [] for k in forms}
    for _ in range(3):
        for k, fn in forms.items():
            t0 = now()
            res[k].append(do_bench(fn, warmup=20, rep=1000, return_mode="median"))
            print(f"window {k}: {t0} .. {now()}", flush=True)
    for k, ts in res.items():
        print(
            f"{n}x{hd}: {k:28s} " + " ".join(f"{t:.3f}" for t in ts) + f"  median {sorted(ts)[1]:.3f}",
            flush=True,
        )
    del h, w, prep
    if not DRY:
        torch.cuda.empty_cache()
