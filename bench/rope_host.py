"""Where an eager RoPE call's host time goes, chronipatch's against Liger's (CUDA only).

    python bench/rope_host.py [--out DIR]

At small shapes the GPU waits for the host, so ``bench/ops.py``'s wall time of RoPE is the host's time. This
prints µs per call (best of 5 rounds of 1000 calls, on tensors small enough that the GPU never holds the host
back) for each layer of one fwd + bwd, chronipatch's and Liger's side by side, the launch cost of a bare
Triton kernel by its count of runtime arguments and of RoPE's own kernel in three forms, a cProfile of 2000
fwd + bwd of each and torch.profiler's CPU table of 200, then the fwd + bwd at bench/ops.py's shape.
"""

from __future__ import annotations

import argparse
import importlib

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from chronipatch import ops
from common import write_markdown
from overhead import cprofile_calls, per_call_us

rope_mod = importlib.import_module("chronipatch.ops.rope")


@triton.jit
def _args_kernel(X, a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15, a16, a17, a18,
                 a19, a20, a21, a22, N: tl.constexpr):  # fmt: skip
    """Stores the sum of its first N integer arguments: a launch whose cost is its argument count's."""
    s = a0
    if N > 1:
        s += a1 + a2 + a3 + a4 + a5 + a6 + a7
    if N > 8:
        s += a8 + a9 + a10 + a11 + a12 + a13 + a14 + a15
    if N > 16:
        s += a16 + a17 + a18 + a19 + a20 + a21 + a22
    tl.store(X, s)


@triton.jit
def _ptrs_kernel(P0, P1, P2, P3, P4, P5, a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15,
                 a16, a17, a18, a19, B0: tl.constexpr, B1: tl.constexpr, B2: tl.constexpr):  # fmt: skip
    """RoPE's kernel's signature (6 pointers, 20 integers, constexprs) around a one-element store."""
    s = a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7 + a8 + a9 + a10 + a11 + a12 + a13 + a14 + a15 + a16 + a17
    tl.store(P0, (s + a18 + a19 + B0 + B1 + B2).to(P0.dtype.element_ty))


class _Plain(torch.autograd.Function):
    """chronipatch's eager RoPE Function, its backward without the device check."""

    forward = staticmethod(rope_mod._RoPEEager.forward)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        return *rope_mod._direct_fwd(dq, dk, cos, sin, backward=True), None, None, None


class _Guarded(torch.autograd.Function):
    """chronipatch's eager RoPE Function, its backward always through torch's ``once_differentiable`` (its
    ``no_grad`` context on every call), as before 8b75618."""

    forward = staticmethod(rope_mod._RoPEEager.forward)
    backward = staticmethod(once_differentiable(rope_mod._RoPEEager.backward.__wrapped__))


def arg_count_rows(dev) -> list[tuple[str, float]]:
    """A bare launch with 1 pointer and n integers (the rest passed as constexpr None)."""
    x = torch.zeros(1, device=dev, dtype=torch.int64)
    rows = []
    for n in (1, 8, 16, 23):
        ints = [16 * (i + 3) for i in range(n)] + [None] * (23 - n)

        def launch(ints=ints, n=n):
            _args_kernel[(1,)](x, *ints, N=n)

        rows.append((f"bare launch, 1 pointer + {n} ints", launch))
    return rows


