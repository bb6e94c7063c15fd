# ruff: noqa: B023  (each closure runs within its loop iteration)
"""dW's label-row kernels at the bench's shapes: ``set_label_rows`` now (one program per 16 sorted places)
against HEAD~'s (one per place; abl/old_label_rows.py), dW compared (== treats -0 and +0 alike); then
``label_sums`` over one chunk of p's rows in several tiles (BJ, BH, BR, warps, stages). Labels: uniform over
V with 10% ignored (bench/ops.py's), and Zipf-like (text: a few frequent tokens, long runs). do_bench
medians, ms."""

import importlib.util

import torch
from triton.testing import do_bench

from chronipatch.ops import _lce_label_rows as new
from chronipatch.ops._utils import cdiv

spec = importlib.util.spec_from_file_location("old_label_rows", "abl/old_label_rows.py")
old = importlib.util.module_from_spec(spec)
spec.loader.exec_module(old)
dev = "cuda"


def ms(fn):
    return do_bench(fn, warmup=25, rep=200, return_mode="median")


def make_labels(n, v, kind):
    g = torch.Generator(device=dev).manual_seed(0)
    if kind == "uniform":
        y = torch.randint(0, v, (n,), device=dev, generator=g)
    else:  # Zipf over ranks, exponent 1.1, ranks shuffled over the vocabulary
        ranks = torch.arange(1, v + 1, device=dev, dtype=torch.float64)
        probs = ranks**-1.1
        pick = torch.multinomial(probs / probs.sum(), n, True, generator=g)
        y = torch.randperm(v, device=dev, generator=g)[pick]
    y[torch.rand(n, device=dev, generator=g) < 0.1] = -100
    return y


for n, h, v, chunk in [(8192, 896, 151936, 1664), (8192, 2048, 128256, 2048), (8192, 4096, 128256, 2048)]:
    for kind in ("uniform", "zipf"):
        torch.manual_seed(0)
        y = make_labels(n, v, kind)
        order = new.label_order(y)
        d = int(order[2][-1]) + 1
        hid = torch.randn(n, h, device=dev).bfloat16()
        sums = torch.randn(n, h, device=dev)
        r = torch.rand(n, device=dev) * 1e-3
        g = -torch.rand(n, device=dev) * 1e-4
        q = (g / r).bfloat16().float()
        dw0 = (torch.randn(v, h, device=dev) * 1e-3).bfloat16()
        outs = {}
        for name, mod in (("old", old), ("new", new)):
            dw = dw0.clone()
            mod.set_label_rows(dw, sums, hid, order, r, g, q, -100)
            outs[name] = dw
            t = ms(lambda mod=mod, dw=dw: mod.set_label_rows(dw, sums, hid, order, r, g, q, -100))
            print(f"rows  {n}x{h} V{v} {kind:7s} distinct {d:5d} {name}: {t:.4f} ms", flush=True)
        same = bool((outs["old"] == outs["new"]).all())
        print(
            f"rows  {n}x{h} {kind}: dW new == old: {same}; max |diff| "
            f"{(outs['old'].float() - outs['new'].float()).abs().max().item():.3g}",
            flush=True,
        )
        # label sums over one chunk: lp [n slots, chunk rows] (the tiles' capture layout), h_r [chunk, h]
        lp = (torch.rand(n, chunk, device=dev) * 1e-2).bfloat16()
        h_r = torch.randn(chunk, h, device=dev).bfloat16()
        count = order[2][-1:] + 1
        ref = None
        for bj, bh, br, warps, stages in [
            (128, 128, 64, 8, 3),
            (128, 128, 64, 4, 3),
            (64, 128, 64, 4, 3),
            (128, 64, 64, 4, 3),
            (128, 128, 32, 8, 4),
            (128, 256, 64, 8, 3),
            (64, 256, 64, 4, 3),
            (128, 128, 64, 8, 4),
            (256, 128, 64, 8, 3),
            (64, 64, 64, 4, 4),
        ]:

            def run(s):
                new._label_sums_kernel[(cdiv(h, bh), cdiv(n, bj))](
                    s,
                    lp,
                    h_r,
                    count,
                    chunk,
                    h,
                    s.stride(0),
                    *lp.stride(),
                    h_r.stride(0),
                    BJ=bj,
                    BH=bh,
                    BR=br,
                    UPCAST=False,
                    num_warps=warps,
                    num_stages=stages,
                )

            try:
                s = torch.zeros(n, h, device=dev)
                run(s)
                err = 0.0 if ref is None else (s - ref).abs().max().item()
                ref = s if ref is None else ref
                t = ms(lambda: run(s))
                print(
                    f"sums  {n}x{h} chunk {chunk} {kind:7s} distinct {d:5d} "
                    f"{(bj, bh, br, warps, stages)}: {t:.4f} ms  max|diff vs first| {err:.3g}",
                    flush=True,
                )
            except Exception as e:
                cfg = (bj, bh, br, warps, stages)
                print(f"sums  {cfg}: error {type(e).__name__}: {str(e)[:200]}", flush=True)
        mm = ms(lambda: torch.mm(lp, h_r, out_dtype=torch.float32))
        print(f"sums  {n}x{h} cuBLAS over all {n} slots (fp32 out, no add): {mm:.4f} ms", flush=True)
