"""Distributed training benchmark: DDP and FSDP2, stock HF vs chronipatch, one launch under torchrun.

    torchrun --standalone --nproc-per-node 8 bench/distributed.py [--model qwen2.5-0.5b]
        [--strategies ddp,fsdp2] [--variants stock,chronipatch] [--batch 4] [--seq 2048]
        [--steps 20] [--warmup 5] [--out bench/out] [--smoke]
    nox -s distributed -- 8 [same options]

Random-init public config (``bench/models.py``), bf16 weights, SDPA attention, seeded random tokens
with ``labels=input_ids``, a different shard of tokens on every rank. One step = forward + backward +
clip_grad_norm_(1.0) + AdamW(lr=1e-5) step + zero_grad(set_to_none=True). DDP wraps the whole model;
FSDP2 runs ``fully_shard`` on every decoder layer and then on the root (lm_head and the embedding, tied
in Qwen2.5, stay in the root unit). chronipatch patches the model before wrapping. All (strategy,
variant) runs share the processes, one after another, each from the same seed and data.

``--smoke`` runs a tiny config on CPU in fp32 over gloo (batch 2 x 64, 4 steps, 1 warm-up); without it
the script needs one CUDA device per rank and uses NCCL (with ``NCCL_NVLS_ENABLE=0``).
"""

from __future__ import annotations

import os

os.environ["NCCL_NVLS_ENABLE"] = "0"  # before any NCCL communicator exists

import argparse
import gc
import statistics
import sys
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist

from common import env_info, markdown_table, short_error, write_results
from models import SMOKE_CONFIG, causal_lm