def layer_rows(dev, b: int, t: int) -> list[tuple[str, object]]:
    from liger_kernel.ops.rope import LigerRopeFunction, _triton_rope, rope_forward

    bf = dict(device=dev, dtype=torch.bfloat16)
    hq, hk, d = 14, 2, 64
    # As bench/ops.py and HF lay them out: [B, H, T, D] views of [B, T, H, D], the leaves of the graph.
    q, k = (torch.randn(b, t, h, d, **bf).transpose(1, 2).requires_grad_() for h in (hq, hk))
    ql, kl = (x.detach().clone(memory_format=torch.preserve_format).requires_grad_() for x in (q, k))
    cos, sin = torch.randn(1, t, d, **bf), torch.randn(1, t, d, **bf)
    dq, dk = torch.randn(b, hq, t, d, **bf), torch.randn(b, hk, t, d, **bf)
    qd, kd = q.detach(), k.detach()
    rope_triton, eager_cuda = rope_mod.rope_triton, rope_mod.eager_cuda
    qo, ko = (torch.empty(b, t, x.shape[1], d, **bf) for x in (q, k))
    sq, sk, sqo, sko = (x.stride() for x in (qd, kd, qo.transpose(1, 2), ko.transpose(1, 2)))
    tokens, warps = rope_mod._launch_shape(16 + 2, 64)
    kern = rope_mod._rope_kernel
    lq, lk = (x.detach().transpose(1, 2).contiguous() for x in (q, k))

    def ours_raw():
        kern[(triton.cdiv(b * t, tokens),)](
            qd, kd, cos, sin, qo, ko, b * t, t, *sq[:3], *sk[:3], *sqo[:3], *sko[:3], 0, d, 0, d, hq, hk,
            D=d, BLOCK_HQ=16, BLOCK_HK=2, BLOCK_D=64, TOKENS=tokens, BACKWARD=False, num_warps=warps,
        )  # fmt: skip

    args = (qd, kd, cos, sin, qo, ko, b * t, t, *sq[:3], *sk[:3], *sqo[:3], *sko[:3], 0, d, 0, d, hq, hk)
    consts = dict(D=d, BLOCK_HQ=16, BLOCK_HK=2, BLOCK_D=64, TOKENS=tokens, BACKWARD=False)
    grid = (triton.cdiv(b * t, tokens),)
    ints = [16 * (i + 3) for i in range(20)]

    def variant_rows():
        return [
            ("ours: bare launch, args in one tuple", lambda: kern[grid](*args, **consts, num_warps=warps)),
            ("ours: bare launch, args in one tuple, no num_warps", lambda: kern[grid](*args, **consts)),
            ("6 pointers + 20 ints + 3 constexprs, bare launch", lambda: _ptrs_kernel[grid](
                qo, kd, cos, sin, qd, ko, *ints, B0=1, B1=2, B2=3)),
        ]  # fmt: skip

    def liger_raw():
        _triton_rope[(b * t,)](
            lq, lq.stride(1), lk, lk.stride(1), cos, cos.stride(-2), sin, sin.stride(-2), t, b, 1, hq, hk, d,
            16, 2, 64, 64, 64, BLOCK_SIZE=16, BACKWARD_PASS=False,
        )  # fmt: skip

    def ours_fwd_bwd():
        q.grad = k.grad = None
        torch.autograd.backward(ops.rope(q, k, cos, sin), (dq, dk))

    def liger_fwd_bwd():
        ql.grad = kl.grad = None
        # As bench/ops.py calls it: Liger rotates the leaves' memory in place (values drift; timing only).
        torch.autograd.backward(LigerRopeFunction.apply(ql, kl, cos, sin), (dq, dk))

    def ours_plain_fwd_bwd():
        q.grad = k.grad = None
        torch.autograd.backward(_Plain.apply(q, k, cos, sin, False), (dq, dk))

    def ours_guarded_fwd_bwd():
        q.grad = k.grad = None
        torch.autograd.backward(_Guarded.apply(q, k, cos, sin, False), (dq, dk))

    def ours_fwd():
        ops.rope(q, k, cos, sin)

    def liger_fwd():
        LigerRopeFunction.apply(lq, lk, cos, sin)

    def allocs():
        return [torch.empty(b, t, x.shape[1], d, **bf).transpose(1, 2) for x in (q, k)]

    return [
        *variant_rows(),
        ("torch.empty x2 + transpose x2", allocs),
        ("_fits + eager_cuda", lambda: rope_mod._fits(q, k, cos, sin) and eager_cuda(q, k, cos, sin)),
        ("ours: bare JIT launch (args prebuilt)", ours_raw),
        ("liger: bare JIT launch (args prebuilt)", liger_raw),
        ("ours: rope_triton (launcher, no autograd)", lambda: rope_triton(qd, kd, cos, sin, wrap=False)),
        ("liger: rope_forward (launcher, no autograd)", lambda: rope_forward(lq, lk, cos, sin)),
        ("ours: ops.rope fwd (graph dropped)", ours_fwd),
        ("liger: LigerRopeFunction fwd (graph dropped)", liger_fwd),
        ("ours: ops.rope fwd+bwd", ours_fwd_bwd),
        ("ours: fwd+bwd, backward without the device check", ours_plain_fwd_bwd),
        ("ours: fwd+bwd, backward through torch's once_differentiable", ours_guarded_fwd_bwd),
        ("liger: fwd+bwd", liger_fwd_bwd),
    ]


def op_table(fn, n: int = 200) -> str:
    """torch.profiler's CPU-side table over ``n`` calls: the autograd engine's nodes and the aten ops that
    cProfile cannot see (AccumulateGrad's copies, allocations, launches)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cpu_time_total", row_limit=30)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench/out")
    args = p.parse_args()
    dev = torch.device("cuda")
    rows = layer_rows(dev, 1, 16)
    lines = ["## host µs per call (best of 5 x 1000), B1 T16 q14/k2 d64 bf16", ""]
    for name, fn in [*arg_count_rows(dev), *rows]:
        for _ in range(20):
            fn()
        lines.append(f"| {name} | {per_call_us(fn):.1f} |")
    named = dict(rows)
    for name in ("ours: ops.rope fwd+bwd", "liger: fwd+bwd"):
        lines += ["", f"## cProfile, 2000 x {name}", "```", cprofile_calls(named[name], rows=25), "```"]
        lines += ["", f"## torch.profiler (CPU), 200 x {name}", "```", op_table(named[name]), "```"]
    big = dict(layer_rows(dev, 4, 2048))
    lines += ["", "## host µs per call, B4 T2048 q14/k2 d64 (bench/ops.py's shape; the GPU may bound it)", ""]
    names = ["ours: ops.rope fwd+bwd", "ours: fwd+bwd, backward through torch's once_differentiable"]
    for name in (*names, "liger: fwd+bwd", "ours: ops.rope fwd (graph dropped)"):
        fn = big[name]
        for _ in range(20):
            fn()
        lines.append(f"| {name} | {per_call_us(fn, n=300):.1f} |")
    print("\n".join(lines))
    write_markdown("rope_host", lines, args.out)


if __name__ == "__main__":
    main()
