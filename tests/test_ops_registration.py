"""Registration of every op: torch.library.opcheck (CPU, and CUDA in the GPU suite) and one-graph compiles."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from chronipatch import ops
from helpers import hf_view, rope_cos_sin

OPS = torch.ops.chronipatch


def _opcheck_cases():
    torch.manual_seed(0)
    x = torch.randn(5, 3, 64, requires_grad=True)
    q, k = hf_view(2, 5, 4, 8).requires_grad_(), hf_view(2, 5, 2, 8).requires_grad_()
    cos, sin = rope_cos_sin(1, 5, 8, torch.float32)
    h, w = torch.randn(6, 16, requires_grad=True), torch.randn(33, 16, requires_grad=True)
    wq, wk = torch.randn(12, 64, requires_grad=True), torch.randn(6, 64)  # k's frozen, as under LoRA
    labels = torch.tensor([1, -100, 5, 32, 0, 7])
    stats = torch.stack([torch.rand(6), torch.rand(6) + 3], -1)  # (row max, sum exp), as the forward saves
    lce_bwd = (torch.rand(6), h.detach(), w.detach(), labels, stats, -100)  # + need_dh, need_dw
    return [
        ("rms_norm", OPS.rms_norm, (x, torch.randn(64, requires_grad=True), 1e-6)),
        ("rms_norm_nograd", OPS.rms_norm, (torch.randn(7, 100), torch.randn(100), 1e-5)),
        (
            "swiglu",
            OPS.swiglu,
            (torch.randn(4, 9, requires_grad=True), torch.randn(4, 9, requires_grad=True)),
        ),
        (
            "swiglu_linear",
            OPS.swiglu_linear,
            (*(torch.randn(2, 3, 9, requires_grad=True) for _ in range(2)), torch.randn(5, 9), None),
        ),
        (
            "swiglu_linear_bias",
            OPS.swiglu_linear,
            tuple(torch.randn(*s, requires_grad=True) for s in ((4, 9), (4, 9), (5, 9), (5,))),
        ),
        (
            "rms_norm_linear",
            OPS.rms_norm_linear,
            (x, torch.randn(64, requires_grad=True), 1e-6, [wq, wk], [], [False, False], None, False),
        ),
        (
            "rms_norm_linear_stacked",
            OPS.rms_norm_linear,
            (x, torch.randn(64, requires_grad=True), 1e-6, [wq, wk], [], [False, False], None, True),
        ),
        (
            "rms_norm_linear_stacked_bias",
            OPS.rms_norm_linear,
            (x, torch.randn(64), 1e-6, [wq, wk], [torch.randn(12), torch.randn(6)], [True, True], None, True),
        ),
        (
            "rms_norm_linear_bias",
            OPS.rms_norm_linear,
            (
                x,
                torch.randn(64),
                1e-6,
                [wq, wk],
                [torch.randn(6, requires_grad=True)],
                [False, True],
                None,
                False,
            ),
        ),
        (
            "rms_norm_linear_residual",
            OPS.rms_norm_linear,
            (x, torch.randn(64), 1e-6, [wq], [], [False], torch.randn(5, 3, 64, requires_grad=True), False),
        ),
        *(
            (
                f"rms_norm_linear_bwd_{dw}_{db}",
                OPS.rms_norm_linear_bwd,
                (
                    x.detach(),
                    torch.randn(64),
                    torch.rand(5, 3) + 0.5,
                    [wq.detach()],
                    [torch.randn(5, 3, 12)],
                    [dw],
                    [db],
                    torch.randn(5, 3, 64) if dw else None,  # x's gradient from its other uses, added to dx
                    False,
                ),
            )
            for dw in (True, False)
            for db in (True, False)
        ),
        (
            "rms_norm_linear_bwd_stacked",
            OPS.rms_norm_linear_bwd,
            (
                x.detach(),
                torch.randn(64),
                torch.rand(5, 3) + 0.5,
                [wq.detach(), wk.detach()],
                [torch.randn(5, 3, 18)],  # the stacked output's gradient
                [True, False],
                [True, True],
                None,
                True,
            ),
        ),
        ("rope", OPS.rope, (q, k, cos, sin, False)),
        ("rope_dense", OPS.rope, (q, k, cos, sin, True)),
        ("lce", OPS.linear_cross_entropy, (h, w, labels, -100, True)),
        ("lce_no_token_stats", OPS.linear_cross_entropy, (h, w, labels, -100, False)),
        (
            "lce_with_grad",
            OPS.linear_cross_entropy_with_grad,
            (h, w, labels, torch.tensor(4.0), -100, True, True, True),
        ),
        (
            "lce_with_grad_frozen_head",
            OPS.linear_cross_entropy_with_grad,
            (h, w.detach(), labels, torch.tensor(0.0), -100, False, True, False),
        ),
        (
            "rms_norm_bwd",
            OPS.rms_norm_bwd,
            (torch.randn(3, 8), torch.randn(3, 8), torch.randn(8), torch.rand(3)),
        ),
        ("swiglu_bwd", OPS.swiglu_bwd, (torch.randn(3, 8), torch.randn(3, 8), torch.randn(3, 8))),
        *(
            (
                f"swiglu_linear_bwd_{dw}_{db}",
                OPS.swiglu_linear_bwd,
                (*(torch.randn(3, k) for k in (5, 8, 8)), torch.randn(5, 8), dw, db),
            )
            for dw in (True, False)
            for db in (True, False)
        ),
        ("rope_bwd", OPS.rope_bwd, (hf_view(1, 5, 4, 8), hf_view(1, 5, 2, 8), cos, sin)),
        ("lce_bwd", OPS.linear_cross_entropy_bwd, (*lce_bwd, True, True)),
        ("lce_bwd_frozen_head", OPS.linear_cross_entropy_bwd, (*lce_bwd, True, False)),
    ]


@pytest.mark.parametrize("name,op,args", _opcheck_cases(), ids=lambda c: c if isinstance(c, str) else "")
def test_opcheck(name, op, args):
    torch.library.opcheck(op, args)


def _opcheck_cuda_cases():
    # bf16 for the forward ops; a backward op takes the fp32 statistics its forward saved, so fp32 only.
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    return [
        pytest.param(*case, dtype, id=f"{case[0]}-{tag}")
        for case in _opcheck_cases()
        for tag, dtype in dtypes.items()
        if tag == "fp32" or "_bwd" not in case[0]
    ]


@pytest.mark.gpu
@pytest.mark.parametrize("name,op,args,dtype", _opcheck_cuda_cases())
def test_opcheck_cuda(name, op, args, dtype):
    """The same cases on CUDA tensors, where the ops run their Triton kernels."""

    def moved(a):
        if isinstance(a, list):
            return [moved(t) for t in a]
        if not isinstance(a, torch.Tensor):
            return a
        to = a.detach().to(device="cuda", dtype=dtype if a.is_floating_point() else a.dtype)
        return to.requires_grad_(a.requires_grad)

    torch.library.opcheck(op, tuple(moved(a) for a in args))


def test_pow2_of_a_symbolic_size_is_a_plain_int():
    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    env = ShapeEnv()
    n = env.create_symintnode(env.create_symbol(100, ConstantSource("n")), hint=100)
    got = importlib.import_module("chronipatch.ops._utils").pow2(n * 3)
    assert type(n) is torch.SymInt and type(got) is int and got == 512


_TRACE = """
import importlib, torch
from torch.fx.experimental.proxy_tensor import make_fx
from helpers import hf_view, rope_cos_sin
rms, glu, rope = (importlib.import_module(f"chronipatch.ops.{m}") for m in ("rms_norm", "swiglu", "rope"))
x, w, g = torch.randn(5, 3, 64), torch.randn(64), torch.randn(4, 9)
q, k = hf_view(2, 5, 4, 8), hf_view(2, 5, 2, 8)
cs = rope_cos_sin(1, 5, 8, torch.float32)
cases = {
    "rms_norm": (lambda x, w: rms.rms_norm_fwd_triton(x, w, 1e-6), (x, w)),
    "rms_norm_bwd": (lambda dy, x, w, r: rms.rms_norm_bwd_triton(dy, x, w, r), (x, x, w, torch.rand(5, 3))),
    "swiglu": (lambda a, b: glu.swiglu_fwd_triton(a, b), (g, g)),
    "swiglu_bwd": (lambda d, a, b: glu.swiglu_bwd_triton(d, a, b), (g, g, g)),
    "rope": (lambda q, k, c, s: rope.rope_triton(q, k, c, s), (q, k, *cs)),
    "rope_bwd": (lambda q, k, c, s: rope.rope_triton(q, k, c, s, backward=True), (q, k, *cs)),
}
for name, (fn, args) in cases.items():
    graph = make_fx(fn, tracing_mode="symbolic")(*args)
    kernels = [n for n in graph.graph.nodes if "triton_kernel_wrapper" in str(n.target)]
    print(name, len(kernels), flush=True)
