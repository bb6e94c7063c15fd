"""``ops.rms_norm_linear`` against the stock composition (HF RMSNorm, then ``nn.Linear`` projections):
values and gradients in fp32/fp64, what it keeps for the backward, its kernel path, autocast, bad input."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from chronipatch import ops
from chronipatch.ops import reference
from helpers import compiled_saved_shapes, saved_bytes

EPS = 1e-6


def _stock(x, nw, weights, biases):
    """HF's layer: ``LlamaRMSNorm`` (fp32 statistics; its math in fp64 for fp64), then each ``nn.Linear``."""
    if x.dtype == torch.float64:
        y = nw * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS))
    else:
        norm = LlamaRMSNorm(x.shape[-1], eps=EPS).to(dtype=nw.dtype)
        y = torch.func.functional_call(norm, {"weight": nw}, (x,))
    return [F.linear(y, w, b) for w, b in zip(weights, biases)]


def _case(shape, outs, bias, seed):
    torch.manual_seed(seed)
    f64 = dict(dtype=torch.float64)
    h = shape[-1]
    x, nw = torch.randn(shape, **f64) * 3, torch.randn(h, **f64)
    weights = [torch.randn(o, h, **f64) / h**0.5 for o in outs]
    biases = [torch.randn(o, **f64) if bias else None for o in outs]
    return x, nw, weights, biases


def _run(fn, x, nw, weights, biases, douts, frozen=()):
    """Outputs and the gradients of every input that requires one, for upstream gradients ``douts``."""
    leaves = {"x": x, "nw": nw, **{f"w{i}": w for i, w in enumerate(weights)}}
    leaves.update({f"b{i}": b for i, b in enumerate(biases) if b is not None})
    leaves = {k: v.clone().requires_grad_(k not in frozen) for k, v in leaves.items()}
    n = len(weights)
    ws = [leaves[f"w{i}"] for i in range(n)]
    bs = [leaves.get(f"b{i}") for i in range(n)]
    outs = fn(leaves["x"], leaves["nw"], ws, bs)
    grads = torch.autograd.grad(outs, [v for k, v in leaves.items() if k not in frozen], douts)
    return outs, dict(zip([k for k in leaves if k not in frozen], grads))


def _ours(x, nw, weights, biases):
    return ops.rms_norm_linear(x, nw, EPS, weights, biases)


def _ours_stacked(x, nw, weights, biases):
    """One GEMM of the stacked weights; the results are column views of its output."""
    outs = ops.rms_norm_linear(x, nw, EPS, weights, biases, stacked=True)
    alike = len({b is None for b in biases}) == 1
    alike &= len({t.requires_grad for t in (*weights, *biases) if t is not None}) == 1
    if len(weights) > 1 and alike:  # one storage: column views of one output
        assert len({o.untyped_storage().data_ptr() for o in outs}) == 1
    return outs


@pytest.mark.parametrize(
    "shape,outs",
    [
        ((1, 64), [8]),
        ((7, 100), [16, 4, 4]),
        ((2, 9, 96), [32, 24]),
        ((4099, 64), [17]),
        # past the three terms the norm's kernel sums: the rest add onto the third
        ((5, 48), [8, 6, 4, 4, 2]),
    ],
)
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("fn", [_ours, _ours_stacked], ids=["separate", "stacked"])
def test_matches_stock(shape, outs, bias, dtype, fn):
    x, nw, weights, biases = _case(shape, outs, bias, seed=sum(shape) + len(outs))
    douts = [torch.randn(*shape[:-1], o, dtype=torch.float64) for o in outs]
    cast = lambda ts: [t.to(dtype) if t is not None else None for t in ts]
    mine, g = _run(fn, x.to(dtype), nw.to(dtype), cast(weights), cast(biases), cast(douts))
    ref, g_ref = _run(_stock, x, nw, weights, biases, douts)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    for a, b in zip(mine, ref, strict=True):
        assert a.dtype == dtype and a.shape == b.shape
        torch.testing.assert_close(a.double(), b, **tol)
    rows = x.numel() // shape[-1]  # dW, db, dnorm_weight sum over rows: their rounding adds up
    assert g.keys() == g_ref.keys()
    for k in g:
        atol = tol["atol"] * (rows**0.5 if k != "x" else 1)
        torch.testing.assert_close(g[k].double(), g_ref[k], rtol=tol["rtol"], atol=atol, msg=k)


