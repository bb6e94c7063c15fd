"""``ops.add_rms_norm_swiglu``: its eager CUDA Function against the composition of ``add_rms_norm_linear`` and
``swiglu_linear`` it replaces (bit for bit: the same kernels, here the same references on CPU tensors), and
bad arguments. A patched model through it: ``test_patch.py`` and ``test_patch_paths.py``."""

from __future__ import annotations

import importlib

import pytest
import torch

from chronipatch import ops

mod = importlib.import_module("chronipatch.ops.add_rms_norm_swiglu")
EPS = 1e-6
BIASES = {"none": (False, False, False), "all": (True, True, True), "down": (False, False, True)}
ALL = ("r", "x", "nw", "wg", "wu", "wd", "bg", "bu", "bd")


def _inputs(biased, seed=0, b=2, t=5, h=24, i=40):
    torch.manual_seed(seed)
    f64 = dict(dtype=torch.float64)
    leaves = {"r": torch.randn(b, t, h, **f64), "x": torch.randn(b, t, h, **f64), "nw": torch.randn(h, **f64)}
    leaves |= {"wg": torch.randn(i, h, **f64) / h**0.5, "wu": torch.randn(i, h, **f64) / h**0.5}
    leaves["wd"] = torch.randn(h, i, **f64) / i**0.5
    for name, n, on in zip(("bg", "bu", "bd"), (i, i, h), biased):
        if on:
            leaves[name] = torch.randn(n, **f64)
    return leaves


def _run(leaves, trainable, grads=None):
    t = {k: v.clone().requires_grad_(k in trainable) for k, v in leaves.items()}
    s, out = ops.add_rms_norm_swiglu(
        t["r"], t["x"], t["nw"], EPS, [t["wg"], t["wu"]], t["wd"], [t.get("bg"), t.get("bu")], t.get("bd")
    )
    grads = grads or [torch.randn_like(s), torch.randn_like(out)]
    wanted = [k for k in t if t[k].requires_grad]
    got = torch.autograd.grad((s, out), [t[k] for k in wanted], grads)
    return (s, out), dict(zip(wanted, got)), grads


@pytest.mark.parametrize("biased", list(BIASES))
@pytest.mark.parametrize(
    "trainable",
    [ALL, ("x",), ("r", "wd", "bd"), ("wg", "bu"), ("wu", "bg")],
    ids=["all", "x_only", "residual_and_down", "gate_and_up_bias", "up_and_gate_bias"],
)
def test_eager_function_equals_the_composition(monkeypatch, biased, trainable):
    """Outputs and every gradient bit for bit, frozen weights and biases among them."""
    leaves = _inputs(BIASES[biased])
    monkeypatch.setattr(mod, "eager_cuda", lambda *t: False)
    ref, ref_grads, grads = _run(leaves, trainable)
    monkeypatch.setattr(mod, "eager_cuda", lambda *t: True)
    outs, got, _ = _run(leaves, trainable, grads)
    assert type(outs[1].grad_fn).__name__ == "_AddRMSNormSwiGLUEagerBackward"
    for a, b in zip(outs, ref, strict=True):
        assert torch.equal(a, b) and a.stride() == b.stride()
    assert got.keys() == ref_grads.keys() and got
    for k in got:
        assert torch.equal(got[k], ref_grads[k]), k


def test_eager_function_refuses_a_double_backward(monkeypatch):
    monkeypatch.setattr(mod, "eager_cuda", lambda *t: True)
    t = _inputs(BIASES["none"])
    x = t["x"].requires_grad_()
    s, out = ops.add_rms_norm_swiglu(t["r"], x, t["nw"], EPS, [t["wg"], t["wu"]], t["wd"])
    first = torch.autograd.grad((out**2).sum() + s.sum(), x, create_graph=True)[0]
    with pytest.raises(RuntimeError):
        torch.autograd.grad(first.sum(), x)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (
            lambda a: {**a, "wu": a["wu"][:7]},
            r"add_rms_norm_swiglu: W_gate \(40, 24\) and W_up \(7, 24\) differ",
        ),
        (lambda a: {**a, "wd": a["wd"][:, :7]}, r"add_rms_norm_swiglu: down \(24, 7\) is not \[H_out, 40\]"),
        (lambda a: {**a, "r": a["r"][:1]}, r"ops.add_rms_norm_linear: residual \(1, 5, 24\) does not match"),
        (lambda a: {**a, "nw": a["nw"].float()}, r"ops.add_rms_norm_linear: norm_weight has dtype"),
        (lambda a: {**a, "wg": a["wg"][:, :5]}, r"add_rms_norm_swiglu: W_gate \(40, 5\) and W_up \(40, 24\)"),
        (
            lambda a: {**a, "wg": a["wg"][:, :5], "wu": a["wu"][:, :5]},
            r"add_rms_norm_linear: weights\[0\] \(40, 5\)",
        ),
    ],
)
@pytest.mark.parametrize("eager", [False, True], ids=["composed", "eager"])
def test_bad_arguments_name_the_problem(monkeypatch, change, match, eager):
    """Eager or not, a bad argument raises the error its op raises."""
    monkeypatch.setattr(mod, "eager_cuda", lambda *t: eager)
    a = change(_inputs(BIASES["none"]))
    with pytest.raises(ValueError, match=match):
        ops.add_rms_norm_swiglu(a["r"], a["x"], a["nw"], EPS, [a["wg"], a["wu"]], a["wd"])
