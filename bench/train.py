"""Raw training-loop benchmark: HF eager vs torch.compile vs Liger vs chronipatch on public model configs.

Random-init model from the public config, bf16 weights, SDPA attention, seeded random tokens with
``labels=input_ids``. One step = forward + backward + clip_grad_norm_(1.0) + fused AdamW(lr=1e-5) step
+ zero_grad(set_to_none=True). Every (model, variant) runs in its own subprocess so that memory and
compile caches do not leak between variants; a variant that fails records its error and the rest go on.

    python bench/train.py [--models qwen2.5-0.5b,llama-3.2-1b] [--variants all] [--batch 4] [--seq 2048]
                          [--steps 10] [--warmup 3] [--out bench/out] [--smoke [--smoke-compile]]

``--smoke`` runs tiny configs on CPU in fp32 (batch 2 x 64, 2 steps, 1 warm-up) and skips the compiled
variants unless ``--smoke-compile`` is given.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

from common import (
    emit_result,
    env_info,
    gpu_time_breakdown,
    markdown_table,
    profile_sections,
    run_worker,
    short_error,
    write_results,
)
from memory import memory_at_peak, memory_sections
from models import SMOKE_CONFIG, causal_lm

PEAK_FLOP_PER_S = 790e12  # achievable dense bf16 matmul rate on H100 SXM (same figure as bench/ops.py)
# variant -> (patch applied to the model instance, torch.compile the model afterwards)
VARIANTS = {
    "hf": (None, False),
    "hf_compile": (None, True),
    "liger": ("liger", False),
    "liger_compile": ("liger", True),
    "chronipatch": ("chronipatch", False),
    "chronipatch_compile": ("chronipatch", True),
}
# Ablations, run only when named: chronipatch with one of its parts turned off.
ABLATIONS = {
    # the loss's label check at the loss (one host sync that drains the GPU queue), not prefetched
    "chronipatch_sync_check": ("chronipatch_sync_check", False),
}
RUNNABLE = VARIANTS | ABLATIONS
COLUMNS = (
    "model",
    "variant",
    "tok/s",
    "× HF eager",
    "step ms",
    "peak GiB",
    "MFU",
    "first loss",
    "last loss",
    "grad norm",
    "graph breaks",
    "error",
)
NOTES = [
    "one step = fwd + bwd (labels=input_ids) + clip_grad_norm_(1.0) + AdamW(fused, lr=1e-5) step"
    " + zero_grad(set_to_none=True); bf16 weights, attn_implementation=sdpa, random-init public config",
    "tok/s = batch·seq / median step time over the timed steps (after the warm-up steps)",
    "peak GiB: torch.cuda.max_memory_allocated over the whole run (warm-up included: a compiled variant's"
    " autotuning transients count), reset before step 0; peak_gib_timed (JSON): the timed steps alone",
    "MFU = (6·N·B·T + 6·L·B·T²·n_heads·head_dim) / step_s / 790e12, N = weights of all nn.Linear"
    " (lm_head counted even when tied, embedding lookup excluded), attention term = causal QKᵀ and AV"
    " (2·2·B·T²·n_heads·head_dim·L forward, halved for causal, ×3 for fwd+bwd); 790e12 is the H100's"
    " measured dense bf16 matmul rate, the convention of the peer figures (against the 989e12 spec peak"
    " every MFU is 0.8× this)",
    "use_cache as each forward decides it: stock HF and Liger follow the config (True: a DynamicCache is"
    " built in training, as in a loop that passes only input_ids and labels, and in the peer figures);"
    " chronipatch's training forward builds none",
    "first_step_s (in the JSON) includes compiles, so it depends on the on-disk Inductor/Triton caches",
    "graph breaks: sum of torch._dynamo.utils.counters['graph_break'] over the run (compiled variants)",
    "first/last loss: step 0 (first warm-up step) and the last timed step; grad norm: at the last step",
]


# ----------------------------------------------------------------------------------------- worker


def _forward_end(like: torch.Tensor) -> None:
    """One small block allocated where a step's forward ends: ``--memory`` reports what is alive there."""
    torch.empty(1, device=like.device)


def _flops_per_step(model: torch.nn.Module, batch: int, seq: int) -> float:
    cfg = model.config
    n_linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    attn = 6 * cfg.num_hidden_layers * batch * seq**2 * cfg.num_attention_heads * head_dim
    return 6 * n_linear * batch * seq + attn


def _patch(model: torch.nn.Module, kind: str | None) -> dict | None:
    if kind == "liger":
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        _apply_liger_kernel_to_instance(model=model)
    elif kind in ("chronipatch", "chronipatch_sync_check"):
        import chronipatch

        if kind == "chronipatch_sync_check":
            chronipatch.ops.prefetch_label_check = lambda *args, **kwargs: None
        report = chronipatch.apply(model)
        print(report, file=sys.stderr, flush=True)
        return dict(report.ops())
    return None


