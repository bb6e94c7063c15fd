"""Host time of the eager bf16 loss before its first tile kernel, on a machine without a GPU.

    python bench/lce_host.py [--rows 512] [--hidden 64] [--vocab 4096] [--calls 300]

After the label check's host sync the GPU has only what was queued before it (the check, and the one pass's
``rows_prep``: references, label order, slot map): every host step between that sync and the first tile
launch beyond that work's GPU time is GPU idle time in an isolated call (a patched model prefetches the check
and keeps its queue full). This runs ``ops.linear_cross_entropy``'s CUDA eager path on CPU bf16 tensors with
every Triton launch a no-op (the label counts stubbed to "all valid"; the check's pinned copy and CUDA event
stood in for), and reports the median µs from the call to the first ``_fwd_tiles_kernel`` launch and, where
the check waits on its event, from that wait, the launches in order (the wait as ``|wait|``) and the
top-level ATen ops of one call. Compare trees on one machine; the figures are the CPU's, not a GPU host's, and
leave out Triton's own host cost per launch (argument binding, cache lookup; tens of µs), which a tree
launching more Triton kernels pays more of.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import time

import torch
import triton.runtime.jit as jit
from torch.profiler import ProfilerActivity, profile

from chronipatch import ops


def stub(rows: int) -> list[tuple[float, str]]:
    """The loss's modules take their CUDA path on CPU tensors; launches recorded (time, kernel), not run."""
    for name in ("_utils", "linear_cross_entropy", "_lce_rows", "_lce_tiles"):
        mod = importlib.import_module(f"chronipatch.ops.{name}")
        if hasattr(mod, "on_gpu"):
            mod.on_gpu = lambda t: t.dtype is not torch.float64
    importlib.import_module("chronipatch.ops._utils").num_sms = lambda index: 132
    labels = importlib.import_module("chronipatch.ops._labels")
    counts, clean = getattr(labels, "_counts_by_kernel", None), torch.tensor([0, rows, 0, 0])

    def clean_counts(*args):
        return counts(*args).copy_(clean)  # the launch's host cost, then counts of valid labels

    if counts is not None:  # a tree that counts in torch runs its ops for real
        labels._counts_by_kernel = clean_counts
    launches = []

    class Event:  # the check's CUDA event: its wait recorded
        def record(self, stream=None):
            pass

        def synchronize(self):
            launches.append((time.perf_counter(), "|wait|"))

    torch.cuda.Event, torch.cuda.current_stream = Event, lambda device=None: None
    real_empty = torch.empty
    torch.empty = lambda *a, pin_memory=False, **k: real_empty(*a, **k)  # pinned memory: plain
    lce = importlib.import_module("chronipatch.ops.linear_cross_entropy")
    if hasattr(lce, "prefetch_label_check"):  # a tree that starts the check at the call (CUDA labels only)
        lce.prefetch_label_check = lambda y, v, ignore_index=-100, shift=True, items=None: labels._start(
            y, v, ignore_index, shift, items
        )

    def record(self, *args, **kwargs):
        launches.append((time.perf_counter(), self.fn.__name__))

    jit.JITFunction.run = record
    return launches


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=512)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--calls", type=int, default=300)
    args = p.parse_args()
    launches = stub(args.rows)
    torch.manual_seed(0)
    x = torch.randn(args.rows, args.hidden, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(args.vocab, args.hidden, dtype=torch.bfloat16, requires_grad=True)
    y = torch.randint(0, args.vocab, (args.rows,))

    def call() -> tuple[float, float | None]:
        launches.clear()
        t0 = time.perf_counter()
        ops.linear_cross_entropy(x, w, y, shift=False).backward()
        tile = next(t for t, name in launches if name == "_fwd_tiles_kernel")
        wait = next((t for t, name in launches if name == "|wait|"), None)
        return (tile - t0) * 1e6, None if wait is None else (tile - wait) * 1e6

    for _ in range(20):
        call()
    times = [call() for _ in range(args.calls)]
    us = statistics.median(t for t, _ in times)
    print(f"to the first tile launch: {us:.0f} us (median of {args.calls})")
    if times[0][1] is not None:
        wait_us = statistics.median(w for _, w in times)
        print(f"from the check's wait to the first tile launch: {wait_us:.0f} us")
    print("launches:", " ".join(name for _, name in launches))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        ops.linear_cross_entropy(x, w, y, shift=False)

    def aten(e) -> bool:
        return e is not None and e.name.startswith("aten::")

    top = [e.name[6:] for e in prof.events() if aten(e) and not aten(e.cpu_parent)]
    print(f"{len(top)} top-level ATen ops:", " ".join(top))


if __name__ == "__main__":
    main()
