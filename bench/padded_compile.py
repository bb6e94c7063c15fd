"""Masked SDPA in padded batches under ``torch.compile`` (dynamic T): does each new padded length cost a
cuDNN plan, and does padding T to a bucket inside the graph stop it?

A compiled graph keeps the kernel SDPA chose when it was traced, and with dynamic shapes one graph sees every
T. Rows: transformers' ``sdpa_attention_forward`` compiled as it is (stock), and ``chronipatch.masked_sdpa``
compiled, which pads T to a multiple of ``BUCKET`` inside the graph where the trace finds cuDNN first (new
keys masked, new query rows see their own key). Columns: the first step (the
compile), then the median ms per step of ``--layers`` calls (forward + backward) over the batches of
``bench/padded_attention.py`` in three passes (every document 0, 1, 2 tokens longer: new T, same
buckets); ``out_diff``, max |out - stock's out| on one batch; the CUDA kernels of one step's attention.

    python bench/padded_compile.py [--out bench/out] [--layers 24] [--steps 8] [--smoke]

``--smoke`` runs tiny batches on the CPU, to keep the script working (no kernels column).
"""

from __future__ import annotations

import argparse
import statistics
import time
from types import SimpleNamespace

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from common import env_info, write_results
from padded_attention import HK, HQ, PASSES, D, batch, draw_lengths

COLUMNS = ("graph", "first step ms", *(f"pass {i + 1} ms" for i in range(PASSES)), "out_diff", "kernels")
MODULE = SimpleNamespace(is_causal=True, num_key_value_groups=HQ // HK, training=True)


def stock(q, k, v, mask):
    return sdpa_attention_forward(MODULE, q, k, v, mask, scaling=D**-0.5)[0]


def chronipatch(q, k, v, mask):
    from chronipatch.masked_sdpa import masked_sdpa

    return masked_sdpa(MODULE, q, k, v, mask, scaling=D**-0.5)[0]


def attention_kernels(fn, b) -> list:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn(*b).sum().backward()
        torch.cuda.synchronize()
    names = {e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA}
    keys = ("attn", "fmha", "cudnn", "flash", "sdpa", "efficient")
    return sorted(n[:80] for n in names if any(key in n.lower() for key in keys))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench/out")
    p.add_argument("--steps", type=int, default=8, help="batches per pass")
    p.add_argument("--layers", type=int, default=24, help="calls per batch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="tiny batches on the CPU")
    args = p.parse_args()
    rows_per_batch, median, cap = (2, 24, 100) if args.smoke else (8, 400, 2048)
    if args.smoke:
        args.steps, args.layers = 2, 2
    device = torch.device("cpu" if args.smoke else "cuda")
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    g = torch.Generator().manual_seed(args.seed)
    lengths = draw_lengths(g, args.steps, rows_per_batch, median, cap, 128)
    rows, outs = [], {}
    for name, fn in (("stock", stock), ("chronipatch", chronipatch)):
        torch._dynamo.reset()
        compiled = torch.compile(fn, dynamic=True)
        passes = []
        for extra in range(PASSES):
            per_step = []
            for n in lengths:
                q, k, v, mask = batch(g, device, n + extra)
                grad = torch.ones(q.shape[0], q.shape[2], HQ, D, device=device, dtype=q.dtype)
                sync()
                t0 = time.perf_counter()
                for _ in range(args.layers):
                    compiled(q, k, v, mask).backward(grad)
                sync()
                per_step.append((time.perf_counter() - t0) * 1e3)
            passes.append(per_step)
        # The first step compiles; the pass columns are medians over the rest of pass 1 and all of 2 and 3,
        # whose T are new but fall in buckets pass 1 met.
        first = batch(torch.Generator().manual_seed(args.seed), device, lengths[0])
        with torch.no_grad():
            outs[name] = compiled(*first).float()
        row = {
            "graph": name,
            "first step ms": passes[0][0],
            "out_diff": (outs[name] - outs["stock"]).abs().max().item(),
        }
        for i, per_step in enumerate(passes):
            row[f"pass {i + 1} ms"] = statistics.median(per_step[1:] if i == 0 else per_step)
        if device.type == "cuda":
            row["kernels"] = ", ".join(attention_kernels(compiled, batch(g, device, lengths[0] + PASSES)))
        rows.append(row)
        print(row, flush=True)
    meta = env_info(device)
    ts = sorted(int(n.max()) for n in lengths)
    meta["notes"] = [
        f"{rows_per_batch} rows, documents of median {median} tokens (at most {cap}), {HQ}/{HK} heads,"
        f" head_dim {D}, bf16; torch.compile(dynamic=True) of transformers' sdpa_attention_forward with the"
        f" 4-D bool mask; {args.steps} batches of {args.layers} calls (forward + backward) per pass,"
        f" padded lengths {ts[0]}-{ts[-1]} in pass 1",
    ]
    write_results("padded_compile", rows, meta, args.out, COLUMNS)


if __name__ == "__main__":
    main()
