# ruff: noqa: B023, E402, E501, F821  (as run on the GPU: closures run within their loop iteration; names deleted at its end)
"""The tile forward and the op by where the tiles read the rows' references and labels: after the GEMM (the
kernel before, kept as abl/tiles_var.py) or at the tile's start (the source now: the pipelined loop issues
them with the tile's first operand loads).
Part A: the tile forward alone five ways (statistics only; storing p, before and now; p with the label
capture, before and now), bit-for-bit checks of before against now.
Part B: the whole op (label check prefetched), before and now, by P_BYTES 512 / 600 MiB, gradients checked
bit for bit. Three interleaved rounds of do_bench medians, ms."""

import importlib
import sys

import torch
from triton.testing import do_bench

sys.path.insert(0, "abl")
import tiles_var

from chronipatch import ops

rows_mod = importlib.import_module("chronipatch.ops._lce_rows")
tiles = importlib.import_module("chronipatch.ops._lce_tiles")
landed_fwd = rows_mod.tiles_fwd
aligned = tiles.row_aligned
import os

DRY = os.environ.get("DRY") == "1"
dev = "cpu" if DRY else "cuda"
if DRY:
    do_bench = lambda fn, **k: (fn(), 0.0)[1]
else:
    print(torch.cuda.get_device_name(), flush=True)


old_fwd = tiles_var.tiles_fwd


for n, hd, v in [(300, 64, 1000)] if DRY else [(8192, 896, 151936), (8192, 4096, 128256)]:
    g = torch.Generator(device=dev).manual_seed(0)
    h = torch.randn(n, hd, device=dev, generator=g).bfloat16()
    w = (torch.randn(v, hd, device=dev, generator=g) * hd**-0.5).bfloat16()
    y = torch.randint(0, v, (n,), device=dev, generator=g)
    y[::7] = -100
    prep = rows_mod.rows_prep(h, w, y, -100, True)
    p_rows = rows_mod.P_BYTES // (2 * v)
    noop = lambda *a: None

    # bit-for-bit: every chunk's p, rp, lp and the outputs, landed against preloaded
    def zeroed(rows, cols, dtype, device):  # LP's unwritten entries compare equal
        return torch.zeros(rows, (cols + 7) // 8 * 8, dtype=dtype, device=device)[:, :cols]

    def grab(fwd):
        got = []
        tiles.row_aligned = tiles_var.row_aligned = zeroed
        out = fwd(
            h,
            w,
            y,
            -100,
            False,
            lambda r0, p, rp, bn, m, s, z, lp: got.append((p.clone(), rp.clone(), lp.clone())),
            p_rows,
            prep.ref,
            prep.slots,
        )
        tiles.row_aligned = tiles_var.row_aligned = aligned
        return got, out

    ga, oa = grab(landed_fwd)
    gb, ob = grab(old_fwd)
    same = [torch.equal(a, b) for ca, cb in zip(ga, gb) for a, b in zip(ca, cb)]
    same += [torch.equal(a, b) for a, b in zip(oa, ob) if a.numel()]
    print(f"{n}x{hd}: p, rp, lp and outputs of before and now equal: {all(same)} {same}", flush=True)
    del ga, gb

    forms = {
        "stats": lambda: tiles.tiles_fwd(h, w, y, -100, False),
        "p before": lambda: old_fwd(h, w, y, -100, False, noop, p_rows, prep.ref, None),
        "p now": lambda: landed_fwd(h, w, y, -100, False, noop, p_rows, prep.ref, None),
        "p+cap before": lambda: old_fwd(h, w, y, -100, False, noop, p_rows, prep.ref, prep.slots),
        "p+cap now": lambda: landed_fwd(h, w, y, -100, False, noop, p_rows, prep.ref, prep.slots),
    }
    res = {k: [] for k in forms}
    for _ in range(3):
        for k, fn in forms.items():
            res[k].append(do_bench(fn, warmup=20, rep=250, return_mode="median"))
    for k, ts in res.items():
        print(
            f"{n}x{hd}: tile fwd {k:13s} "
            + " ".join(f"{t:.3f}" for t in ts)
            + f"  median {sorted(ts)[1]:.3f}",
            flush=True,
        )

    hid = h.clone().requires_grad_()
    wt = w.clone().requires_grad_()
    check = ops.prefetch_label_check(y, v, -100, shift=False)

    def step():
        hid.grad = wt.grad = None
        ops.linear_cross_entropy(hid, wt, y, shift=False, label_check=check).backward()

    def setup(pre, mib):
        rows_mod.tiles_fwd = landed_fwd if pre else old_fwd
        rows_mod.P_BYTES = mib << 20

    grads = {}
    for pre in (False, True):
        setup(pre, 512)
        step()
        grads[pre] = (hid.grad.clone(), wt.grad.clone())
    print(
        f"{n}x{hd}: op gradients of before and now equal: {all(torch.equal(a, b) for a, b in zip(grads[False], grads[True]))}",
        flush=True,
    )
    del grads
    res = {}
    for _ in range(3):
        for pre in (False, True):
            for mib in (512, 600):
                setup(pre, mib)
                res.setdefault((pre, mib), []).append(
                    do_bench(step, warmup=30, rep=400, return_mode="median")
                )
    setup(False, 512)
    for (pre, mib), ts in res.items():
        name = f"{'now' if pre else 'before'} {mib} MiB"
        print(
            f"{n}x{hd}: op {name:15s} " + " ".join(f"{t:.3f}" for t in ts) + f"  median {sorted(ts)[1]:.3f}",
            flush=True,
        )
    del hid, wt, h, w, prep
    if not DRY:
        torch.cuda.empty_cache()
