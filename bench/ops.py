"""Forward+backward benchmark of chronipatch's ops against HF eager, torch.compile, Liger and CCE.

For every case and implementation it records the median fwd+bwd time, a roofline floor, the extra
peak memory of one fwd+bwd call, and the max abs error of the output and of the input gradient(s)
against HF eager run in fp32 on upcast inputs. What is run (inputs, floors, one maker per implementation, the
shapes) is the table in ``ops_table.py``.

    python bench/ops.py [--smoke] [--ops rms_norm,rope,swiglu,lce] [--impls ...] [--out bench/out]

``--smoke`` uses tiny shapes and a few reps and runs on CPU (perf_counter timing, no memory figures).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import ops_table as table
from common import env_info, kernel_ms, peak_extra_bytes, short_error, sync, timeit, write_results

IMPLS = (
    "hf_eager",
    "hf_compile",
    "liger",
    "cce",
    "chronipatch",
    "chronipatch_compile",
    "chronipatch_prefetched",
)
COMPILED = {"hf_compile": "hf_eager", "chronipatch_compile": "chronipatch"}
COLUMNS = (
    "op",
    "shape",
    "impl",
    "ms",
    "gpu_ms",
    "floor_ms",
    "pct_floor",
    "peak_extra_MiB",
    "grads_MiB",
    "fwd_err",
    "grad_err",
)
COLUMNS += ("first_call_s", "note")

NOTES = [
    "pct_floor = 100 · floor_ms / ms",
    "gpu_ms: device time of all kernels one fwd+bwd launches (torch.profiler, mean of 10 back-to-back calls,"
    " L2 warm): the call's cost inside a training step whose CPU runs ahead; ms also counts launch gaps and"
    " host overhead, which dominate the small ops at these sizes",
    "peak_extra_MiB: max_memory_allocated during one fwd+bwd minus what was allocated before it, with no"
    " gradients allocated before it: inputs and weights excluded, the input/weight gradients it allocates"
    " included (grads_MiB of them; peak_extra_MiB - grads_MiB is the call's scratch at its peak, at most)",
    "fwd_err / grad_err: max |out − ref| and max |d input − ref| (rope: dq and dk; swiglu: dgate and"
    " dup; else dx / dhidden), ref = HF eager in fp32 on the same inputs upcast, same upstream grad",
    "first_call_s: first fwd+bwd call, includes torch.compile and Triton autotuning",
    "each implementation gets fresh inputs with the same values. Liger as shipped: LigerRMSNorm in_place=True"
    " (writes dx into dy), liger rope rotates q/k in place, liger swiglu backward writes the grads into"
    " gate/up; cut-cross-entropy: impl named in the note (25.1.1 has no cce_exact; its default filters"
    " small gradient entries)",
    "chronipatch_prefetched (the loss): the eager op given a label check prefetched once before timing, as"
    " ``apply``'s CausalLM forward takes it before the backbone; chronipatch's own column runs the check at"
    " the call, whose host sync drains the GPU queue and leaves the launches after it exposed",
]


def _floor_note(measured: bool) -> str:
    source = "the card's read+write rate in a 1 GiB copy" if measured else "an H100's"
    return (
        f"floor: memory-bound ops = bytes moved / {table.HBM_BYTES_PER_S:.3g} B/s ({source}), counting"
        " rms_norm fwd x,w -> y,rstd(fp32) + bwd dy,x,w,rstd -> dx,dw; rope fwd q,k,cos,sin -> q',k' + bwd"
        " dq',dk',cos,sin -> dq,dk; swiglu fwd g,u -> h + bwd dh,g,u -> dg,du. Matmul-bound:"
        f" swiglu_mlp 18·M·H·I FLOPs, lce 6·N·H·V FLOPs, at {table.BF16_FLOP_PER_S:.3g} FLOP/s"
    )


def copy_bytes_per_s(dev: torch.device) -> float:
    """Bytes read + written per second by a 1 GiB device-to-device copy (median): the byte floor's rate."""
    src = torch.empty(1 << 29, dtype=torch.int16, device=dev)
    dst = torch.empty_like(src)
    ms = timeit(lambda: dst.copy_(src), device=dev)
    return 2 * src.nbytes / (ms * 1e-3)


# ---- running ------------------------------------------------------------------------------------------


def _outs(o) -> list[torch.Tensor]:
    return list(o) if isinstance(o, (tuple, list)) else [o]


def _to32(a: torch.Tensor) -> torch.Tensor:
    if not a.is_floating_point():
        return a
    t = a.detach().float()
    return nn.Parameter(t) if isinstance(a, nn.Parameter) else t.requires_grad_(a.requires_grad)


def _maxerr(xs, refs) -> float:
    return max(float((x.detach().float() - r).abs().max()) for x, r in zip(xs, refs))


