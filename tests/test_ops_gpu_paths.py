"""GPU: the ops' other ways in (eager CUDA fast paths, fused eager Functions, compiled graphs, the fp32
product of bf16 matrices) give the registered ops' results, bit for bit where they should."""

from __future__ import annotations

import importlib
import re

import pytest
import torch

from chronipatch import ops
from helpers import compiled_saved_shapes, hf_view

pytestmark = pytest.mark.gpu


def test_fp32_product_of_bf16_matrices_gpu():
    """``mm_f32``: cuBLAS's fp32 output of bf16 operands (no zeroed buffer), as accurate as fp32 sums are."""
    utils = importlib.import_module("chronipatch.ops._utils")
    torch.manual_seed(0)
    a, b = torch.randn(333, 1000, device="cuda").bfloat16(), torch.randn(1000, 77, device="cuda").bfloat16()
    got = utils.mm_f32(a, b)
    assert got.dtype == torch.float32 and utils.OUT_DTYPE_GEMMS["mm"] is True
    torch.testing.assert_close(got.double(), a.double() @ b.double(), rtol=1e-5, atol=1e-4)


def _added_last(s, projections):
    return (*projections, s)  # the registered op's order


def test_eager_fast_path_matches_the_registered_op_gpu():
    """Eager CUDA calls skip custom-op dispatch; results and gradients are bit-identical to the op's."""
    rn, rp, sg, sl, rnl, lce = (
        importlib.import_module(f"chronipatch.ops.{m}")
        for m in ("rms_norm", "rope", "swiglu", "swiglu_linear", "rms_norm_linear", "linear_cross_entropy")
    )

    torch.manual_seed(0)
    bf = dict(device="cuda", dtype=torch.bfloat16)
    x, w = torch.randn(3, 37, 896, **bf), 1 + 0.1 * torch.randn(896, **bf)
    g, u = torch.randn(5, 4864, **bf), torch.randn(5, 4864, **bf)
    wd = torch.randn(896, 4864, **bf).requires_grad_()  # needing dW: the backward recomputes the product
    q, k = hf_view(2, 37, 14, 64, **bf), hf_view(2, 37, 2, 64, **bf)
    cos, sin = torch.randn(1, 37, 64, **bf), torch.randn(1, 37, 64, **bf)
    wp = [torch.randn(o, 896, **bf).requires_grad_() for o in (896, 128)]
    wv, labels = torch.randn(1000, 896, **bf) * 0.05, torch.randint(0, 1000, (111,), device="cuda")
    labels[::7] = -100
    divisor = (labels != -100).sum().float()
    cases = [
        (
            lambda a, b: tuple(ops.rms_norm_linear(a, b, 1e-6, wp)),
            # rstd last
            lambda a, b: tuple(rnl._rms_norm_linear(a, b, 1e-6, wp, [], [False, False], None, False)[:-1]),
            (x, w),
        ),
        (
            # stacked: the one [..., sum O] output, from the eager Function the public path calls
            lambda a, b: rnl._RMSNormLinearEager.apply(a, b, 1e-6, [False, False], None, True, *wp)[0],
            lambda a, b: rnl._rms_norm_linear(a, b, 1e-6, wp, [], [False, False], None, True)[0],
            (x, w),
        ),
        (
            lambda a, b: _added_last(*ops.add_rms_norm_linear(a, x, b, 1e-6, wp)),
            # s, then rstd last
            lambda a, b: tuple(rnl._rms_norm_linear(x, b, 1e-6, wp, [], [False, False], a, False)[:-1]),
            (x.clone(), w),
        ),
        (lambda a, b: ops.rms_norm(a, b, 1e-6), lambda a, b: rn._rms_norm(a, b, 1e-6)[0], (x, w)),
        (ops.swiglu, sg._swiglu, (g, u)),
        (lambda a, b: ops.swiglu_linear(a, b, wd), lambda a, b: sl._swiglu_linear(a, b, wd, None), (g, u)),
        (lambda a, b: ops.rope(a, b, cos, sin), lambda a, b: rp._rope(a, b, cos, sin, False), (q, k)),
        (
            lambda a, b: ops.rope(a, b, cos, sin, dense=True),
            lambda a, b: rp._rope(a, b, cos, sin, True),
            (q, k),
        ),
        (
            lambda a, b: ops.linear_cross_entropy(a, b, labels, shift=False),  # bf16 training: the one pass
            lambda a, b: lce._lce_with_grad(a, b, labels, divisor, -100, False, True, True)[0],
            (x.reshape(-1, 896), wv),
        ),
    ]
    for public, registered, inputs in cases:
        assert rn.eager_cuda(inputs[0]) and not rn.eager_cuda(inputs[0].cpu())
        grads = None
        results = []
        for fn, node in ((public, r"_\w+EagerBackward"), (registered, r"GeneratedBackwardFor_chronipatch")):
            leaves = [t.detach().clone().requires_grad_() for t in inputs]
            out = fn(*leaves)
            outs = out if isinstance(out, tuple) else (out,)
            assert re.match(node, type(outs[0].grad_fn).__name__), type(outs[0].grad_fn)
            grads = grads or [torch.randn_like(o) for o in outs]
            results.append([*outs, *torch.autograd.grad(outs, leaves, grads)])
        for a, b in zip(*results):
            assert torch.equal(a, b)
            assert a.stride() == b.stride()


