# ruff: noqa: B023, SIM115  (as run on the GPU: closures run within their loop iteration)
"""The loss (eager, label check prefetched) with the label sums by pointers and one group of references (the
form before) against TMA label sums and grouped references, in alternating rounds: do_bench medians, ms; the
gradients of the two equal bit for bit?"""

import importlib
import sys

import torch
from triton.testing import do_bench

from chronipatch import ops

rows = importlib.import_module("chronipatch.ops._lce_rows")
tiles = importlib.import_module("chronipatch.ops._lce_tiles")
lr = importlib.import_module("chronipatch.ops._lce_label_rows")
dev = "cuda"


def best_tile(log):
    """The TMA tile of the least total time in label_sums_tma_ab.py's log (every shape and count)."""
    import collections
    import re

    tot = collections.Counter()
    for line in open(log):
        m = re.search(r"TMA \(([\d, ]+)\): ([\d.]+) ms", line)
        if m:
            tot[tuple(int(x) for x in m.group(1).split(","))] += float(m.group(2))
    return min(tot, key=tot.get) if tot else lr.SUMS_TILE


new_tile = best_tile(sys.argv[1]) if len(sys.argv) > 1 else lr.SUMS_TILE
print("new tile", new_tile, flush=True)
old_tile = (128, 128, 64, 8, 4)


def setup(new):
    # TMA_LOADS also steers the tiles: the form before is reached by sending label_sums alone to pointers.
    lr._tma = tiles._tma if new else (lambda a, b: False)
    lr.SUMS_TILE = new_tile if new else old_tile
    rows.REF_PER_SM = 4 if new else 0


for n, h, v in [(8192, 896, 151936), (8192, 2048, 128256), (8192, 4096, 128256)]:
    g = torch.Generator(device=dev).manual_seed(0)
    hid = torch.randn(n, h, device=dev, generator=g).bfloat16().requires_grad_()
    w = (torch.randn(v, h, device=dev, generator=g) * h**-0.5).bfloat16().requires_grad_()
    y = torch.randint(0, v, (n,), device=dev, generator=g)
    check = ops.prefetch_label_check(y, v, -100, shift=False)

    def step():
        hid.grad = w.grad = None
        ops.linear_cross_entropy(hid, w, y, shift=False, label_check=check).backward()

    grads = {}
    for new in (False, True):
        setup(new)
        step()
        grads[new] = hid.grad.clone(), w.grad.clone()
    same = all(torch.equal(a, b) for a, b in zip(grads[False], grads[True]))
    dw = (grads[False][1].float() - grads[True][1].float()).abs().max().item()
    times = {False: [], True: []}
    for _ in range(3):
        for new in (False, True):
            setup(new)
            times[new].append(do_bench(step, warmup=5, rep=40, return_mode="median"))
    print(
        f"{n}x{h} V={v}: before {sorted(times[False])} after {sorted(times[True])} (tile {new_tile}); "
        f"grads equal {same}, max|ddW| {dw:.2e}",
        flush=True,
    )
