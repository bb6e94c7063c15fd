"""RoPE's GPU time a fwd+bwd iteration: eager, compiled as shipped, and compiled through an opaque custom op
(the Triton launch hidden from Inductor), with each kernel's share from the profiler; the backward by
``backward()`` (into the leaves' .grad) and by ``autograd.grad`` (the gradients' strides printed)."""

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


def step(fn, args, gs, how):
    """One fwd + bwd; the gradients' strides where autograd.grad returns them."""
    if how == "backward":
        torch.autograd.backward(fn(*args), gs)
        return None
    dq, dk = torch.autograd.grad(fn(*args), args[:2], gs)
    return dq.stride(), dk.stride()


for d in ((4, 2048, 14, 2, 64), (4, 2048, 16, 8, 128)):
    args = build_rope(d, "cuda", torch.bfloat16)
    for mode in ("eager", "compiled", "opaque"):
        fn = opaque if mode == "opaque" else ops.rope
        if mode != "eager":
            torch._dynamo.reset()
            fn = torch.compile(fn, dynamic=False)
        outs = fn(*args)
        gs = [torch.randn_like(o) for o in outs]
        print(mode, "output strides", [o.stride() for o in outs], flush=True)
        # backward() accumulates into the leaves' .grad; autograd.grad returns the gradients as they come
        for how in ("backward", "grad"):
            for _ in range(3):
                strides = step(fn, args, gs, how)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(10):
                    step(fn, args, gs, how)
                torch.cuda.synchronize()
            ks = [
                (e.key[:40], round(e.device_time_total / 10, 1))
                for e in prof.key_averages()
                if getattr(e, "device_time_total", 0) > 0
            ]
            print(mode, how, d, "us/iter", round(sum(v for _, v in ks), 1), ks, strides, flush=True)
