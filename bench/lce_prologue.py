"""GPU time of the loss's steps before its first tile: each kernel against the torch ops it replaced.

    python bench/lce_prologue.py [--out DIR] [--smoke]

- label counts (``_labels.label_counts`` on CUDA: one program) against the torch ops that counted before,
  at 8,192, 1M and 16M labels;
- the rows' references (``_lce_refs.row_references``: one kernel and the sampled rows' norms) against
  cuBLAS's sampled GEMM and torch's norms, outer product and max, at the loss's shapes of ``bench/ops.py``
  and fewer rows.

Each figure is the median of ``triton.testing.do_bench`` (L2 flushed between calls); every pair is checked
for equal results (the counts exactly, the references to fp32 summation order). ``--smoke`` runs tiny shapes
through the Triton interpreter on CPU (its figures mean nothing).
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from functools import partial
from pathlib import Path

if "--smoke" in sys.argv:  # before triton is imported: its kernels then run on CPU tensors
    os.environ["TRITON_INTERPRET"] = "1"

import torch

from chronipatch.ops._utils import addmm_acc
from common import env_info, meta_header, smoke_args

labels_mod = importlib.import_module("chronipatch.ops._labels")
torch_counts = labels_mod._counts_by_torch  # the torch ops the kernel replaced, as CPU tensors still run them
refs_mod = importlib.import_module("chronipatch.ops._lce_refs")


def torch_references(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The rows' references as cuBLAS and torch computed them before the kernel."""
    sample = weight[:: max(1, weight.shape[0] // refs_mod.SAMPLES)][: refs_mod.SAMPLES]
    z = torch.zeros(hidden.shape[0], sample.shape[0], dtype=torch.float32, device=hidden.device)
    addmm_acc(z, hidden, sample.T)
    norms = (torch.linalg.vector_norm(t, dim=1, dtype=torch.float32) for t in (hidden, sample))
    bound = torch.outer(*norms).mul_(4 * hidden.shape[1] * 2.0**-24)
    k = z.sub_(bound).amax(dim=1)
    k -= refs_mod.REF_SPREAD * refs_mod.row_offsets(k.shape[0], k.device)
    return torch.where(k == float("inf"), float("nan"), k)


def main() -> None:
    args, dev = smoke_args(__doc__)
    if args.smoke:

        def ms(fn) -> float:
            fn()
            return float("nan")
    else:
        from triton.testing import do_bench

        def ms(fn) -> float:
            return do_bench(fn, warmup=25, rep=100, return_mode="median")

    torch.manual_seed(0)
    out = {"meta": env_info(dev), "counts": [], "references": []}
    for n in (64, 4099) if args.smoke else (8192, 1 << 20, 1 << 24):
        vocab = 151936
        flat = torch.randint(0, vocab, (n,), device=dev)
        flat[torch.rand(n, device=dev) < 0.3] = -100
        flat[n // 2] = vocab + 5  # one bad label: the first-index logic at work
        got = labels_mod._counts_by_kernel(flat, vocab, -100, None)
        assert got.tolist() == torch_counts(flat, vocab, -100, None).tolist(), (got, n)
        row = {"labels": n, "kernel_ms": ms(partial(labels_mod._counts_by_kernel, flat, vocab, -100, None))}
        row["torch_ms"] = ms(partial(torch_counts, flat, vocab, -100, None))
        out["counts"].append(row)
        print(row, flush=True)
    shapes = ((64, 32, 1000), (65, 24, 777)) if args.smoke else (
        (8192, 896, 151936), (2048, 896, 151936), (8192, 2048, 128256), (8192, 4096, 128256)
    )  # fmt: skip
    for n, h, v in shapes:
        hidden = torch.randn(n, h, device=dev, dtype=torch.bfloat16)
        weight = (torch.randn(v, h, device=dev) * h**-0.5).to(torch.bfloat16)
        got, want = refs_mod.row_references(hidden, weight), torch_references(hidden, weight)
        err = (got - want).abs().max().item()
        assert err <= 1e-3 * want.abs().max().item() + 1e-4, (err, n, h, v)
        row = {"shape": f"{n}x{h} V={v}", "max_abs_diff": err}
        row["kernel_ms"] = ms(partial(refs_mod.row_references, hidden, weight))
        row["torch_ms"] = ms(partial(torch_references, hidden, weight))
        out["references"].append(row)
        print(row, flush=True)
    dest = Path(args.out)
    dest.mkdir(parents=True, exist_ok=True)
    lines = [meta_header(out["meta"]), "", "| labels | kernel ms | torch ms |", "|---:|---:|---:|"]
    lines += [f"| {r['labels']:,} | {r['kernel_ms']:.4f} | {r['torch_ms']:.4f} |" for r in out["counts"]]
    lines += ["", "| rows x H, V | kernel ms | torch ms | max diff |", "|---|---:|---:|---:|"]
    lines += [
        f"| {r['shape']} | {r['kernel_ms']:.4f} | {r['torch_ms']:.4f} | {r['max_abs_diff']:.2e} |"
        for r in out["references"]
    ]
    suffix = "_smoke" if args.smoke else ""
    (dest / f"lce_prologue{suffix}.json").write_text(json.dumps(out, indent=1))
    (dest / f"lce_prologue{suffix}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
