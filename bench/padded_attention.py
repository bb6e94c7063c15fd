"""Masked SDPA in padded batches, forward + backward: SDPA's own kernel choice against chronipatch's.

A padded SFT batch is 8 documents padded to the longest; transformers' SDPA then gets a 4-D bool mask (causal
AND padding) and repeated kv heads. On Hopper, torch picks cuDNN's kernel for it first, whose host cost per
call (H200, torch 2.11: ~3 ms forward, ~4 ms backward in `bench/sft.py --profile`) leaves a padded SFT step
idling the GPU. chronipatch's attention forward runs masked SDPA without cuDNN
(``attention.masked_sdpa_kernels``).

Qwen2.5-0.5B attention shapes (14 query / 2 kv heads, head_dim 64), bf16, 8 rows; document lengths log-normal
(median 400, sigma 0.75, capped at 2048, as `bench/sft.py`). Per backend choice:

- ``step``: ms per batch of ``--layers`` calls back to back on it, each batch a new padded length T, as a
  model's layers share a step's shape (cuDNN builds its plan for a new shape once, the other layers reuse it);
- ``new T``: ms per call, back to back, each call a new batch (a new padded length T);
- ``same T``: ms per call, back to back, ``--batches`` calls of one batch;
- ``out_err``: max |out - ref| over the first batch, ref SDPA's math kernel in fp32.

    python bench/padded_attention.py [--out bench/out] [--batches 24] [--seed 0] [--rows 8] [--median 400]
                                     [--cap 2048] [--steps 6] [--layers 24] [--smoke]

``--smoke`` runs tiny batches on the CPU, to keep the script working.
"""

from __future__ import annotations

import argparse
import math
import time
from contextlib import nullcontext
from types import SimpleNamespace

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from common import env_info, write_results

HQ, HK, D, ROWS = 14, 2, 64, 8
MEDIAN, SIGMA, CAP = 400, 0.75, 2048
COLUMNS = ("backends", "step ms", "new T ms", "same T ms", "out_err")


def batch(g: torch.Generator, device, rows: int, median: int, cap: int, taken: set[int]) -> tuple:
    """q, k, v [rows, H, T, D] bf16 (requires grad) and the 4-D causal-and-padding bool mask of ``rows``
    documents of log-normal lengths, padded to a length T not in ``taken`` (then added): a shape no kernel
    has seen, so each measurement pays what a new batch pays."""
    while True:
        logs = math.log(median) + SIGMA * torch.randn(rows, generator=g)
        lengths = logs.exp().round().clamp(8, cap).long()
        t = int(lengths.max())
        if t not in taken:
            break
    taken.add(t)
    pad = torch.arange(t)[None, :] < lengths[:, None]  # right padding, as TRL's collator
    mask = (pad[:, None, None, :] & torch.ones(t, t, dtype=torch.bool).tril()).to(device)
    q, k, v = (torch.randn(rows, h, t, D, generator=g).to(device, torch.bfloat16) for h in (HQ, HK, HK))
    return q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), mask


def step(module, q, k, v, mask):
    out, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=D**-0.5)
    out.backward(torch.ones_like(out))
    return out


def reference(module, q, k, v, mask):
    """SDPA's math kernel in fp32, forward only."""
    return sdpa_attention_forward(module, q.float(), k.float(), v.float(), mask, scaling=D**-0.5)[0]


def per_call_ms(module, batches, context) -> float:
    """ms per call, back to back, one sync at the end; ``context(q, k, v, mask)`` is entered around each
    call, as the model does."""
    sync = torch.cuda.synchronize if batches[0][0].is_cuda else lambda: None
    sync()
    t0 = time.perf_counter()
    for b in batches:
        with context(*b):
            step(module, *b)
    sync()
    return (time.perf_counter() - t0) / len(batches) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench/out")
    p.add_argument("--batches", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rows", type=int, default=ROWS)
    p.add_argument("--median", type=int, default=MEDIAN, help="median document length (long contexts: 4000)")
    p.add_argument("--cap", type=int, default=CAP, help="longest document")
    p.add_argument("--steps", type=int, default=6, help="batches in the step column")
    p.add_argument("--layers", type=int, default=24, help="calls per batch in the step column (model layers)")
    p.add_argument("--smoke", action="store_true", help="tiny batches on the CPU (its figures mean nothing)")
    args = p.parse_args()
    if args.smoke:
        args.batches, args.steps, args.rows, args.median, args.cap, args.layers = 2, 1, 2, 24, 64, 2
    from chronipatch.attention import _WITHOUT_CUDNN, masked_sdpa_kernels

    device = torch.device("cpu" if args.smoke else "cuda")
    g, taken = torch.Generator().manual_seed(args.seed), set()
    fresh = lambda: batch(g, device, args.rows, args.median, args.cap, taken)
    module = SimpleNamespace(is_causal=True, num_key_value_groups=HQ // HK, training=True)
    q, k, v, mask = fresh()
    with sdpa_kernel([SDPBackend.MATH]), torch.no_grad():  # row by row: fp32 scores of one row at a time
        ref = torch.cat(
            [
                reference(module, q[r : r + 1], k[r : r + 1], v[r : r + 1], mask[r : r + 1])
                for r in range(len(q))
            ]
        )
    rows = []
    contexts = (
        ("SDPA's choice (stock)", lambda q, k, v, mask: nullcontext()),
        ("without cuDNN", lambda q, k, v, mask: _WITHOUT_CUDNN),
        ("chronipatch", lambda q, k, v, mask: masked_sdpa_kernels(mask, q, k)),
    )
    for name, context in contexts:
        # The first call (also the error's) takes first-call costs (kernel loads, autotuning) apart.
        with context(q, k, v, mask):
            out = step(module, *(x.detach().requires_grad_() for x in (q, k, v)), mask).detach()
        steps = [b for b in (fresh() for _ in range(args.steps)) for _ in range(args.layers)]
        rows.append(
            {
                "backends": name,
                "step ms": per_call_ms(module, steps, context) * args.layers,
                "new T ms": per_call_ms(module, [fresh() for _ in range(args.batches)], context),
                "same T ms": per_call_ms(module, [fresh()] * args.batches, context),
                "out_err": (out.float() - ref).abs().max().item(),
            }
        )
        del steps
        print(rows[-1], flush=True)
    ts = sorted(taken)
    meta = env_info(device)
    meta["notes"] = [
        f"{args.rows} rows, documents of median {args.median} tokens (at most {args.cap}), {HQ}/{HK} heads,"
        f" head_dim {D}, bf16; transformers' sdpa_attention_forward with the"
        " 4-D bool mask (causal AND right padding); forward + backward (upstream ones), ms per call back to"
        f" back with one sync at the end (host cost included); step: {args.steps} batches of {args.layers}"
        f" calls; every measurement on batches of padded lengths not seen before ({ts[0]}-{ts[-1]})",
        "chronipatch: SDPA without cuDNN's kernel where the memory-efficient one is enabled"
        " (chronipatch.attention.masked_sdpa_kernels)",
    ]
    write_results("padded_attention", rows, meta, args.out, COLUMNS)


if __name__ == "__main__":
    main()
