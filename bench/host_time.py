"""Where an eager training step's host time goes, stock vs chronipatch (CUDA only).

    python bench/host_time.py [--model qwen2.5-0.5b] [--batch 1] [--seq 16] [--variants hf,chronipatch]
                              [--out DIR] [--smoke | --stub]

The step of bench/train.py (forward with labels, backward, clip_grad_norm_, fused AdamW, zero_grad), per
variant:

- host ms of each part, the GPU synchronised before the part starts and not after it: launch work plus any
  wait inside the part (at tiny shapes the GPU keeps up, so this is the host's own cost);
- host µs per call of each module class in the forward (inclusive, through forward hooks);
- CPU ms per step of each autograd node type in the backward (torch.profiler, which inflates all of them);
- every host sync of one step (``torch.cuda.set_sync_debug_mode``), with the file:line its warning names.

``--smoke`` runs a tiny config on CPU in fp32, to keep the script working (its figures mean nothing).
``--stub`` measures chronipatch's own Python on a machine without a GPU: the ops take their CUDA eager path on
CPU tensors with every Triton launch a no-op (outputs are garbage; the loss stays on the CPU reference), in
the model's own depth at tiny widths, fp32, where stock's CPU ops cost little. Its figures compare host
costs of one tree against another on one machine; they are not a GPU step's.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
import traceback
import warnings
from collections import Counter, defaultdict
from pathlib import Path

import torch

from common import env_info, meta_header
from models import SMOKE_CONFIG, causal_lm
from train import _optimizer, _patch

PARTS = ("forward", "backward", "clip", "optimizer")


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _step_parts(model, params, opt, ids):
    times = {}
    _sync()
    t0 = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    times["forward"] = time.perf_counter() - t0
    _sync()
    t0 = time.perf_counter()
    loss.backward()
    times["backward"] = time.perf_counter() - t0
    _sync()
    t0 = time.perf_counter()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    times["clip"] = time.perf_counter() - t0
    _sync()
    t0 = time.perf_counter()
    opt.step()
    opt.zero_grad(set_to_none=True)
    times["optimizer"] = time.perf_counter() - t0
    return times


def _module_times(model, run) -> dict[str, tuple[int, float]]:
    """(calls, inclusive µs per call) of each module class over one ``run()``."""
    stack: list[float] = []
    acc: dict[str, list] = defaultdict(lambda: [0, 0.0])

    def pre(mod, args):
        stack.append(time.perf_counter())

    def post(mod, args, out):
        entry = acc[type(mod).__name__]
        entry[0] += 1
        entry[1] += time.perf_counter() - stack.pop()

    handles = []
    for m in model.modules():
        handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return {k: (n, s / n * 1e6) for k, (n, s) in sorted(acc.items(), key=lambda kv: -kv[1][1])}


def _backward_nodes(loss) -> list[tuple[str, int, float]]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        loss.backward()
        _sync()
    prefix = "autograd::engine::evaluate_function: "
    rows = [
        (e.key[len(prefix) :], e.count, e.cpu_time_total / 1e3)
        for e in prof.key_averages()
        if e.key.startswith(prefix)
    ]
    return sorted(rows, key=lambda r: -r[2])


def _syncs(step) -> Counter:
    """The host syncs of one ``step()``: (warning text, the file:line the warning is attributed to)."""
    seen: Counter = Counter()
    if not torch.cuda.is_available():
        return seen
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step()
            torch.cuda.synchronize()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for w in caught:
        if "synchroniz" not in str(w.message):
            continue
        seen[(str(w.message).splitlines()[0][:80], f"{Path(w.filename).name}:{w.lineno}")] += 1
    return seen


def stub_kernels() -> None:
    """``--stub``: the ops' CUDA eager path on CPU tensors (``on_gpu`` true but for fp64), launches no-ops."""
    import importlib

    import triton.runtime.jit as jit

    def on_gpu(t):
        return t.dtype is not torch.float64

    for name in ("_utils", "rms_norm", "rms_norm_linear", "rope", "swiglu", "swiglu_linear"):
        importlib.import_module(f"chronipatch.ops.{name}").on_gpu = on_gpu
    # The loss and its label check stay on the CPU reference (stubbed kernels would leave garbage counts).
    for name in ("_labels", "linear_cross_entropy"):
        importlib.import_module(f"chronipatch.ops.{name}").eager_cuda = lambda *tensors: False
    importlib.import_module("chronipatch.ops._utils").num_sms = lambda index: 132
    jit.JITFunction.run = lambda self, *args, **kwargs: None


