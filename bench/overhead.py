"""Where an eager call's host time goes, and where the loss's GPU time goes (CUDA only).

    python bench/overhead.py [--out DIR]

Prints µs per call (best of 5 rounds of 1000 calls) for the layers of an eager ``ops.rms_norm`` call, from a
bare Triton launch up to forward + backward through autograd; a cProfile of 2000 forward + backward calls;
and the kernels of one ``linear_cross_entropy`` forward + backward at 8192 x 896, V = 151,936 (bf16).
"""

from __future__ import annotations

import argparse
import cProfile
import importlib
import io
import pstats
import time

import torch

from chronipatch import ops
from common import write_markdown

rms_mod = importlib.import_module("chronipatch.ops.rms_norm")  # the module (ops.rms_norm is the function)


def per_call_us(fn, n: int = 1000, rounds: int = 5) -> float:
    best = float("inf")
    for _ in range(rounds):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / n)
    return best * 1e6


def launch_table(dev) -> list[tuple[str, float]]:
    x = torch.randn(8, 64, device=dev, dtype=torch.bfloat16)
    w = torch.randn(64, device=dev, dtype=torch.bfloat16)
    xg = x.clone().requires_grad_()
    y, rstd = torch.empty_like(x), torch.empty(8, device=dev)
    kern = rms_mod._fwd_kernel

    def raw():
        kern[(1,)](x, w, y, rstd, x, y, 64, 64, 64, 8, 64, 1e-6, BLOCK_N=64, ROWS=16, ADD=False, num_warps=4)

    def launcher():
        rms_mod.rms_norm_fwd_triton(x, w, 1e-6, wrap=False)

    def device_ctx():
        with torch.cuda.device(x.device):
            pass

    def fwd_bwd():
        ops.rms_norm(xg, w, 1e-6).sum().backward()

    def hf_like_bwd():
        (xg * 1.0).sum().backward()

    rows = [
        ("x * 1.0", lambda: x * 1.0),
        ("torch.empty_like x2", lambda: (torch.empty_like(x), torch.empty(8, device=dev))),
        ("with torch.cuda.device(x.device)", device_ctx),
        ("raw JIT launch kern[grid](...)", raw),
        ("rms_norm_fwd_triton (launcher)", launcher),
        ("_direct_fwd (launcher + device check)", lambda: rms_mod._direct_fwd(x, w, 1e-6)),
        ("ops.rms_norm(x, w) no grad", lambda: ops.rms_norm(x, w, 1e-6)),
        ("(x*1).sum().backward() (autograd floor)", hf_like_bwd),
        ("ops.rms_norm fwd+bwd", fwd_bwd),
        *_hf_vs_ops(dev),
    ]
    out = []
    for name, fn in rows:
        for _ in range(20):
            fn()
        out.append((name, per_call_us(fn)))
    return out


def _hf_vs_ops(dev) -> list:
    """fwd+bwd of each small op and of the stock math it replaces, on tiny tensors (host time only)."""
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm, apply_rotary_pos_emb

    bf = dict(device=dev, dtype=torch.bfloat16)
    x = torch.randn(8, 64, **bf, requires_grad=True)
    norm = Qwen2RMSNorm(64).to(**bf)
    g, u = (torch.randn(8, 64, **bf, requires_grad=True) for _ in range(2))
    q = torch.randn(1, 8, 4, 2, 16, **bf).transpose(1, 2)[..., 0, :].requires_grad_()  # [1, 4, 8, 16] view
    k = torch.randn(1, 2, 8, 16, **bf, requires_grad=True)
    cos, sin = torch.randn(1, 8, 16, **bf), torch.randn(1, 8, 16, **bf)

    def back(*outs):
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])

    return [
        ("HF RMSNorm fwd+bwd", lambda: back(norm(x))),
        ("ops.rms_norm fwd+bwd (module weight)", lambda: back(ops.rms_norm(x, norm.weight, 1e-6))),
        ("F.silu(g) * u fwd+bwd", lambda: back(torch.nn.functional.silu(g) * u)),
        ("ops.swiglu fwd+bwd", lambda: back(ops.swiglu(g, u))),
        ("HF apply_rotary_pos_emb fwd+bwd", lambda: back(*apply_rotary_pos_emb(q, k, cos, sin))),
        ("ops.rope fwd+bwd", lambda: back(*ops.rope(q, k, cos, sin))),
    ]