"""


def test_triton_launchers_trace_with_every_size_symbolic():
    """The launchers that compile traces into (``triton_op``s) trace with every size symbolic, as opcheck's
    dynamic test and ``torch.compile(dynamic=True)`` of a direct call trace them, each recording its kernels
    once (RMSNorm's backward two: the rows' and dw's sum): their block sizes are plain ints (rope's trace
    ran for minutes while they were sympy expressions). In a process of its own: the interpreter's kernels
    (CPU runs) cannot be traced."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(root / "src"), str(root / "tests"), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-c", _TRACE], capture_output=True, text=True, timeout=300, env=env, cwd=root
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    kernels = {"rms_norm": 1, "rms_norm_bwd": 2, "swiglu": 1, "swiglu_bwd": 1, "rope": 1, "rope_bwd": 1}
    assert proc.stdout.split() == [w for name, n in kernels.items() for w in (name, str(n))]


def _count_breaks(fn, *args):
    torch._dynamo.reset()
    return torch._dynamo.explain(fn)(*args).graph_break_count


def test_ops_compile_fullgraph_with_backward():
    # fp64: the compiled graph may sum in another order than eager (Inductor's CPU code differs by host),
    # which in fp32 moves a gradient by ~1e-5 relative; in fp64 the two must agree to 1e-7.
    torch.manual_seed(0)
    f64 = dict(dtype=torch.float64)
    x, w = torch.randn(6, 32, **f64, requires_grad=True), torch.randn(32, **f64, requires_grad=True)
    q, k = hf_view(2, 5, 4, 8, **f64).requires_grad_(), hf_view(2, 5, 2, 8, **f64).requires_grad_()
    cos, sin = rope_cos_sin(2, 5, 8, torch.float64)
    wv, labels = torch.randn(40, 32, **f64, requires_grad=True), torch.randint(0, 40, (6,))

    def step(x, w, q, k, wv):
        h = ops.rms_norm(x, w, 1e-6) + ops.rms_norm_linear(x, w, 1e-6, [wv[:32], wv[8:40]])[1]
        h = ops.swiglu(h, h * 2) + ops.swiglu_linear(h, h * 3, wv[:32])
        qo, ko = ops.rope(q, k, cos, sin)
        return ops.linear_cross_entropy(h, wv, labels, shift=False) + qo.square().mean() + ko.mean()

    args = (x, w, q, k, wv)
    assert _count_breaks(step, *args) == 0
    torch._dynamo.reset()
    eager = step(*args)
    eager_grads = torch.autograd.grad(eager, args)
    compiled = torch.compile(step, fullgraph=True)(*args)
    compiled_grads = torch.autograd.grad(compiled, args)
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("frozen_head", [False, True])
def test_lce_with_grad_compiles_to_one_graph_in_bf16(frozen_head):
    """bf16 training takes the op that returns the loss's gradients with it: one graph, the same loss and
    gradients as eager; against the fp64 truth, within one bf16 ulp (at the gradient's scale) of the error of
    the forward-then-backward op (reduction="none", summed), which rounds g after the upstream factor (here
    3, not a power of 2), where this op rounds the gradient after it."""
    torch.manual_seed(0)
    h = torch.randn(2, 7, 16, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.bfloat16, requires_grad=not frozen_head)
    labels = torch.randint(0, 50, (2, 7))
    labels[0, 3] = -100
    leaves = (h,) if frozen_head else (h, w)

    def step(h, w):
        return 3 * ops.linear_cross_entropy(h, w, labels)

    assert _count_breaks(step, h, w) == 0
    graphs = torch._dynamo.explain(step)(h, w).graphs
    names = {str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"}
    assert "chronipatch.linear_cross_entropy_with_grad.default" in names
    torch._dynamo.reset()
    eager = step(h, w)
    compiled = torch.compile(step, fullgraph=True)(h, w)
    n_valid = (labels[:, 1:] != -100).sum()
    apart = 3 * ops.linear_cross_entropy(h, w, labels, reduction="none").sum() / n_valid
    assert torch.equal(compiled, eager) and torch.equal(eager, apart)
    wide = [t.detach().double().requires_grad_(t.requires_grad) for t in (h, w)]
    truth = torch.autograd.grad(step(*wide), [t for t in wide if t.requires_grad])
    for a, b, c, t in zip(*(torch.autograd.grad(x, leaves) for x in (compiled, eager, apart)), truth):
        assert torch.equal(a, b)
        ulp = torch.finfo(torch.bfloat16).eps * t.abs().max()
        assert (a.double() - t).abs().max() <= (c.double() - t).abs().max() + ulp


class _Calls(TorchDispatchMode):
    """Records each op run under it: (name, its first argument's shape, its result's shape)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        shape = lambda t: tuple(t.shape) if isinstance(t, torch.Tensor) else None
        self.calls.append((func.__name__, shape(args[0]) if args else None, shape(out)))
        return out


def test_lce_with_grad_backward_allocates_no_zero_gradients():
    """The backward of bf16 training's loss gets no zero tensors for the outputs that carry no gradient (a
    [V, H] of zeros for dW's, at Llama-3.2-1B 0.5 GiB at the backward's start)."""
    h = torch.randn(9, 16, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.bfloat16, requires_grad=True)
    loss = ops.linear_cross_entropy(h, w, torch.randint(0, 50, (9,)), shift=False)
    with _Calls() as mode:
        loss.backward()
    made = [out for name, _, out in mode.calls if name.startswith(("zeros", "new_zeros", "full", "fill"))]
    assert tuple(w.shape) not in made and tuple(h.shape) not in made, made


def test_lce_with_grad_scales_in_place_only_where_the_graph_is_freed():
    """bf16 training's loss keeps dh and dW from its forward; a backward that frees the graph scales them in
    place (no second [V, H] for dW), one that keeps it (retain_graph) or records one (create_graph) makes
    scaled copies, so each backward gives the same gradients."""
    torch.manual_seed(0)
    h = torch.randn(9, 16, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 50, (9,))

    def grads(**kw):
        loss = 3 * ops.linear_cross_entropy(h, w, labels, shift=False)  # an upstream gradient of 3
        runs = []
        for _ in range(2 if kw.get("retain_graph") else 1):
            with _Calls() as mode:
                runs.append(torch.autograd.grad(loss, (h, w), **kw))
            muls = [(name, first) for name, first, _ in mode.calls if name.startswith("mul")]
            assert (("mul_.Tensor", (50, 16)) in muls) == (not kw), muls
        return runs

    (freed,) = grads()
    for kept in (*grads(retain_graph=True), *grads(create_graph=True)):
        for a, b in zip(kept, freed, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_lce_with_grad_refuses_a_second_derivative():
    """The one pass's gradients come from its forward, outside any graph: differentiating them again (an
    upstream gradient with a graph, under create_graph) raises, not keeping only that gradient's part."""
    torch.manual_seed(0)
    h = torch.randn(9, 16, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 50, (9,))
    loss = ops.linear_cross_entropy(h, w, labels, shift=False)
    first = torch.autograd.grad(loss**2, h, create_graph=True)[0]
    assert first.requires_grad  # with a node that refuses, not a silently graph-less tensor
    with pytest.raises(RuntimeError, match="once_differentiable"):
        first.sum().backward()