@pytest.mark.parametrize("frozen", [("w0", "w1"), ("nw",), ("x",), ("w1", "b0")], ids=str)
@pytest.mark.parametrize("fn", [_ours, _ours_stacked], ids=["separate", "stacked"])
def test_frozen_inputs_get_no_gradient(frozen, fn):
    """LoRA bases and frozen norms: only what requires a gradient gets one, the rest stay stock's."""
    x, nw, weights, biases = _case((3, 5, 48), [16, 8], True, seed=1)
    douts = [torch.randn(3, 5, o, dtype=torch.float64) for o in (16, 8)]
    _, g = _run(fn, x, nw, weights, biases, douts, frozen)
    _, g_ref = _run(_stock, x, nw, weights, biases, douts, frozen)
    assert g.keys() == g_ref.keys() and not set(frozen) & g.keys()
    for k in g:
        torch.testing.assert_close(g[k], g_ref[k], rtol=1e-12, atol=1e-12, msg=k)


@pytest.mark.parametrize("case", ["mixed_biases", "frozen_w0", "frozen_b1"])
def test_stacked_falls_back_to_the_separate_op(case):
    """Stacking needs every weight biased or none, and all or none of them trainable; otherwise the
    projections run as without it (the same bits, separate outputs)."""
    x, nw, weights, biases = _case((2, 3, 32), [16, 8], case != "mixed_biases", seed=2)
    if case == "mixed_biases":
        biases[1] = torch.randn(8, dtype=torch.float64)
    weights = [w.requires_grad_(not (case == "frozen_w0" and i == 0)) for i, w in enumerate(weights)]
    biases = [
        b if b is None else b.requires_grad_(not (case == "frozen_b1" and i == 1))
        for i, b in enumerate(biases)
    ]
    got = ops.rms_norm_linear(x, nw, EPS, weights, biases, stacked=True)
    want = ops.rms_norm_linear(x, nw, EPS, weights, biases)
    assert got[0].untyped_storage().data_ptr() != got[1].untyped_storage().data_ptr()
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_outputs_equal_the_composition_bit_for_bit():
    """The forward is ``F.linear(rms_norm(x), W)``: the same values as the unfused ops, in every dtype."""
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x, nw = torch.randn(2, 7, 64, dtype=dtype), torch.randn(64, dtype=dtype)
        ws = [torch.randn(24, 64, dtype=dtype), torch.randn(8, 64, dtype=dtype)]
        got = ops.rms_norm_linear(x, nw, EPS, ws)
        want = [F.linear(ops.rms_norm(x, nw, EPS), w) for w in ws]
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_create_graph_gives_the_same_gradients_and_refuses_a_second_derivative():
    """A backward with ``create_graph=True`` gives the plain backward's gradients, and differentiating them
    again raises a clear error (the op has no second derivative) instead of a silently wrong result."""
    x, nw, weights, biases = _case((3, 5, 32), (16, 8), True, seed=3)
    douts = [torch.randn(3, 5, o, dtype=torch.float64) for o in (16, 8)]
    _, plain = _run(_ours, x, nw, weights, biases, douts)
    leaves = [t.clone().requires_grad_() for t in (x, nw, *weights, *biases)]
    outs = _ours(leaves[0], leaves[1], leaves[2:4], leaves[4:])
    grads = torch.autograd.grad(outs, leaves, douts, create_graph=True)
    for name, g in zip(("x", "nw", "w0", "w1", "b0", "b1"), grads, strict=True):
        torch.testing.assert_close(g, plain[name], rtol=0, atol=0)
    with pytest.raises(RuntimeError, match=r"rms_norm_linear_bwd.* no autograd formula"):
        torch.autograd.grad(grads[0].square().sum(), leaves[2])


def test_keeps_no_normed_activation():
    """What autograd keeps: x, its rstd ([N] fp32), the norm weight and the projection weights, not the
    normalised [N, H] (which the stock composition keeps for the weight gradients), so this fails if y is
    saved again."""
    torch.manual_seed(0)
    x, nw = torch.randn(64, 96, requires_grad=True), torch.randn(96, requires_grad=True)
    ws = [torch.randn(32, 96, requires_grad=True), torch.randn(16, 96, requires_grad=True)]

    inputs = x.nbytes + nw.nbytes + sum(w.nbytes for w in ws)
    assert saved_bytes(lambda: ops.rms_norm_linear(x, nw, EPS, ws)) == inputs + 64 * 4
    assert saved_bytes(lambda: _stock(x, nw, ws, [None, None])) >= inputs + x.nbytes  # stock keeps y


def test_compiled_graph_keeps_no_normed_activation():
    """Compiled, the forward graph's saved tensors are x (here 2x), its rstd, the norm weight and the weight:
    the backward's recompute of y must not be merged with the forward's y (which would then be kept)."""
    x, nw = torch.randn(64, 32, requires_grad=True), torch.randn(32, requires_grad=True)
    w = torch.randn(16, 32, requires_grad=True)
    fn = lambda x, nw, w: ops.rms_norm_linear(x * 2, nw, EPS, [w])[0].sum()
    saved = compiled_saved_shapes(fn, x, nw, w)
    assert saved == [(16, 32), (32,), (64, 1), (64, 32)]  # rstd as the reference keeps it