def _optimizer(params: list[torch.Tensor]) -> tuple[torch.optim.Optimizer, bool]:
    try:
        return torch.optim.AdamW(params, lr=1e-5, fused=True), True
    except (RuntimeError, ValueError):  # fused kernel not available for this device/dtype
        return torch.optim.AdamW(params, lr=1e-5), False


def run_variant(args: argparse.Namespace) -> dict:
    patch, compiled = RUNNABLE[args.variant]
    dev = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    torch.manual_seed(args.seed)  # same seed -> same initial weights in every variant
    model = causal_lm(args.model, attn_implementation="sdpa", **(SMOKE_CONFIG if args.smoke else {}))
    model.config._attn_implementation = "sdpa"
    flops = _flops_per_step(model, args.batch, args.seq)
    model = model.to(dtype=dtype, device=dev).train()
    gen = torch.Generator().manual_seed(args.seed + 1)
    n_steps = args.warmup + args.steps
    data = torch.randint(0, model.config.vocab_size, (n_steps, args.batch, args.seq), generator=gen).to(dev)
    row: dict = {"patched_ops": _patch(model, patch)}
    if compiled:
        model.compile()
    params = [p for p in model.parameters() if p.requires_grad]
    opt, row["fused_adamw"] = _optimizer(params)
    torch._dynamo.utils.counters.clear()

    def step(ids: torch.Tensor, mark: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        loss = model(input_ids=ids, labels=ids).loss
        if mark:
            _forward_end(loss)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach(), norm.detach()

    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    losses, warm_s, times_ms = [], [], []
    for i in range(args.warmup):
        t0 = time.perf_counter()
        losses.append(step(data[i])[0])
        if cuda:
            torch.cuda.synchronize()
        warm_s.append(time.perf_counter() - t0)
    if cuda:
        torch.cuda.synchronize()
        warm_peak = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    events = []
    for i in range(args.warmup, n_steps):
        if cuda:
            ev = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            ev[0].record()
            loss, norm = step(data[i])
            ev[1].record()
            events.append(ev)
        else:
            t0 = time.perf_counter()
            loss, norm = step(data[i])
            times_ms.append((time.perf_counter() - t0) * 1e3)
        losses.append(loss)
    if cuda:
        torch.cuda.synchronize()
        times_ms = [a.elapsed_time(b) for a, b in events]
    step_s = statistics.median(times_ms) / 1e3
    breaks = torch._dynamo.utils.counters["graph_break"]
    row.update(
        {
            "step ms": step_s * 1e3,
            "tok/s": args.batch * args.seq / step_s,
            "peak GiB": max(warm_peak, torch.cuda.max_memory_allocated()) / 2**30 if cuda else None,
            "peak_gib_timed": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            "MFU": flops / step_s / PEAK_FLOP_PER_S,
            "first loss": losses[0].item(),
            "last loss": losses[-1].item(),
            "grad norm": norm.item(),
            "graph breaks": sum(breaks.values()) if compiled else None,
            "graph_break_reasons": list(breaks)[:5] if compiled else None,
            "first_step_s": warm_s[0] if warm_s else None,
            "step_ms_all": times_ms,
            "flops_per_step": flops,
        }
    )
    if args.profile:
        ids = data[-1]
        try:
            row["profile"] = gpu_time_breakdown(lambda: step(ids))
        except Exception as e:  # the timings above stand without it
            row["profile_error"] = short_error(e)
    if args.memory and cuda:
        row["memory"] = memory_at_peak(lambda: step(data[-1], mark=True), marker=_forward_end.__name__)
    if args.pyprofile:
        path = f"{args.pyprofile}.{args.model}.{args.variant}.txt"
        row["pyprofile"] = _pyprofile(lambda: step(data[-1]), path, cuda)
    return row


def _pyprofile(step, path: str, cuda: bool, steps: int = 5) -> str:
    """cProfile of ``steps`` more steps after the timed ones (it slows the host, so it times nothing):
    where the host's time per step goes, by function. Returns the file written."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    prof.disable()
    out = io.StringIO()
    out.write(f"# cProfile of {steps} training steps\n")
    stats = pstats.Stats(prof, stream=out)
    stats.sort_stats("tottime").print_stats(45)
    stats.sort_stats("cumulative").print_stats(45)
    Path(path).write_text(out.getvalue())
    return path


def worker(args: argparse.Namespace) -> None:
    try:
        row = run_variant(args)
    except BaseException as e:  # OOM, missing package, unsupported model, compile failure, ...
        traceback.print_exc(file=sys.stderr)
        row = {"error": short_error(e)}
    emit_result(row)


# ----------------------------------------------------------------------------------------- parent


def spawn(args: argparse.Namespace, model: str, variant: str) -> dict:
    cmd = (
        [
            sys.executable,
            __file__,
            "--worker",
            "--variant",
            variant,
            "--model",
            model,
            "--batch",
            str(args.batch),
            "--seq",
            str(args.seq),
            "--steps",
            str(args.steps),
            "--warmup",
            str(args.warmup),
            "--seed",
            str(args.seed),
        ]
        + (["--smoke"] if args.smoke else [])
        + (["--profile"] if args.profile else [])
        + (["--memory"] if args.memory else [])
        + (["--pyprofile", args.pyprofile] if args.pyprofile else [])
    )
    print(f"== {model} / {variant}", file=sys.stderr, flush=True)
    base = {"model": model, "variant": variant}
    return run_worker(cmd, base, args.timeout)


def plot(rows: list[dict], path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib not importable: {path} not written", file=sys.stderr)
        return
    models = list(dict.fromkeys(r["model"] for r in rows))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    tps = {(r["model"], r["variant"]): r.get("tok/s") or 0.0 for r in rows}
    width = 0.8 / max(len(variants), 1)
    fig, ax = plt.subplots(figsize=(max(6, 2.2 * len(models) + 2), 4.5))
    for j, v in enumerate(variants):
        xs = [i + (j - (len(variants) - 1) / 2) * width for i in range(len(models))]
        ax.bar(xs, [tps.get((m, v), 0.0) for m in models], width, label=v)
    ax.set_xticks(range(len(models)), models)
    ax.set_ylabel("tokens / s")
    ax.set_title("training step throughput (higher is better)")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="qwen2.5-0.5b,llama-3.2-1b")
    p.add_argument("--variants", default="all", help=f"comma list of {', '.join(VARIANTS)} or 'all'")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=1800, help="seconds per variant subprocess")
    p.add_argument("--out", default="bench/out")
    p.add_argument("--smoke", action="store_true", help="tiny configs on CPU, fp32")
    p.add_argument("--smoke-compile", action="store_true", help="--smoke including the compiled variants")
    p.add_argument(
        "--profile", action="store_true", help="also profile 2 steps: GPU time per kernel category"
    )
    p.add_argument("--memory", action="store_true", help="also record one step: what is alive at its peak")
    p.add_argument(
        "--pyprofile", metavar="PREFIX", help="cProfile 5 more steps into PREFIX.<model>.<variant>.txt"
    )
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)

    args.smoke = args.smoke or args.smoke_compile
    variants = list(VARIANTS) if args.variants == "all" else args.variants.split(",")
    unknown = set(variants) - set(RUNNABLE)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}; choose from {list(VARIANTS)}")
    if args.smoke:
        args.batch, args.seq, args.steps, args.warmup = 2, 64, 2, 1
        if not args.smoke_compile:
            skipped = [v for v in variants if RUNNABLE[v][1]]
            variants = [v for v in variants if not RUNNABLE[v][1]]
            print(f"--smoke: skipping compiled variants {skipped} (add --smoke-compile)", file=sys.stderr)
    elif not torch.cuda.is_available():
        p.error("needs a CUDA device (use --smoke for a CPU run)")

    meta = {**env_info("cpu" if args.smoke else "cuda"), "notes": list(NOTES)}
    meta.update(
        batch=args.batch,
        seq=args.seq,
        steps=args.steps,
        warmup=args.warmup,
        seed=args.seed,
        dtype="float32" if args.smoke else "bfloat16",
        smoke=args.smoke,
        peak_flop_per_s=PEAK_FLOP_PER_S,
    )
    if args.smoke:
        meta["notes"].append("smoke run: tiny configs on CPU in fp32; MFU is against the H100 figure anyway")
    rows: list[dict] = []
    labels = ["model", "variant"]
    for m in args.models.split(","):
        for v in variants:
            rows.append(spawn(args, m, v))
            for r in rows:
                base = next((b for b in rows if b["model"] == r["model"] and b["variant"] == "hf"), None)
                if r.get("tok/s") and base and base.get("tok/s"):
                    r["× HF eager"] = r["tok/s"] / base["tok/s"]
            # Written after every variant: a run cut short keeps what it measured.
            json_path, md_path = write_results(
                "train",
                rows,
                meta,
                args.out,
                COLUMNS,
                sections=[*profile_sections(rows, labels), *memory_sections(rows, labels)],
            )
    plot(rows, md_path.with_suffix(".png"))
    print(markdown_table(rows, COLUMNS))
    print(f"wrote {json_path} and {md_path}", file=sys.stderr)


if __name__ == "__main__":
    main()
