# ruff: noqa: B023, E501, SIM115, RUF007  (as run on the GPU: closures run within their loop iteration)
"""The loss eager with the label check at the call against the prefetched check, 8192 x 896 and x 4096: do_bench
wall (median, L2 flushed), CUDA events back-to-back, kernel time by name and the GPU's idle gaps in one call's
timeline (torch.profiler), and the SM clock."""

import json
import os
import tempfile

import torch
from triton.testing import do_bench

from chronipatch import ops as cp

dev = "cuda"
SHAPES = [(8192, 896, 151936), (8192, 4096, 128256)]


def events_ms(fn, n=10):
    fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(n):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / n


def timeline(fn):
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
    path = os.path.join(tempfile.mkdtemp(), "t.json")
    prof.export_chrome_trace(path)
    ev = json.load(open(path))["traceEvents"]
    ks = sorted(
        (e for e in ev if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")), key=lambda e: e["ts"]
    )
    by = {}
    for e in ks:
        by[e["name"][:60]] = by.get(e["name"][:60], 0) + e["dur"] / 3
    third = ks[len(ks) * 2 // 3 :]  # the last call, about
    gaps = []
    for a, b in zip(third, third[1:]):
        gap = b["ts"] - (a["ts"] + a["dur"])
        if gap > 15:
            gaps.append(f"gap {gap:8.1f} us after {a['name'][:40]} before {b['name'][:40]}")
    span = third[-1]["ts"] + third[-1]["dur"] - third[0]["ts"]
    return by, gaps, span


for n, hd, v in SHAPES:
    g = torch.Generator(device=dev).manual_seed(0)
    h = torch.randn(n, hd, device=dev, generator=g).bfloat16().requires_grad_()
    w = (torch.randn(v, hd, device=dev, generator=g) * hd**-0.5).bfloat16().requires_grad_()
    y = torch.randint(0, v, (n,), device=dev, generator=g)
    check = cp.prefetch_label_check(y, v, -100, shift=False)
    variants = {
        "eager": lambda: cp.linear_cross_entropy(h, w, y, shift=False),
        "prefetched": lambda: cp.linear_cross_entropy(h, w, y, shift=False, label_check=check),
    }
    for name, loss in variants.items():

        def step(loss=loss):
            h.grad = w.grad = None
            loss().backward()

        step()
        clock = torch.cuda.clock_rate()
        wall = do_bench(step, warmup=10, rep=60, return_mode="median")
        ev = events_ms(step)
        by, gaps, span = timeline(step)
        tot = sum(by.values())
        print(
            f"== {n}x{hd} V={v} {name}: do_bench {wall:.3f} ms, events {ev:.3f}, kernels {tot / 1e3:.3f}, "
            f"last-call span {span / 1e3:.3f} ms, SM clock {clock} MHz",
            flush=True,
        )
        for k, us in sorted(by.items(), key=lambda kv: -kv[1])[:14]:
            print(f"   {us:9.1f} us  {k}")
        for line in gaps[:15]:
            print("  ", line)
