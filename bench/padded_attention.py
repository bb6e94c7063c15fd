"""Masked SDPA in padded batches, forward + backward: stock SDPA against chronipatch's ``masked_sdpa``.

A padded SFT batch is 8 documents padded to the longest; transformers' SDPA then gets a 4-D bool mask (causal
AND padding) and repeated kv heads. On Hopper, torch picks cuDNN's kernel for it first, and cuDNN builds a
plan for every new shape (~0.1-0.3 s of host time), which a new padded length brings nearly every step.
chronipatch pads the length to a bucket and runs a bucket's first forward without cuDNN
(``chronipatch.masked_sdpa``).

Qwen2.5-0.5B attention shapes (14 query / 2 kv heads, head_dim 64), bf16, 8 rows; document lengths log-normal
(median 400, sigma 0.75, capped at 2048, as `bench/sft.py`). Rows: SDPA's own choice (stock), SDPA without
cuDNN, chronipatch. Columns, ms with host cost included (back to back, one sync at the end):

- ``pass 1/2/3``: per step of ``--layers`` calls on one batch (a model's layers share its shape), over
  ``--steps`` batches; pass 2 and 3 make every document 1 and 2 tokens longer: new padded lengths, each in
  the bucket of pass 1's. Stock builds plans in every pass; chronipatch meets its buckets in pass 1, builds
  their plans in pass 2 and runs them in pass 3, as in a run's later steps;
- ``kernel``: per call, back to back on one batch met before (plans built);
- ``out_err``: max |out - ref| over the first batch, ref SDPA's math kernel in fp32.

Every row gets the same lengths, all distinct and none a multiple of the bucket, so no row meets another
row's shapes.

    python bench/padded_attention.py [--out bench/out] [--steps 8] [--layers 24] [--seed 0] [--rows 8]
                                     [--median 400] [--cap 2048] [--smoke]

``--smoke`` runs tiny batches on the CPU, to keep the script working.
"""

from __future__ import annotations

import argparse
import math
import time
from types import SimpleNamespace

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from common import env_info, write_results

HQ, HK, D, ROWS = 14, 2, 64, 8
MEDIAN, SIGMA, CAP = 400, 0.75, 2048
PASSES = 3
COLUMNS = ("backends", *(f"pass {i + 1} ms" for i in range(PASSES)), "kernel ms", "out_err")


def draw_lengths(g: torch.Generator, n: int, rows: int, median: int, cap: int, bucket: int) -> list:
    """``n`` batches of ``rows`` log-normal document lengths whose padded lengths T..T + PASSES - 1 are
    distinct from every other batch's and none a multiple of ``bucket``."""
    out, taken = [], set()
    while len(out) < n:
        lengths = (math.log(median) + SIGMA * torch.randn(rows, generator=g)).exp().round().clamp(8, cap)
        ts = {int(lengths.max()) + j for j in range(PASSES)}
        if ts & taken or any(t % bucket == 0 for t in ts):
            continue
        taken |= ts
        out.append(lengths.long())
    return out


def batch(g: torch.Generator, device, lengths: torch.Tensor) -> tuple:
    """q, k, v [rows, H, T, D] bf16 (requiring grad) and the 4-D causal-and-right-padding bool mask."""
    t = int(lengths.max())
    pad = torch.arange(t)[None, :] < lengths[:, None]  # right padding, as TRL's collator
    mask = (pad[:, None, None, :] & torch.ones(t, t, dtype=torch.bool).tril()).to(device)
    q, k, v = (
        torch.randn(len(lengths), h, t, D, generator=g).to(device, torch.bfloat16) for h in (HQ, HK, HK)
    )
    return q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), mask


def step(attend, module, q, k, v, mask):
    out, _ = attend(module, q, k, v, mask, scaling=D**-0.5)
    out.backward(torch.ones_like(out))
    return out


def per_call_ms(attend, module, batches) -> float:
    sync = torch.cuda.synchronize if batches[0][0].is_cuda else lambda: None
    sync()
    t0 = time.perf_counter()
    for b in batches:
        step(attend, module, *b)
    sync()
    return (time.perf_counter() - t0) / len(batches) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench/out")
    p.add_argument("--steps", type=int, default=8, help="batches in each steps column")
    p.add_argument("--layers", type=int, default=24, help="calls per batch in the steps columns")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rows", type=int, default=ROWS)
    p.add_argument("--median", type=int, default=MEDIAN, help="median document length (long contexts: 4000)")
    p.add_argument("--cap", type=int, default=CAP, help="longest document")
    p.add_argument("--smoke", action="store_true", help="tiny batches on the CPU (its figures mean nothing)")
    args = p.parse_args()
    if args.smoke:
        args.steps, args.layers, args.rows, args.median, args.cap = 2, 2, 2, 24, 100
    from chronipatch.masked_sdpa import _WITHOUT_CUDNN, BUCKET, masked_sdpa

    def without_cudnn(*a, **kw):
        with _WITHOUT_CUDNN:
            return sdpa_attention_forward(*a, **kw)

    device = torch.device("cpu" if args.smoke else "cuda")
    g = torch.Generator().manual_seed(args.seed)
    lengths = draw_lengths(g, args.steps + 1, args.rows, args.median, args.cap, BUCKET)
    module = SimpleNamespace(is_causal=True, num_key_value_groups=HQ // HK, training=True)
    rows = []
    for name, attend in (
        ("SDPA's choice (stock)", sdpa_attention_forward),
        ("without cuDNN", without_cudnn),
        ("chronipatch", masked_sdpa),
    ):
        q, k, v, mask = first = batch(torch.Generator().manual_seed(args.seed), device, lengths[0])
        out = step(attend, module, *first).detach()  # first-call costs (kernel loads, plans) apart
        with sdpa_kernel([SDPBackend.MATH]), torch.no_grad():  # fp32 scores of one row at a time
            ref = torch.cat(
                [
                    sdpa_attention_forward(
                        module, *(x[r : r + 1].float() for x in (q, k, v)), mask[r : r + 1]
                    )[0]
                    for r in range(len(q))
                ]
            )
        again = (q, k, v, mask.clone())  # another forward's mask: chronipatch runs SDPA's choice
        step(attend, module, *again)
        row = {"backends": name, "kernel ms": per_call_ms(attend, module, [again] * args.layers)}
        for extra in range(PASSES):
            batches = [batch(g, device, n + extra) for n in lengths[1:]]
            calls = [b for b in batches for _ in range(args.layers)]
            row[f"pass {extra + 1} ms"] = per_call_ms(attend, module, calls) * args.layers
            del batches, calls
        rows.append(
            {c: row[c] for c in COLUMNS if c in row} | {"out_err": (out.float() - ref).abs().max().item()}
        )
        print(rows[-1], flush=True)
    ts = sorted(int(n.max()) for n in lengths[1:])
    meta = env_info(device)
    meta["notes"] = [
        f"{args.rows} rows, documents of median {args.median} tokens (at most {args.cap}), {HQ}/{HK} heads,"
        f" head_dim {D}, bf16; transformers' sdpa_attention_forward with the 4-D bool mask (causal AND right"
        f" padding); forward + backward (upstream ones); steps: {args.steps} batches of {args.layers} calls,"
        f" padded lengths {ts[0]}-{ts[-1]} in pass 1",
        f"chronipatch: chronipatch.masked_sdpa (lengths padded to a multiple of {BUCKET}; a padded shape's"
        " first forward without cuDNN)",
    ]
    write_results("padded_attention", rows, meta, args.out, COLUMNS)


if __name__ == "__main__":
    main()