def _inputs(op: table.Op, dims, dev, dtype) -> list:
    torch.manual_seed(0)  # same values for every implementation
    return op.build(dims, dev, dtype)


def run_case(name: str, dims: tuple, dev, dtype, impls, warmup, rep, rounds: int = 1) -> list[dict]:
    """One row per implementation. With ``rounds`` > 1 its ``ms`` is the median of that many do_bench medians,
    the implementations timed in turn round by round once all are built, so that a host whose speed drifts
    during the case weighs on every implementation alike."""
    op = table.OPS[name]
    args32 = [_to32(a) for a in _inputs(op, dims, dev, dtype)]
    ref = _outs(op.makers["hf_eager"](args32, dev)(*args32))
    g32 = [torch.ones_like(o) if o.dim() == 0 else torch.randn_like(o) for o in ref]
    torch.autograd.backward(ref, g32)
    ref, ref_grads = [o.detach() for o in ref], [args32[i].grad for i in op.grad_idx]
    del args32
    floor_ms = op.floor(dims, torch.finfo(dtype).bits // 8) * 1e3
    rows, kept = [], {}
    for impl in impls:
        row = dict.fromkeys(COLUMNS)
        row.update(op=name, shape=op.label.format(*dims), impl=impl, floor_ms=floor_ms, note="")
        rows.append(row)
        maker = op.makers.get(COMPILED.get(impl, impl))
        if maker is None:
            row["note"] = "n/a"
            continue
        # Fresh inputs per implementation: Liger writes into its inputs (rope: q/k, swiglu bwd: gate/up).
        fn = step = outs = None
        args = _inputs(op, dims, dev, dtype)
        leaves = [a for a in args if a.requires_grad]
        try:
            fn = maker(args, dev)
            row["note"] = getattr(fn, "note", "")
            if impl in COMPILED:
                torch._dynamo.reset()
                fn = torch.compile(fn, dynamic=False)
            t0 = time.perf_counter()
            outs = _outs(fn(*args))
            grads = [g.to(o.dtype) for g, o in zip(g32, outs)]
            torch.autograd.backward(outs, [g.clone() for g in grads])  # clone: Liger may write into dy
            sync(dev)
            row["first_call_s"] = time.perf_counter() - t0
            row["fwd_err"] = _maxerr(outs, ref)
            row["grad_err"] = _maxerr([args[i].grad for i in op.grad_idx], ref_grads)

            def step(fn=fn, grads=grads, args=args, leaves=leaves):
                for a in leaves:
                    a.grad = None
                torch.autograd.backward(_outs(fn(*args)), grads)

            # The first call's gradients go first: a step frees them before allocating its own, which would
            # net the gradients out of the peak (the peers' figures in notes/measured.md count them).
            row["grads_MiB"] = sum(a.grad.nbytes for a in leaves if a.grad is not None) / 2**20
            for a in leaves:
                a.grad = None
            mem = peak_extra_bytes(step, dev)
            row["peak_extra_MiB"] = None if mem is None else mem / 2**20
            if rounds > 1:
                kept[impl] = (row, step)  # timed below, in turn with the others
            else:
                row["ms"] = timeit(step, warmup, rep, dev)
            try:
                row["gpu_ms"] = kernel_ms(step, dev)
            except Exception as e:  # the timing above stands without it
                row["note"] = f"gpu_ms: {short_error(e)}"
            if row["ms"] is not None:
                row["pct_floor"] = 100 * floor_ms / row["ms"]
        except table.Skip as e:
            row["note"] = f"skipped: {e}"
        except Exception as e:
            msg = (str(e).strip().splitlines() or [""])[0][:200]
            row["note"] = f"error: {type(e).__name__}: {msg}"
        del fn, step, outs, args, leaves
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        ms = "(timed in the rounds below)" if impl in kept else row["ms"]
        print(f"  {name:10s} {row['shape']:24s} {impl:20s} ms={ms} {row['note']}", flush=True)
    times = {impl: [] for impl in kept}
    for _ in range(rounds if kept else 0):
        for impl, (row, step) in kept.items():
            try:
                times[impl].append(timeit(step, warmup, rep, dev))
            except Exception as e:  # the row keeps what the other rounds measured
                row["note"] = f"a round failed: {short_error(e)}"
    for impl, (row, _) in kept.items():
        if times[impl]:
            row["ms"] = statistics.median(times[impl])
            row["pct_floor"] = 100 * floor_ms / row["ms"]
            print(f"  {name:10s} {row['shape']:24s} {impl:20s} ms={row['ms']} rounds={times[impl]}")
    del kept
    torch._dynamo.reset()
    return rows


def dispatch_overhead(dev, dtype, n=1000) -> list[dict]:
    """µs per eager call of ops.rms_norm on a tiny tensor vs a trivial torch op (best of 5 loops)."""
    x, w = torch.randn(8, 64, device=dev, dtype=dtype), torch.ones(64, device=dev, dtype=dtype)
    xg, ops = x.clone().requires_grad_(), table._cp()
    registered = importlib.import_module("chronipatch.ops.rms_norm")._rms_norm  # the custom op itself
    calls = {
        "x * 1.0": lambda: x * 1.0,
        "ops.rms_norm(x, w, 1e-6)": lambda: ops.rms_norm(x, w, table.EPS),
        "ops.rms_norm(x, w, 1e-6), x requires grad": lambda: ops.rms_norm(xg, w, table.EPS),
        "the registered op, x requires grad (custom-op dispatch)": lambda: registered(xg, w, table.EPS),
    }
    rows = []
    for label, f in calls.items():
        best = float("inf")
        for _ in range(5):
            f()
            sync(dev)
            t0 = time.perf_counter()
            for _ in range(n):
                f()
            sync(dev)
            best = min(best, (time.perf_counter() - t0) / n * 1e6)
        rows.append({"call": label, "shape": "[8, 64]", "device": str(dev), "us_per_call": best})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, few reps, runs on CPU")
    ap.add_argument("--ops", default="rms_norm,rms_norm_linear,rope,swiglu,lce", help="comma list of groups")
    ap.add_argument("--impls", default=",".join(IMPLS), help=f"comma list: {','.join(IMPLS)}")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--out", default="bench/out")
    ap.add_argument(
        "--rounds", type=int, default=3, help="interleaved timing rounds of each case but the loss's (median)"
    )
    args = ap.parse_args()
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16
    warmup, rep = (2, 10) if args.smoke else (25, 100)
    groups, impls = set(args.ops.split(",")), [i for i in IMPLS if i in args.impls.split(",")]
    timer = "triton do_bench (L2 flushed)" if dev.type == "cuda" else "time.perf_counter, 1 CPU thread"
    if dev.type == "cpu":
        torch.set_num_threads(1)  # tiny CPU shapes: thread wake-ups would dominate and swing the medians
    meta = env_info(dev)
    if dev.type == "cuda":
        table.HBM_BYTES_PER_S = copy_bytes_per_s(dev)
    meta.update(
        dtype=str(dtype),
        smoke=args.smoke,
        warmup_ms=warmup,
        rep_ms=rep,
        floor_bytes_per_s=table.HBM_BYTES_PER_S,
    )
    meta["notes"] = [
        f"{dtype}; ms = median of one forward + backward (fixed random upstream grad, ones for the loss),"
        f" timed with {timer}, warmup {warmup} ms, rep {rep} ms; every case but the loss's: the median of"
        f" {args.rounds} such medians, the implementations timed in turn round by round",
        _floor_note(measured=dev.type == "cuda"),
        *NOTES,
    ]
    extra = []
    if "rms_norm" in groups and "chronipatch" in impls:
        title = "chronipatch eager dispatch overhead (µs per call, 1000 calls, best of 5)"
        try:
            extra.append((title, dispatch_overhead(dev, dtype), None))
        except table.Skip as e:
            print(f"dispatch overhead skipped: {e}")
    rows = []
    for name, dims in table.SMOKE_CASES if args.smoke else table.CASES:
        if table.OPS[name].group in groups:
            # The loss's cases hold GBs per implementation and run GPU-bound: timed once, one after another.
            rounds = 1 if table.OPS[name].group == "lce" else max(1, args.rounds)
            rows += run_case(name, dims, dev, dtype, impls, warmup, rep, rounds)
            # Written after every case: a run cut short keeps what it measured.
            sections = _pivots(rows, impls, gpu=dev.type == "cuda") + extra
            json_path, md_path = write_results(
                "ops", rows, meta, args.out, columns=COLUMNS, sections=sections
            )
    print(Path(md_path).read_text())
    print(f"wrote {json_path} and {md_path}")


def _pivots(rows: list[dict], impls: list[str], gpu: bool) -> list:
    """A table per timing (median ms; on CUDA also kernel GPU time): a row per case, a column per impl."""
    sections = []
    for key, title in (("ms", "median fwd+bwd ms"), ("gpu_ms", "GPU time per fwd+bwd, ms (kernels only)")):
        if key == "gpu_ms" and not gpu:
            continue
        wide: dict[tuple[str, str], dict] = {}
        for r in rows:
            w = wide.setdefault((r["op"], r["shape"]), {k: r[k] for k in ("op", "shape", "floor_ms")})
            w[r["impl"]] = r[key] if r[key] is not None else r["note"].split(":")[0]
        sections.append((title, list(wide.values()), ["op", "shape", "floor_ms", *impls]))
    return sections


if __name__ == "__main__":
    main()