STRATEGIES = ("ddp", "fsdp2")
VARIANTS = ("stock", "chronipatch")
COLUMNS = (
    "strategy",
    "variant",
    "GPUs",
    "tok/s/GPU",
    "× stock",
    "step ms",
    "peak GiB/GPU",
    "first loss",
    "last loss",
    "max |Δloss| vs stock",
    "grad norm",
    "error",
)
NOTES = [
    "one step = fwd + bwd (labels=input_ids) + clip_grad_norm_(1.0) + AdamW(lr=1e-5, fused on CUDA) step"
    " + zero_grad(set_to_none=True); bf16 weights, attn_implementation=sdpa, random-init public config",
    "DDP: DistributedDataParallel(model); FSDP2: fully_shard(each decoder layer), then fully_shard(root);"
    " chronipatch.apply(model) before wrapping; NCCL_NVLS_ENABLE=0",
    "batch and seq are per rank; tok/s/GPU = batch·seq / step time, step time = the slowest rank's median"
    " over the steps after the warm-up",
    "peak GiB/GPU: the largest torch.cuda.max_memory_allocated over the ranks, reset after wrapping",
    "loss of a step: mean over ranks of each rank's mean token loss (every rank scores the same number of"
    " tokens, so this is the global mean)",
]


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _wrap(model: torch.nn.Module, strategy: str, device: torch.device) -> torch.nn.Module:
    if strategy == "ddp":
        ids = [device.index] if device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard  # torch >= 2.6

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def run(args: argparse.Namespace, strategy: str, variant: str, device: torch.device) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = torch.float32 if args.smoke else torch.bfloat16
    torch.manual_seed(args.seed)  # same initial weights on every rank and in every run
    model = causal_lm(args.model, attn_implementation="sdpa", **(SMOKE_CONFIG if args.smoke else {}))
    model.config._attn_implementation = "sdpa"
    model = model.to(dtype=dtype, device=device).train()
    row: dict = {}
    if variant == "chronipatch":
        import chronipatch

        report = chronipatch.apply(model)
        row["patched_ops"] = dict(report.ops())
        if rank == 0:
            print(report, file=sys.stderr, flush=True)
    wrapped = _wrap(model, strategy, device)
    params = [p for p in wrapped.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")
    gen = torch.Generator().manual_seed(args.seed + 1 + rank)  # each rank its own tokens
    vocab = model.config.vocab_size
    data = torch.randint(0, vocab, (args.steps, args.batch, args.seq), generator=gen).to(device)

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    dist.barrier()
    losses, times_ms, events = [], [], []
    norm = None
    for i in range(args.steps):
        if cuda:
            ev = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            ev[0].record()
        t0 = time.perf_counter()
        loss = wrapped(input_ids=data[i], labels=data[i]).loss
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            ev[1].record()
            events.append(ev)
        else:
            times_ms.append((time.perf_counter() - t0) * 1e3)
        losses.append(loss.detach().float())
    if cuda:
        torch.cuda.synchronize()
        times_ms = [a.elapsed_time(b) for a, b in events]
    mean_losses = torch.stack(losses)
    dist.all_reduce(mean_losses)  # no per-step host sync in the timed loop: one reduction at the end
    mean_losses /= world
    timed = times_ms[args.warmup :] or times_ms
    mine = {
        "step_ms": statistics.median(timed),
        "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
    }
    every: list[dict] = [None] * world  # type: ignore[list-item]
    dist.all_gather_object(every, mine)
    step_ms = max(r["step_ms"] for r in every)
    peaks = [r["peak_gib"] for r in every]
    row.update(
        {
            "step ms": step_ms,
            "tok/s/GPU": args.batch * args.seq / (step_ms / 1e3),
            "peak GiB/GPU": max(peaks) if cuda else None,
            "peak_gib_per_rank": peaks,
            "first loss": mean_losses[0].item(),
            "last loss": mean_losses[-1].item(),
            "grad norm": _local(norm).item(),
            "losses": mean_losses.tolist(),
            "step_ms_rank0": times_ms,
        }
    )
    del wrapped, model, opt, params, data, losses, norm
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return row


def _loss_table(rows: list[dict], steps: int) -> list[dict]:
    table = []
    for i in range(steps):
        entry: dict = {"step": i}
        for r in rows:
            if r.get("losses"):
                entry[f"{r['strategy']}/{r['variant']}"] = r["losses"][i]
        table.append(entry)
    return table


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="qwen2.5-0.5b")
    p.add_argument("--strategies", default=",".join(STRATEGIES))
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--batch", type=int, default=4, help="sequences per rank")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=20, help="steps per run; every step's loss is recorded")
    p.add_argument("--warmup", type=int, default=5, help="first steps left out of the timing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=900, help="seconds a collective may wait")
    p.add_argument("--out", default="bench/out")
    p.add_argument("--smoke", action="store_true", help="tiny config on CPU, fp32, gloo")
    args = p.parse_args(argv)
    strategies, variants = args.strategies.split(","), args.variants.split(",")
    if set(strategies) - set(STRATEGIES) or set(variants) - set(VARIANTS):
        p.error(f"strategies from {STRATEGIES}, variants from {VARIANTS}")
    if "WORLD_SIZE" not in os.environ:
        p.error("launch under torchrun, e.g. torchrun --standalone --nproc-per-node 8 bench/distributed.py")
    if args.smoke:
        args.batch, args.seq, args.steps, args.warmup = 2, 64, 4, 1
    elif not torch.cuda.is_available():
        p.error("needs a CUDA device per rank (use --smoke for a CPU run)")

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if args.smoke:
        device, backend = torch.device("cpu"), "gloo"
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["LOCAL_WORLD_SIZE"])))
    else:
        device, backend = torch.device("cuda", local_rank), "nccl"
        torch.cuda.set_device(device)
    dist.init_process_group(backend, timeout=timedelta(seconds=args.timeout))
    rank, world = dist.get_rank(), dist.get_world_size()
    rows = []
    try:
        for strategy in strategies:
            for variant in variants:
                if rank == 0:
                    print(f"== {strategy} / {variant} on {world} ranks", file=sys.stderr, flush=True)
                row = {"strategy": strategy, "variant": variant, "GPUs": world}
                try:
                    row.update(run(args, strategy, variant, device))
                except Exception as e:  # OOM, unsupported setup, ...: record it, go on with the next run
                    traceback.print_exc(file=sys.stderr)
                    row["error"] = short_error(e)
                    gc.collect()
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                errors: list[str | None] = [None] * world
                dist.all_gather_object(errors, row.get("error"))
                if any(errors) and not row.get("error"):
                    row["error"] = next(f"rank {r}: {e}" for r, e in enumerate(errors) if e)
                rows.append(row)
        if rank == 0:
            _report(args, rows, world, backend, device)
        dist.barrier()  # tear down together: a rank leaving while another works can abort gloo's threads
    finally:
        dist.destroy_process_group()


def _report(args, rows, world, backend, device) -> None:
    for r in rows:
        base = next((b for b in rows if b["strategy"] == r["strategy"] and b["variant"] == "stock"), None)
        if base is None or r.get("error") or base.get("error"):
            continue
        if r.get("tok/s/GPU") and base.get("tok/s/GPU"):
            r["× stock"] = r["tok/s/GPU"] / base["tok/s/GPU"]
        r["max |Δloss| vs stock"] = max(abs(a - b) for a, b in zip(r["losses"], base["losses"]))
    meta = {**env_info(device), "notes": list(NOTES)}
    meta.update(
        model=args.model,
        world_size=world,
        backend=backend,
        batch_per_rank=args.batch,
        seq=args.seq,
        steps=args.steps,
        warmup=args.warmup,
        seed=args.seed,
        dtype="float32" if args.smoke else "bfloat16",
        smoke=args.smoke,
        NCCL_NVLS_ENABLE=os.environ.get("NCCL_NVLS_ENABLE"),
    )
    if args.smoke:
        meta["notes"].append("smoke run: tiny config on CPU in fp32 over gloo; timings mean nothing")
    losses = ("losses", _loss_table(rows, args.steps), None)
    json_path, md_path = write_results(
        "distributed", rows, meta, args.out, columns=COLUMNS, sections=[losses]
    )
    print(markdown_table(rows, COLUMNS))
    print(f"wrote {json_path} and {md_path}", file=sys.stderr)


if __name__ == "__main__":
    main()