def test_stacked_keeps_no_stacked_weights():
    """Stacked, eager and compiled keep what the separate projections keep: the weights themselves, no
    stacked copy of them (the backward stacks them again) and no [N, sum O] output."""
    x, nw = torch.randn(64, 32, requires_grad=True), torch.randn(32, requires_grad=True)
    ws = [torch.randn(16, 32, requires_grad=True), torch.randn(8, 32, requires_grad=True)]
    fn = lambda x, nw, *ws: sum(o.sum() for o in ops.rms_norm_linear(x * 2, nw, EPS, list(ws), stacked=True))
    assert compiled_saved_shapes(fn, x, nw, *ws) == [(8, 32), (16, 32), (32,), (64, 1), (64, 32)]
    separate = saved_bytes(lambda: ops.rms_norm_linear(x, nw, EPS, ws))
    assert saved_bytes(lambda: ops.rms_norm_linear(x, nw, EPS, ws, stacked=True)) == separate


def test_autocast_is_the_composition():
    """Under autocast the projections run as autocast runs ``F.linear``: the composition's values."""
    torch.manual_seed(0)
    x, nw = torch.randn(5, 32), torch.randn(32)
    w = torch.randn(8, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (y,) = ops.rms_norm_linear(x, nw, EPS, [w])
        y_ref = F.linear(ops.rms_norm(x, nw, EPS), w)
    assert y.dtype == y_ref.dtype == torch.bfloat16
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)


def test_no_rows():
    x = torch.randn(0, 16, requires_grad=True)
    nw, w = torch.randn(16, requires_grad=True), torch.randn(4, 16, requires_grad=True)
    (y,) = ops.rms_norm_linear(x, nw, EPS, [w])
    y.sum().backward()
    assert y.shape == (0, 4) and w.grad.abs().sum() == 0 and nw.grad.abs().sum() == 0


def _kernel_device() -> str:
    """Where the Triton path runs: natively on CUDA, in the interpreter on CPU (else the test skips)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and __import__("os").environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    return device


def _force_kernels(monkeypatch) -> None:
    """The op's Triton path from here on, also for CPU tensors; the torch reference fails if it runs."""
    mod = importlib.import_module("chronipatch.ops.rms_norm_linear")
    monkeypatch.setattr(mod, "on_gpu", lambda t: True)
    for name in ("rms_norm_fwd", "rms_norm_bwd"):
        monkeypatch.setattr(reference, name, lambda *a: pytest.fail("the reference ran"))


def _assert_kernels_match(mine, ref, g, g_ref, dtype) -> None:
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-3, atol=2e-3)
    for a, b in zip(mine, ref, strict=True):
        torch.testing.assert_close(a, b, **tol)
    for k in g:
        torch.testing.assert_close(g[k], g_ref[k], rtol=tol["rtol"], atol=tol["atol"] * 10, msg=k)


@pytest.mark.parametrize("outs", [[24, 8], [24, 8, 8], [24, 8, 8, 4]], ids=len)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernel_path_matches_reference(dtype, outs, monkeypatch):
    """The Triton path (interpreter on CPU, natively on CUDA) against the torch reference path, with dy as
    two or three terms of the norm's kernel, and four (the last added onto the third)."""
    device = _kernel_device()
    torch.manual_seed(0)
    x, nw, weights, biases = _case((2, 5, 64), outs, True, seed=2)
    douts = [torch.randn(2, 5, o, dtype=torch.float64) for o in outs]
    to = lambda ts: [t.to(device=device, dtype=dtype) for t in ts]
    args = (*to([x, nw]), to(weights), to(biases), to(douts))
    ref, g_ref = _run(_ours, *args)
    _force_kernels(monkeypatch)
    mine, g = _run(_ours, *args)
    _assert_kernels_match(mine, ref, g, g_ref, dtype)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda x, nw, w: ops.rms_norm_linear(x, nw, EPS, []), "needs at least one weight"),
        (lambda x, nw, w: ops.rms_norm_linear(x, nw, EPS, [w], [None, None]), "1 weights but 2 biases"),
        (lambda x, nw, w: ops.rms_norm_linear(x, nw[:8], EPS, [w]), r"norm_weight \(8,\) does not match"),
        (lambda x, nw, w: ops.rms_norm_linear(x, nw, EPS, [w[:, :8]]), r"weights\[0\] \(4, 8\) does not"),
        (lambda x, nw, w: ops.rms_norm_linear(x, nw, EPS, [w], [torch.zeros(3)]), r"biases\[0\] \(3,\)"),
        (lambda x, nw, w: ops.rms_norm_linear(x, nw.double(), EPS, [w]), "dtype"),
        (lambda x, nw, w: ops.rms_norm_linear(x.long(), nw, EPS, [w]), "floating point"),
        (lambda x, nw, w: ops.rms_norm_linear(x, nw, EPS, [w.numpy()]), "must be a torch.Tensor"),
    ],
)
def test_bad_input(call, match):
    x, nw, w = torch.randn(3, 16), torch.randn(16), torch.randn(4, 16)
    with pytest.raises((ValueError, TypeError), match=match):
        call(x, nw, w)