def _fused_matches_the_composition(monkeypatch, op, nodes, call, inputs):
    """``call(*leaves)`` through ``op``'s one eager Function and, with it switched off, through the eager
    composition (the two ops' own Functions, as eager CUDA calls ran it before): outputs, their layouts and
    every input's gradient bit for bit. ``nodes``: the first output's grad_fn names, fused then composed."""
    mod = importlib.import_module(f"chronipatch.ops.{op}")
    grads, results = None, []
    for fused, node in zip((True, False), nodes):
        if not fused:
            monkeypatch.setattr(mod, "eager_cuda", lambda *t: False)
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        outs = call(*leaves)
        assert type(outs[0].grad_fn).__name__ == node, type(outs[0].grad_fn)
        grads = grads or [torch.randn_like(o) for o in outs]
        results.append([*outs, *torch.autograd.grad(outs, leaves, grads)])
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b) and a.stride() == b.stride()


@pytest.mark.parametrize("bias", [False, True], ids=["llama", "qwen2"])
@pytest.mark.parametrize("dense", [False, True], ids=["hf_layout", "dense"])
def test_rms_norm_linear_rope_eager_matches_the_composition_gpu(monkeypatch, bias, dense):
    """CUDA bf16, at Qwen2.5-0.5B's heads: ``rms_norm_linear_rope``'s Function is its composition."""
    torch.manual_seed(0)
    bf = dict(device="cuda", dtype=torch.bfloat16)
    x, nw = torch.randn(2, 37, 896, **bf), 1 + 0.1 * torch.randn(896, **bf)
    weights = [torch.randn(o, 896, **bf) / 30 for o in (896, 128, 128)]
    biases = [torch.randn(w.shape[0], **bf) for w in weights] if bias else []
    cos, sin = torch.randn(1, 37, 64, **bf), torch.randn(1, 37, 64, **bf)

    def call(x, nw, *params):
        ws, bs = params[:3], (params[3:] if bias else [None] * 3)
        return ops.rms_norm_linear_rope(x, nw, 1e-6, list(ws), list(bs), 64, cos, sin, dense=dense)

    nodes = ("_RMSNormLinearRoPEEagerBackward", "_RoPEEagerBackward")
    inputs = (x, nw, *weights, *biases)
    _fused_matches_the_composition(monkeypatch, "rms_norm_linear_rope", nodes, call, inputs)


def test_add_rms_norm_swiglu_eager_matches_the_composition_gpu(monkeypatch):
    """CUDA bf16, at Qwen2.5-0.5B's MLP: ``add_rms_norm_swiglu``'s Function is its composition."""
    torch.manual_seed(0)
    bf = dict(device="cuda", dtype=torch.bfloat16)
    r, x, nw = torch.randn(2, 37, 896, **bf), torch.randn(2, 37, 896, **bf), 1 + 0.1 * torch.randn(896, **bf)
    wg, wu, wd = (torch.randn(*shape, **bf) / 30 for shape in ((4864, 896), (4864, 896), (896, 4864)))

    def call(r, x, nw, wg, wu, wd):
        s, out = ops.add_rms_norm_swiglu(r, x, nw, 1e-6, [wg, wu], wd)
        return out, s  # the output whose node names the Function first

    nodes = ("_AddRMSNormSwiGLUEagerBackward", "_SwiGLULinearEagerBackward")
    _fused_matches_the_composition(monkeypatch, "add_rms_norm_swiglu", nodes, call, (r, x, nw, wg, wu, wd))


def test_compiled_normed_projections_keep_no_normed_activation_gpu():
    """On CUDA the compiled backward traces into the normed projections' backward, whose norm kernel writes y
    again: the forward graph keeps x (here 2x), its rstd, the norm weight and the weight, never y."""
    bf = dict(device="cuda", dtype=torch.bfloat16)
    x, nw = torch.randn(64, 32, **bf, requires_grad=True), torch.randn(32, **bf, requires_grad=True)
    w = torch.randn(16, 32, **bf, requires_grad=True)
    fn = lambda x, nw, w: ops.rms_norm_linear(x * 2, nw, 1e-6, [w])[0].float().sum()
    assert compiled_saved_shapes(fn, x, nw, w) == [(16, 32), (32,), (64,), (64, 32)]