def run_variant(name: str, args) -> list[str]:
    torch.manual_seed(0)
    cpu = args.smoke or args.stub
    dev, dtype = ("cpu", torch.float32) if cpu else ("cuda", torch.bfloat16)
    # --stub keeps the model's depth (host cost is per layer) at the smoke config's widths.
    shape = {k: v for k, v in SMOKE_CONFIG.items() if not (args.stub and k == "num_hidden_layers")}
    model = causal_lm(args.model, attn_implementation="sdpa", **(shape if cpu else {}))
    model = model.to(dev, dtype).train()
    model.config._attn_implementation = "sdpa"
    _patch(model, None if name == "hf" else name)
    params = [p for p in model.parameters() if p.requires_grad]
    opt, _ = _optimizer(params)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=gen).to(dev)

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    parts = [_step_parts(model, params, opt, ids) for _ in range(args.steps)]
    med = {p: statistics.median(t[p] for t in parts) * 1e3 for p in PARTS}
    # Back to back, no sync between steps: what bench/train.py's timed loop sees.
    _sync()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    _sync()
    loop_ms = (time.perf_counter() - t0) / args.steps * 1e3
    out = [f"## {name}", ""]
    out += ["| part | host ms |", "|---|---|"]
    out += [f"| {p} | {med[p]:.2f} |" for p in PARTS]
    out += [f"| sum of parts | {sum(med.values()):.2f} |", f"| step, back to back | {loop_ms:.2f} |", ""]
    mods = _module_times(model, lambda: model(input_ids=ids, labels=ids).loss.backward())
    opt.zero_grad(set_to_none=True)
    out += ["| module (forward, inclusive) | calls | µs per call | ms per step |", "|---|---|---|---|"]
    out += [f"| {k} | {n} | {us:.1f} | {n * us / 1e3:.2f} |" for k, (n, us) in mods.items()]
    out += ["", "| backward node (profiled) | calls | CPU ms |", "|---|---|---|"]
    nodes = _backward_nodes(model(input_ids=ids, labels=ids).loss)
    opt.zero_grad(set_to_none=True)
    out += [f"| {k} | {n} | {ms:.2f} |" for k, n, ms in nodes[: args.top]]
    calls, ms = sum(r[1] for r in nodes), sum(r[2] for r in nodes)
    out += [f"| (all {len(nodes)} node types) | {calls} | {ms:.2f} |"]
    out += ["", "| host sync in one step | where | count |", "|---|---|---|"]
    out += [f"| {msg} | {where} | {n} |" for (msg, where), n in _syncs(step).most_common()]
    return [*out, ""]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="qwen2.5-0.5b")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=16)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--top", type=int, default=15)
    # chronipatch_sync_check swaps a module function for the rest of the process: name it last.
    p.add_argument("--variants", default="hf,chronipatch")
    p.add_argument("--out", default="bench/out")
    p.add_argument("--smoke", action="store_true", help="tiny config on CPU, fp32")
    p.add_argument("--stub", action="store_true", help="chronipatch's host cost on CPU, launches stubbed")
    args = p.parse_args()
    if args.smoke:
        args.steps = 2
    if args.stub:
        stub_kernels()
    meta = env_info("cpu" if args.smoke or args.stub else "cuda")
    lines = ["# host time of one eager training step", "", meta_header(meta), ""]
    for name in args.variants.split(","):
        try:
            lines += run_variant(name, args)
        except Exception:
            lines += [f"## {name}", "", "```", traceback.format_exc(), "```", ""]
        gc.collect()  # the variant's model and optimizer state, before the next one is built
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stub = "_stub" if args.stub else ""
    (out / f"host_time{stub}_b{args.batch}_t{args.seq}.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