@pytest.mark.parametrize(
    "trainable",
    [("r", "x", "nw", "w0", "w1"), ("w1",), ("x", "w0"), ("r",), ("nw", "b1")],
    ids=lambda t: "+".join(t),
)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("stacked", [False, True], ids=["separate", "stacked"])
def test_eager_function_matches_the_registered_op(trainable, residual, stacked):
    """The eager CUDA path's ``autograd.Function`` (run here on CPU tensors: the same reference launchers)
    against the registered op, for every pattern of inputs needing a gradient: which gets one, and its value.
    Its flags sit at other argument positions than the op's (a frozen w0 beside a trainable w1 catches an
    off-by-one). Stacked (both weights biased): one output, the gradients split back per weight and bias."""
    mod = importlib.import_module("chronipatch.ops.rms_norm_linear")
    x, nw, weights, _ = _case((2, 5, 32), [16, 8], False, seed=6)
    leaves = {"r": torch.randn(2, 5, 32, dtype=torch.float64), "x": x, "nw": nw, "w0": weights[0]}
    leaves |= {"w1": weights[1], "b1": torch.randn(8, dtype=torch.float64)}
    if stacked:
        leaves["b0"] = torch.randn(16, dtype=torch.float64)
    if not residual:
        trainable = tuple(k for k in trainable if k != "r") or ("x",)
    has_bias = [stacked, True]
    sizes = (24, 32) if stacked else (16, 8, 32)
    grads = [torch.randn(2, 5, n, dtype=torch.float64) for n in sizes]

    def run(eager):
        t = {k: v.clone().requires_grad_(k in trainable) for k, v in leaves.items()}
        r = t["r"] if residual else None
        biases = [t["b0"], t["b1"]] if stacked else [t["b1"]]
        if eager:
            args = (t["x"], t["nw"], EPS, has_bias, r, stacked, t["w0"], t["w1"], *biases)
            outs = mod._RMSNormLinearEager.apply(*args)
        else:
            weights = [t["w0"], t["w1"]]
            outs = mod._rms_norm_linear(t["x"], t["nw"], EPS, weights, biases, has_bias, r, stacked)[:-1]
        wanted = [k for k in t if t[k].requires_grad]
        got = torch.autograd.grad(outs, [t[k] for k in wanted], grads[: len(outs)], allow_unused=True)
        return [*outs, *got], wanted

    (eager, names), (registered, names_ref) = run(True), run(False)
    assert names == names_ref
    for i, (a, b) in enumerate(zip(eager, registered, strict=True)):
        assert (a is None) == (b is None), i
        if a is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert all(g is not None for g in eager[-len(names) :]), names  # every trainable input gets a gradient


@pytest.mark.parametrize("op", ["rms_norm_linear", "swiglu_linear"])
def test_eager_function_refuses_a_second_derivative(monkeypatch, op):
    """The eager CUDA path's ``autograd.Function`` (CPU tensors here) with ``create_graph=True``: its
    gradients carry a node that refuses a second derivative, never a silently graph-less tensor."""
    mod = importlib.import_module(f"chronipatch.ops.{op}")
    monkeypatch.setattr(mod, "eager_cuda", lambda *t: True)
    x, nw, weights, _ = _case((2, 5, 32), [16], False, seed=7)
    x, nw, w = (t.clone().requires_grad_() for t in (x, nw, weights[0]))
    if op == "rms_norm_linear":
        (out,) = mod._RMSNormLinearEager.apply(x, nw, EPS, [False], None, False, w)
    else:
        out = mod._SwiGLULinearEager.apply(x, nw.expand_as(x), w, None)
    assert type(out.grad_fn).__name__.endswith("EagerBackward")
    first = torch.autograd.grad((out**2).sum(), x, create_graph=True)[0]
    assert first.requires_grad
    with pytest.raises(RuntimeError, match="once_differentiable"):
        first.sum().backward()
