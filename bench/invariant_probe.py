"""bf16 training's gradient errors against the fp32 truth, step by step: stock and chronipatch, over seeds.

    python bench/invariant_probe.py [--model qwen2.5-0.5b] [--seeds 0,1,2] [--steps 50]
        [--variants eager,compiled] [--out bench/out] [--smoke]

The loop of ``tests/test_invariants_gpu.py``: an AdamW run in fp32 drives the weights; at every step the same
weights and batch go through stock and chronipatch under bf16 autocast, SDPA on its math kernel, and each
parameter's relative gradient error e = |g_bf16 - g_fp32| / |g_fp32| is kept. That test bounds each
parameter's worst e along the run by twice stock's worst: one extreme per parameter on each side. Per seed
and variant this reports the worst ratio of those extremes (and whether the test's bound holds), the worst
ratio of the means along the run, and where the worst extreme lies (parameter, step, stock's e there).
``--smoke``: a tiny config on CPU, 3 steps, eager only.
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import chronipatch
from common import env_info, write_results
from models import SMOKE_CONFIG, causal_lm


def shared_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` holding ``model``'s own parameters (ties kept): every copy sees each update."""
    twin = copy.deepcopy(model)
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, _ in list(twin.named_parameters(remove_duplicate=False)):
        owner, _, leaf = name.rpartition(".")
        setattr(twin.get_submodule(owner), leaf, params[name])
    return twin


def _loss_and_grads(fn, params, ids, bf16: bool) -> tuple[float, list[torch.Tensor]]:
    dev = ids.device.type
    with torch.autocast(dev, dtype=torch.bfloat16, enabled=bf16), sdpa_kernel(SDPBackend.MATH):
        loss = fn(input_ids=ids, labels=ids).loss
    return loss.item(), [g.float() for g in torch.autograd.grad(loss, params)]


def probe(model_name: str, seed: int, steps: int, variants: list[str], smoke: bool) -> list[dict]:
    dev = "cpu" if smoke else "cuda"
    torch.manual_seed(seed)
    stock = causal_lm(model_name, attn_implementation="sdpa", **(SMOKE_CONFIG if smoke else {})).to(dev)
    params = list(stock.parameters())
    names = [n for n, _ in stock.named_parameters()]
    runs = {"stock": stock}
    for v in variants:
        twin = shared_copy(stock)
        chronipatch.apply(twin)
        runs[v] = torch.compile(twin) if v == "compiled" else twin
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    # Zipf tokens, as the test: the loss falls within a few steps wherever the init starts.
    zipf = 1.0 / torch.arange(1, stock.config.vocab_size + 1, device=dev, dtype=torch.float32)
    errors = {v: [] for v in runs}  # per step: [P] relative gradient errors
    losses = []
    for _ in range(steps):
        ids = torch.multinomial(zipf, 2 * 256, replacement=True).view(2, 256)
        loss, grads = _loss_and_grads(stock, params, ids, bf16=False)
        norms = torch.stack([g.norm() for g in grads])
        for v, fn in runs.items():
            _, g_v = _loss_and_grads(fn, params, ids, bf16=True)
            errors[v].append(torch.stack([(a - b).norm() for a, b in zip(g_v, grads)]) / norms)
        losses.append(loss)
        for p, g in zip(params, grads):
            p.grad = g
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    e_stock = torch.stack(errors["stock"])  # [steps, P]
    rows = []
    for v in variants:
        e = torch.stack(errors[v])
        worst = e.amax(0) / e_stock.amax(0)
        i = int(worst.argmax())
        step = int(e[:, i].argmax())
        rows.append(
            {
                "seed": seed,
                "variant": v,
                "first loss": round(losses[0], 4),
                "last loss": round(losses[-1], 4),
                "worst ratio": round(float(worst.max()), 3),
                "bound holds": bool((e.amax(0) <= 2 * e_stock.amax(0) + 2e-3).all()),
                "mean ratio": round(float((e.mean(0) / e_stock.mean(0)).max()), 3),
                "parameter": names[i],
                "step": step,
                "e": round(float(e[step, i]), 4),
                "stock e there": round(float(e_stock[step, i]), 4),
                "stock worst": round(float(e_stock[:, i].max()), 4),
            }
        )
        print(rows[-1], flush=True)
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen2.5-0.5b")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--variants", default="eager,compiled")
    p.add_argument("--out", default="bench/out")
    p.add_argument("--smoke", action="store_true", help="a tiny config on CPU, 3 steps, eager only")
    args = p.parse_args(argv)
    variants = ["eager"] if args.smoke else args.variants.split(",")
    if set(variants) - {"eager", "compiled"}:
        p.error(f"variants are eager and compiled, got {args.variants}")
    steps = 3 if args.smoke else args.steps
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        rows += probe(args.model, seed, steps, variants, args.smoke)
    meta = {**env_info("cpu" if args.smoke else "cuda"), "model": args.model, "steps": steps}
    write_results("invariant_probe", rows, meta, args.out)


if __name__ == "__main__":
    main()
