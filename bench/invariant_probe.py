"""bf16 training's gradient errors against the fp32 truth, step by step: stock and chronipatch, over seeds.

    python bench/invariant_probe.py [--model qwen2.5-0.5b] [--seeds 0,1,2] [--steps 50]
        [--variants eager,compiled] [--out bench/out] [--smoke]

``run_against_truth``, the loop of ``tests/test_invariants_gpu.py``: an AdamW run in fp32 drives the weights;
at every step the same weights and batch go through stock and chronipatch under bf16 autocast, SDPA on its
math kernel, and each parameter's relative gradient error e = |g_bf16 - g_fp32| / |g_fp32| is kept. That
test bounds each parameter's worst e along the run by twice stock's worst: one extreme per parameter on each
side. Per seed and variant this reports the worst ratio of those extremes (and whether the test's bound
holds), the worst ratio of the means along the run, and where the worst extreme lies (parameter, step,
stock's e there); ``<out>/invariant_probe_seed<n>.pt`` keeps every step's errors.
``--smoke``: a tiny config on CPU, 3 steps, eager only.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

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


def loss_and_grad(fn, params, ids, bf16: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, the parameters' gradients flattened into one fp32 vector) of ``fn`` on ``ids`` as labels."""
    # Every run, the fp32 truth (which also drives the updates) and the bf16 ones, takes SDPA's math kernel:
    # the fused kernels' backward sums dq in a run-dependent order (atomics, whose order moves with whatever
    # else shares the GPU), so stock's own error, the bound here, and the trajectory would move between runs.
    # Attention is not swapped; the comparison is of the swapped ops around the same attention.
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=bf16), sdpa_kernel(SDPBackend.MATH):
        loss = fn(input_ids=ids, labels=ids).loss
    grads = torch.autograd.grad(loss, params)
    return loss.detach().float(), torch.cat([g.float().flatten() for g in grads])


def run_against_truth(
    model_name: str, seed: int, steps: int, variants, device: str = "cuda", **overrides
) -> tuple[list[float], list[str], dict]:
    """An AdamW run in fp32 of ``model_name`` (config ``overrides``); at every step the same weights and batch
    also go through stock and each of ``variants`` (``eager``, ``compiled``: patched) under bf16 autocast.
    Returns (the fp32 losses, the parameter names, per variant and "stock": (|loss error| per step, [P]
    relative gradient errors per step))."""
    torch.manual_seed(seed)
    stock = causal_lm(model_name, attn_implementation="sdpa", **overrides).to(device)
    params = list(stock.parameters())
    runs = {"stock": stock}
    for v in variants:
        runs[v] = shared_copy(stock)
        chronipatch.apply(runs[v])
    if "compiled" in runs:
        torch._dynamo.reset()
        runs["compiled"] = torch.compile(runs["compiled"])
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    sizes = [p.numel() for p in params]
    errors = {v: ([], []) for v in runs}
    curve = []
    # Zipf-distributed tokens: the unigram frequencies are learnt within a few steps, so the loss falls
    # wherever the random init starts (uniform tokens leave only the last nats down to log V to learn).
    zipf = 1.0 / torch.arange(1, stock.config.vocab_size + 1, device=device, dtype=torch.float32)
    for _ in range(steps):
        ids = torch.multinomial(zipf, 2 * 256, replacement=True).view(2, 256)
        loss, grad = loss_and_grad(stock, params, ids, bf16=False)
        norms = torch.stack([g.norm() for g in torch.split(grad, sizes)])
        for v, fn in runs.items():
            l_v, g_v = loss_and_grad(fn, params, ids, bf16=True)
            errors[v][0].append(abs(l_v - loss).item())
            errors[v][1].append(torch.stack([d.norm() for d in torch.split(g_v - grad, sizes)]) / norms)
        curve.append(loss.item())
        for p, g in zip(params, torch.split(grad, sizes)):
            p.grad = g.view_as(p)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return curve, [n for n, _ in stock.named_parameters()], errors


def probe(model_name: str, seed: int, steps: int, variants: list[str], smoke: bool, out: str) -> list[dict]:
    curve, names, errors = run_against_truth(
        model_name, seed, steps, variants, "cpu" if smoke else "cuda", **(SMOKE_CONFIG if smoke else {})
    )
    raw = {v: (torch.tensor(loss_e), torch.stack(e).cpu()) for v, (loss_e, e) in errors.items()}
    # The whole record, for statistics other than the ones below without another run.
    Path(out).mkdir(parents=True, exist_ok=True)
    torch.save({"names": names, "curve": curve, "errors": raw}, Path(out) / f"invariant_probe_seed{seed}.pt")
    e_stock = raw["stock"][1]  # [steps, P]
    rows = []
    for v in variants:
        e = raw[v][1]
        worst = e.amax(0) / e_stock.amax(0)
        i = int(worst.argmax())
        step = int(e[:, i].argmax())
        rows.append(
            {
                "seed": seed,
                "variant": v,
                "first loss": round(curve[0], 4),
                "last loss": round(curve[-1], 4),
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
        rows += probe(args.model, seed, steps, variants, args.smoke, args.out)
    meta = {**env_info("cpu" if args.smoke else "cuda"), "model": args.model, "steps": steps}
    write_results("invariant_probe", rows, meta, args.out)


if __name__ == "__main__":
    main()