def cprofile_calls(fn, n: int = 2000, rows: int = 30) -> str:
    """cProfile of ``n`` calls of ``fn`` after 20 warm-up calls, its ``rows`` costliest by own time."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    prof.disable()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(rows)
    return s.getvalue()


def profile_calls(dev) -> str:
    x = torch.randn(8, 64, device=dev, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(64, device=dev, dtype=torch.bfloat16, requires_grad=True)
    return cprofile_calls(lambda: ops.rms_norm(x, w, 1e-6).sum().backward())


def lce_kernels(dev) -> str:
    from torch.profiler import ProfilerActivity, profile

    n, h, v = 8192, 896, 151936
    g = torch.Generator(device=dev).manual_seed(0)
    hid = (torch.randn(n, h, device=dev, generator=g) * 0.5).bfloat16().requires_grad_()
    wt = (torch.randn(v, h, device=dev, generator=g) * 0.05).bfloat16().requires_grad_()
    lab = torch.randint(0, v, (n,), device=dev, generator=g)

    def step():
        ops.linear_cross_entropy(hid, wt, lab, shift=False).backward()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=20)


def sdpa_layouts(dev) -> list[tuple[str, float]]:
    """HF's SDPA with a padding mask (as padded SFT batches run it), q laid out as stock's RoPE leaves it
    (contiguous [B, H, T, D]) or as a [B, H, T, D] view of [B, T, H, D]; fwd + bwd, ms (do_bench median)."""
    from types import SimpleNamespace

    import triton
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    b, t, hq, hk, d = 8, 1024, 14, 2, 64
    module = SimpleNamespace(num_key_value_groups=hq // hk, is_causal=True, training=True)
    lengths = torch.linspace(300, t, b, device=dev).long()
    pad = torch.arange(t, device=dev)[None, :] < lengths[:, None]
    causal = torch.ones(t, t, dtype=torch.bool, device=dev).tril()
    mask = (causal[None, None] & pad[:, None, None, :]).contiguous()
    base = [torch.randn(b, t, h, d, device=dev, dtype=torch.bfloat16) for h in (hq, hk, hk)]
    out = []
    for name, q_layout in (("q contiguous [B,H,T,D] (stock)", True), ("q view of [B,T,H,D]", False)):
        q = base[0].transpose(1, 2)
        q = (q.contiguous() if q_layout else q.clone(memory_format=torch.preserve_format)).requires_grad_()
        k = base[1].transpose(1, 2).contiguous().requires_grad_()
        v = base[2].transpose(1, 2).requires_grad_()
        dy = torch.randn(b, t, hq, d, device=dev, dtype=torch.bfloat16)

        def step(q=q, k=k, v=v, dy=dy):
            o, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=d**-0.5)
            o.backward(dy)

        out.append((name, triton.testing.do_bench(step, warmup=25, rep=200)))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench/out")
    args = p.parse_args()
    dev = torch.device("cuda")
    lines = ["## host µs per call (best of 5 x 1000)", ""]
    lines += [f"| {name} | {us:.1f} |" for name, us in launch_table(dev)]
    lines += ["", "## HF SDPA with a padding mask, fwd+bwd ms, B8 T1024 q14/k2 d64", ""]
    lines += [f"| {name} | {ms:.3f} |" for name, ms in sdpa_layouts(dev)]
    lines += ["", "## cProfile, 2000 x ops.rms_norm fwd+bwd", "```", profile_calls(dev), "```"]
    lines += ["", "## linear_cross_entropy 8192x896 V=151936 bf16, 5 x fwd+bwd"]
    lines += ["```", lce_kernels(dev), "```"]
    print("\n".join(lines))
    write_markdown("overhead", lines, args.out)


if __name__ == "__main__":
    main()
