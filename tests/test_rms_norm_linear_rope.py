"""``ops.rms_norm_linear_rope``: its eager CUDA Function against the composition of ``rms_norm_linear`` and
``rope`` it replaces (bit for bit: the same kernels, here the same references on CPU tensors), the
composition's checks, and ``rope_triton`` writing into given outputs. A patched model through it:
``test_patch.py`` and ``test_patch_paths.py``."""

from __future__ import annotations

import importlib

import pytest
import torch

from chronipatch import ops
from helpers import INTERPRET, KERNEL_DEVICE, hf_view, rope_cos_sin

mod = importlib.import_module("chronipatch.ops.rms_norm_linear_rope")
rope_mod = importlib.import_module("chronipatch.ops.rope")
EPS = 1e-6


def _inputs(heads, kv_heads, d, bias, cos_batch, seed=0, b=2, t=5, h=24):
    torch.manual_seed(seed)
    f64 = dict(dtype=torch.float64)
    x, nw = torch.randn(b, t, h, **f64), torch.randn(h, **f64)
    weights = [torch.randn(n * d, h, **f64) / h**0.5 for n in (heads, kv_heads, kv_heads)]
    biases = [torch.randn(w.shape[0], **f64) if bias else None for w in weights]
    cos, sin = rope_cos_sin(cos_batch or b, t, d)
    return x, nw, weights, biases, cos, sin


def _run(x, nw, weights, biases, cos, sin, d, dense, trainable, grads=None):
    leaves = {"x": x, "nw": nw, **{f"w{i}": w for i, w in enumerate(weights)}}
    leaves |= {f"b{i}": b for i, b in enumerate(biases) if b is not None}
    t = {k: v.clone().requires_grad_(k in trainable or k[0] in trainable) for k, v in leaves.items()}
    ws = [t[f"w{i}"] for i in range(3)]
    bs = [t.get(f"b{i}") for i in range(3)]
    outs = ops.rms_norm_linear_rope(t["x"], t["nw"], EPS, ws, bs, d, cos, sin, dense=dense)
    grads = grads or [torch.randn_like(o) for o in outs]
    wanted = [k for k in t if t[k].requires_grad]
    got = torch.autograd.grad(outs, [t[k] for k in wanted], grads)
    return outs, dict(zip(wanted, got)), grads


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("heads", [(4, 4), (6, 2)], ids=["mha", "gqa"])
@pytest.mark.parametrize("dense", [False, True], ids=["hf_layout", "dense"])
@pytest.mark.parametrize("trainable", ["xnwb", "x"], ids=["all", "frozen_weights"])
def test_eager_function_equals_the_composition(monkeypatch, bias, heads, dense, trainable):
    """Outputs (values and layouts) and every gradient bit for bit; cos/sin of batch 1 broadcast."""
    d = 8
    args = _inputs(*heads, d, bias, cos_batch=1 if dense else None)
    monkeypatch.setattr(mod, "eager_cuda", lambda *t: False)
    ref, ref_grads, grads = _run(*args, d, dense, trainable)
    monkeypatch.setattr(mod, "eager_cuda", lambda *t: True)
    outs, got, _ = _run(*args, d, dense, trainable, grads)
    assert type(outs[0].grad_fn).__name__ == "_RMSNormLinearRoPEEagerBackward"
    for a, b in zip(outs, ref, strict=True):
        assert torch.equal(a, b) and a.stride() == b.stride()
    assert got.keys() == ref_grads.keys()
    for k in got:
        assert torch.equal(got[k], ref_grads[k]), k


def test_eager_function_refuses_a_double_backward(monkeypatch):
    monkeypatch.setattr(mod, "eager_cuda", lambda *t: True)
    x, nw, weights, biases, cos, sin = _inputs(4, 2, 8, True, None)
    x.requires_grad_()
    q, k, v = ops.rms_norm_linear_rope(x, nw, EPS, weights, biases, 8, cos, sin)
    first = torch.autograd.grad((q**2).sum() + (k * v).sum(), x, create_graph=True)[0]
    with pytest.raises(RuntimeError):
        torch.autograd.grad(first.sum(), x)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda a: {**a, "weights": a["weights"][:2]}, r"rms_norm_linear_rope: weights must be a list \[W_q"),
        (lambda a: {**a, "head_dim": 6}, r"_rope: weights\[0\] \(32, 24\) is not \[heads \* 6"),
        (lambda a: {**a, "head_dim": 8.0}, r"rms_norm_linear_rope: head_dim must be a positive int"),
        (lambda a: {**a, "x": a["x"][0]}, r"rms_norm_linear_rope: x must be \[B, T, H\]"),
        (
            lambda a: {**a, "weights": [a["weights"][0], a["weights"][1], a["weights"][0]]},
            r"rms_norm_linear_rope: W_k \(16, 24\) and W_v \(32, 24\) differ",
        ),
        (lambda a: {**a, "cos": a["cos"][:, :3]}, r"ops.rope: cos \(2, 3, 8\) and sin \(2, 5, 8\) differ"),
        (lambda a: {**a, "nw": a["nw"][:5]}, r"chronipatch.ops.rms_norm_linear: norm_weight \(5,\)"),
    ],
)
@pytest.mark.parametrize("eager", [False, True], ids=["composed", "eager"])
def test_bad_arguments_name_the_problem(monkeypatch, change, match, eager):
    """Eager or not, a bad argument raises the error that names it (its op's, or this op's own)."""
    monkeypatch.setattr(mod, "eager_cuda", lambda *t: eager)
    x, nw, weights, _, cos, sin = _inputs(4, 2, 8, False, None)
    a = change(dict(x=x, nw=nw, weights=weights, head_dim=8, cos=cos))
    with pytest.raises(ValueError, match=match):
        ops.rms_norm_linear_rope(a["x"], a["nw"], EPS, a["weights"], None, a["head_dim"], a["cos"], sin)


@pytest.mark.skipif(not (INTERPRET or KERNEL_DEVICE == "cuda"), reason="needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "bwd"])
def test_rope_kernel_writes_into_given_outputs(backward):
    """``rope_triton(out=...)`` writes the values it would return into strided column views of one buffer
    (the stacked gradient's q and k heads), and nothing beside them."""
    torch.manual_seed(0)
    b, t, hq, hk, d = 2, 5, 3, 1, 8
    q = hf_view(b, t, hq, d, dtype=torch.float32, device=KERNEL_DEVICE)
    k = hf_view(b, t, hk, d, dtype=torch.float32, device=KERNEL_DEVICE)
    cos, sin = rope_cos_sin(b, t, d, dtype=torch.float32, device=KERNEL_DEVICE)
    want = rope_mod.rope_triton(q, k, cos, sin, backward=backward)
    buf = torch.full((b, t, (hq + 2 * hk) * d), 7.0, device=KERNEL_DEVICE)
    gq, gk, _ = (c.view(b, t, -1, d).transpose(1, 2) for c in buf.split([hq * d, hk * d, hk * d], -1))
    got = rope_mod.rope_triton(q, k, cos, sin, backward=backward, out=(gq, gk))
    assert got[0] is gq and got[1] is gk
    assert torch.equal(gq, want[0]) and torch.equal(gk, want[1])
    assert torch.equal(buf[..., (hq + hk) * d :], torch.full_like(buf[..., (hq + hk) * d :], 7.0))
