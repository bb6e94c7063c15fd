"""Forward+backward of causal attention over one packed row: block-causal masked SDPA vs varlen kernels.

One row of 8k, 16k and 32k tokens in turn holds documents with log-normal lengths (median 440, sigma 1, capped
at 2048, the last one cut to fit), Qwen2.5-0.5B attention shapes (14 query / 2 kv heads, head_dim 64), bf16:

1. ``sdpa_mask``: transformers' ``sdpa_attention_forward`` with the 4-D block-causal bool mask that
   transformers builds for a packed sdpa batch (kv heads repeated, as it does whenever a mask is given);
2. ``chronipatch_varlen``: ``chronipatch.attention.varlen_attention_forward`` given ``cu_seq_lens_*``;
3. ``flash_attn_varlen``: flash-attn's ``flash_attn_varlen_func``, when importable.

    python bench/attention.py [--out bench/out] [--tokens 8192,16384,32768] [--seed 0]
"""

from __future__ import annotations

import argparse
import math
import sys
from itertools import pairwise
from types import SimpleNamespace

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from common import env_info, peak_extra_bytes, write_results

HQ, HK, D = 14, 2, 64
MEDIAN, SIGMA, CAP = 440, 1.0, 2048
COLUMNS = ("tokens", "impl", "ms", "speedup", "peak_extra_MiB", "MiB_per_1k_tokens")
COLUMNS += ("out_err", "dq_err", "dk_err", "dv_err", "out_err_fp32")


def doc_lengths(total: int, seed: int) -> list[int]:
    """Log-normal document lengths filling exactly ``total`` tokens (the last document cut to fit)."""
    g = torch.Generator().manual_seed(seed)
    lengths: list[int] = []
    while sum(lengths) < total:
        n = math.exp(math.log(MEDIAN) + SIGMA * torch.randn((), generator=g).item())
        lengths.append(int(min(max(round(n), 1), CAP, total - sum(lengths))))
    return lengths


def block_causal_mask(lengths: list[int], device) -> torch.Tensor:
    doc = torch.repeat_interleave(
        torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device)
    )
    t = torch.arange(doc.numel(), device=device)
    return ((doc[:, None] == doc[None, :]) & (t[None, :] <= t[:, None]))[None, None]


def measure(tokens: int, seed: int, dev: torch.device) -> tuple[list[dict], list[str]]:
    """Time, extra peak memory and errors of every implementation on one packed row of ``tokens``."""
    from triton.testing import do_bench

    from chronipatch.attention import varlen_attention_forward

    lengths = doc_lengths(tokens, seed)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=dev)
    module = SimpleNamespace(is_causal=True, num_key_value_groups=HQ // HK, training=False, layer_idx=0)
    scale = D**-0.5
    g = torch.Generator(device=dev).manual_seed(seed)
    q, k, v = (
        torch.randn(1, h, tokens, D, device=dev, generator=g, dtype=torch.bfloat16) for h in (HQ, HK, HK)
    )
    grad = torch.randn(1, tokens, HQ, D, device=dev, generator=g, dtype=torch.bfloat16)
    mask = block_causal_mask(lengths, dev)  # built once per forward and shared by all layers: not timed
    packed = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(lengths), max_length_k=max(lengths))

    impls = {
        "sdpa_mask": lambda q, k, v: sdpa_attention_forward(module, q, k, v, mask, scaling=scale)[0],
        "chronipatch_varlen": lambda q, k, v: varlen_attention_forward(
            module, q, k, v, None, scale, **packed
        )[0],
    }
    notes = [
        f"{tokens} tokens: {len(lengths)} documents, longest {max(lengths)},"
        f" mean {tokens / len(lengths):.0f}; the sdpa_mask mask ({mask.numel() / 2**20:.0f} MiB of bool)"
        " is built beforehand, not counted"
    ]
    try:
        from flash_attn import flash_attn_varlen_func

        def flash(q, k, v):
            q3, k3, v3 = (x[0].transpose(0, 1) for x in (q, k, v))
            out = flash_attn_varlen_func(
                q3, k3, v3, cu, cu, max(lengths), max(lengths), softmax_scale=scale, causal=True
            )
            return out[None]

        impls["flash_attn_varlen"] = flash
    except ImportError as e:
        notes.append(f"flash_attn_varlen skipped: flash-attn not importable ({e})")

    def truth_fn(q, k, v):  # fp32 per-document SDPA
        b = cu.tolist()
        outs = [
            sdpa_attention_forward(module, *(x[:, :, i:j] for x in (q, k, v)), None, scaling=scale)[0]
            for i, j in pairwise(b)
        ]
        return torch.cat(outs, dim=1)

    def run(fn, dtype):
        leaves = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
        out = fn(*leaves)
        out.backward(grad.to(dtype))
        return [out.detach().float()] + [x.grad.float() for x in leaves]

    truth = run(truth_fn, torch.float32)
    results = {name: run(fn, torch.bfloat16) for name, fn in impls.items()}
    base = results["sdpa_mask"]
    rows = []
    for name, fn in impls.items():
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]
        step = lambda fn=fn, leaves=leaves: fn(*leaves).backward(grad)
        ms = float(do_bench(step, grad_to_none=leaves, return_mode="median"))
        peak = peak_extra_bytes(step, dev)
        mib = peak / 2**20 if peak is not None else None
        rows.append(dict(tokens=tokens, impl=name, ms=ms, peak_extra_MiB=mib))
        rows[-1]["MiB_per_1k_tokens"] = mib / (tokens / 1024) if mib is not None else None
        errs = [(a - b).abs().max().item() for a, b in zip(results[name], base)]
        rows[-1].update(zip(("out_err", "dq_err", "dk_err", "dv_err"), errs))
        rows[-1]["out_err_fp32"] = (results[name][0] - truth[0]).abs().max().item()
    for r in rows:
        r["speedup"] = rows[0]["ms"] / r["ms"]
    return rows, notes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/out")
    parser.add_argument("--tokens", default="8192,16384,32768", help="comma list of packed-row lengths")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/attention.py needs a CUDA device (the varlen kernels are CUDA-only)")
    dev = torch.device("cuda")
    rows, notes = [], []
    for tokens in (int(t) for t in args.tokens.split(",")):
        r, n = measure(tokens, args.seed, dev)
        rows += r
        notes += n
    meta = env_info(dev)
    meta["notes"] = [
        f"one packed row per token count; documents with log-normal lengths (median {MEDIAN}, sigma {SIGMA},"
        f" cap {CAP}, seed {args.seed}), the last one cut to fit",
        f"bf16, {HQ} query / {HK} kv heads, head_dim {D} (Qwen2.5-0.5B); ms = median fwd+bwd of one"
        " attention call (triton.testing.do_bench)",
        "peak_extra_MiB: max_memory_allocated during one fwd+bwd minus what was allocated before it;"
        " MiB_per_1k_tokens: the same per 1,024 tokens (flat across token counts = memory linear in tokens)",
        "out_err / dq_err / dk_err / dv_err: max abs difference to sdpa_mask; out_err_fp32: to per-document"
        " SDPA in fp32 on the same inputs",
        *notes,
    ]
    json_path, md_path = write_results("attention", rows, meta, args.out, COLUMNS)
    print(md_path.read_text())
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
