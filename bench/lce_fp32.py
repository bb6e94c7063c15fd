"""fp32 linear cross-entropy: what the fp64 backward GEMMs (``FAST_FP64`` GPUs) cost against fp32 ones.

Forward + backward of ``ops.linear_cross_entropy`` on fp32 hidden/weight, the backward GEMMs in fp64
(what such GPUs run) and in fp32 (forced), beside the stock fp32 head (``F.linear`` + ``cross_entropy``);
median ms (``common.timeit``), extra peak MiB, and each one's max error of dhidden against an fp64 run.

    python bench/lce_fp32.py [--shapes 8192x896x151936,4096x2048x128256] [--out bench/out]
"""

from __future__ import annotations

import argparse
import importlib

import torch
import torch.nn.functional as F

from chronipatch import ops
from common import env_info, markdown_table, peak_extra_bytes, timeit, write_results

# The module, not the function that chronipatch.ops exports under the same name.
lce = importlib.import_module("chronipatch.ops.linear_cross_entropy")

COLUMNS = ("shape", "impl", "ms", "extra MiB", "dhidden max err")


def _loss(impl: str):
    if impl == "stock":
        return lambda h, w, y: F.cross_entropy(F.linear(h, w).float(), y)
    return lambda h, w, y: ops.linear_cross_entropy(h, w, y, shift=False)


def run(shape: str) -> list[dict]:
    n, hd, v = (int(x) for x in shape.split("x"))
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(n, hd, device="cuda", generator=g)
    w = torch.randn(v, hd, device="cuda", generator=g) * hd**-0.5
    y = torch.randint(0, v, (n,), device="cuda", generator=g)
    h64 = h.double().requires_grad_()
    F.cross_entropy(F.linear(h64, w.double()), y).backward()  # fp64: the reference path of the op
    truth = h64.grad
    rows, wide = [], lce._wide
    for impl in ("chronipatch fp64 GEMMs", "chronipatch fp32 GEMMs", "stock"):
        lce._wide = wide if impl == "chronipatch fp64 GEMMs" else (lambda hidden: False)
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss = _loss(impl)

        def step(hh=hh, ww=ww, loss=loss):
            hh.grad = ww.grad = None
            loss(hh, ww, y).backward()

        step()
        err = (hh.grad.double() - truth).abs().max().item()
        extra = peak_extra_bytes(step)
        rows.append(
            {
                "shape": shape,
                "impl": impl,
                "ms": timeit(step),
                "extra MiB": extra / 2**20,
                "dhidden max err": err,
            }
        )
    lce._wide = wide
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="8192x896x151936,4096x2048x128256", help="comma list of NxHxV")
    p.add_argument("--out", default="bench/out")
    args = p.parse_args()
    rows = [r for shape in args.shapes.split(",") for r in run(shape)]
    meta = {**env_info("cuda"), "fast_fp64": lce._wide(torch.empty(1, device="cuda"))}
    write_results("lce_fp32", rows, meta, args.out, COLUMNS)
    print(markdown_table(rows, COLUMNS))


if __name__ == "__main__":
    main()
