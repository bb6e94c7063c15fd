"""RoPE's GPU time a fwd+bwd iteration: eager, compiled as shipped, and compiled through an opaque custom op
(the Triton launch hidden from Inductor), with each kernel's share from the profiler."""

import importlib
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path[:0] = ["bench"]
import chronipatch.ops as ops  # noqa: E402
from ops_table import build_rope  # noqa: E402

R = importlib.import_module("chronipatch.ops.rope")  # the module: chronipatch.ops.rope is the function


def _hf_like(x):
    b, h, t, d = x.shape
    return x.new_empty(b, t, h, d).transpose(1, 2)


@torch.library.custom_op("diag::rope", mutates_args=())
def opaque(
    q: torch.Tensor, k: torch.Tensor, c: torch.Tensor, s: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return R.rope_triton(q, k, c, s, wrap=False)


@opaque.register_fake
def _(q, k, c, s):
    return _hf_like(q), _hf_like(k)


@torch.library.custom_op("diag::rope_bwd", mutates_args=())
def opaque_bwd(
    q: torch.Tensor, k: torch.Tensor, c: torch.Tensor, s: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return R.rope_triton(q, k, c, s, backward=True, wrap=False)


@opaque_bwd.register_fake
def _(q, k, c, s):
    return _hf_like(q), _hf_like(k)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[2], inputs[3])


def _bw(ctx, dq, dk):
    c, s = ctx.saved_tensors
    return (*opaque_bwd(dq, dk, c, s), None, None)


opaque.register_autograd(_bw, setup_context=_setup)

for d in ((4, 2048, 14, 2, 64), (4, 2048, 16, 8, 128)):
    args = build_rope(d, "cuda", torch.bfloat16)
    for mode in ("eager", "compiled", "opaque"):
        fn = opaque if mode == "opaque" else ops.rope
        if mode != "eager":
            torch._dynamo.reset()
            fn = torch.compile(fn, dynamic=False)
        outs = fn(*args)
        gs = [torch.randn_like(o) for o in outs]
        for _ in range(3):
            torch.autograd.backward(fn(*args), gs)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                torch.autograd.backward(fn(*args), gs)
            torch.cuda.synchronize()
        ks = [
            (e.key[:40], round(e.device_time_total / 10, 1))
            for e in prof.key_averages()
            if getattr(e, "device_time_total", 0) > 0
        ]
        print(mode, d, "us/iter", round(sum(v for _, v in ks), 1), ks, flush=True)
