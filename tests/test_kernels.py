"""The Triton kernels of RMSNorm, SwiGLU and RoPE themselves, against the torch reference: through the
interpreter on CPU (fp32/fp16, tiny shapes) and natively on CUDA. The loss's: ``test_kernels_lce.py``."""

from __future__ import annotations

import contextlib
import importlib

import pytest
import torch

from chronipatch.ops import reference
from helpers import KERNEL_DEVICE, hf_view, needs_kernels
from helpers import KERNEL_DTYPES as DTYPES
from helpers import KERNEL_TOL as TOL
from helpers import kernel_randn as _r

pytestmark = needs_kernels
rms = importlib.import_module("chronipatch.ops.rms_norm")
swi = importlib.import_module("chronipatch.ops.swiglu")
rope = importlib.import_module("chronipatch.ops.rope")


@pytest.mark.parametrize("rows,n", [(1, 64), (7, 100), (33, 128), (5, 1000)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_kernels(rows, n, dtype):
    torch.manual_seed(rows)
    x, w, dy = _r(rows, n, dtype=dtype, scale=2), _r(n, dtype=dtype), _r(rows, n, dtype=dtype)
    y, rstd = rms.rms_norm_fwd_triton(x, w, 1e-6)
    y_ref, rstd_ref = reference.rms_norm_fwd(x, w, 1e-6)
    torch.testing.assert_close(y, y_ref, **TOL[dtype])
    torch.testing.assert_close(rstd, rstd_ref, rtol=1e-5, atol=1e-6)
    dx, dw = rms.rms_norm_bwd_triton(dy, x, w, rstd)
    dx_ref, dw_ref = reference.rms_norm_bwd(dy, x, w, rstd_ref)
    torch.testing.assert_close(dx, dx_ref, **TOL[dtype])
    torch.testing.assert_close(
        dw.float(), dw_ref.float(), rtol=TOL[dtype]["rtol"], atol=TOL[dtype]["atol"] * rows
    )


@pytest.mark.parametrize("rows,n", [(1, 64), (7, 100), (33, 128)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_backward_writes_the_forwards_output(rows, n, dtype):
    """The backward that also writes y (``rms_norm_linear``'s recompute) writes the forward's y bit for bit,
    and the same dx and dw as the plain backward, also with dx written over dy."""
    torch.manual_seed(rows)
    x, w, dy = _r(rows, n, dtype=dtype, scale=2), _r(n, dtype=dtype), _r(rows, n, dtype=dtype)
    y, rstd = rms.rms_norm_fwd_triton(x, w, 1e-6)
    dx, dw = rms.rms_norm_bwd_triton(dy, x, w, rstd)
    dy_scratch = dy.clone()
    dx2, dw2, y2 = rms.rms_norm_bwd_y_triton(dy_scratch, x, w, rstd, into_dy=True)
    assert dx2.data_ptr() == dy_scratch.data_ptr()
    for a, b in ((y2, y), (dx2, dx), (dw2, dw)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert rms.rms_norm_bwd_y_triton(dy, x, w, rstd, store_y=False)[2] is None


@pytest.mark.parametrize("terms", [2, 3])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_backward_sums_its_gradient_terms(terms, dtype):
    """dy given as 2 or 3 terms (``rms_norm_linear``'s projections' input gradients; one of them rows of a
    wider buffer) is their fp32 sum: the backward of that sum, with dx written over the first term."""
    torch.manual_seed(terms)
    rows, n = 37, 96
    x, w = _r(rows, n, dtype=dtype, scale=2), _r(n, dtype=dtype)
    parts = [_r(rows, n, dtype=dtype) for _ in range(terms - 1)] + [_r(rows, 2 * n, dtype=dtype)[:, n:]]
    _, rstd = rms.rms_norm_fwd_triton(x, w, 1e-6)
    first = parts[0].clone()
    dx, dw, y = rms.rms_norm_bwd_y_triton([first, *parts[1:]], x, w, rstd, into_dy=True)
    assert dx.data_ptr() == first.data_ptr()
    dx_ref, dw_ref = reference.rms_norm_bwd(sum(p.float() for p in parts), x, w, rstd)
    torch.testing.assert_close(dx, dx_ref, **TOL[dtype])
    torch.testing.assert_close(
        dw.float(), dw_ref.float(), rtol=TOL[dtype]["rtol"], atol=TOL[dtype]["atol"] * rows
    )
    torch.testing.assert_close(y, rms.rms_norm_fwd_triton(x, w, 1e-6)[0], rtol=0, atol=0)


# bf16 natively only: the interpreter rounds bf16 stores otherwise than torch (to nearest) does.
@pytest.mark.parametrize("dtype", [*DTYPES, *([torch.bfloat16] if KERNEL_DEVICE == "cuda" else [])])
def test_rms_norm_add_kernels(dtype):
    """The residual form: the forward writes s = r + x bit for bit as torch adds, and its y and rstd are the
    plain kernel's of s (so x is rounded before the norm); the backward adds dx_ext to dx before rounding."""
    torch.manual_seed(5)
    rows, n = 37, 96
    r, w, dy = _r(rows, n, dtype=dtype, scale=3), _r(n, dtype=dtype), _r(rows, n, dtype=dtype)
    x = _r(rows, 2 * n, dtype=dtype)[:, n:]  # a strided view, as an attention output may be
    y, rstd, s = rms.rms_norm_add_fwd_triton(x, r, w, 1e-6)
    torch.testing.assert_close(s, r + x, rtol=0, atol=0)
    y_ref, rstd_ref = rms.rms_norm_fwd_triton(r + x, w, 1e-6)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    torch.testing.assert_close(rstd, rstd_ref, rtol=0, atol=0)
    tol = TOL.get(dtype, dict(rtol=1.6e-2, atol=1.6e-2))
    # s's gradient dense, rows of a wider buffer, and one row broadcast over all (row stride 0, as the
    # gradient of s.sum(0) @ v arrives)
    for ext in (
        _r(rows, n, dtype=dtype),
        _r(rows, 2 * n, dtype=dtype)[:, n:],
        _r(n, dtype=dtype).expand(rows, n),
    ):
        dx, dw, _ = rms.rms_norm_bwd_y_triton(dy, s, w, rstd, dx_ext=ext)
        dx_ref, _ = reference.rms_norm_bwd(dy, s, w, rstd, ext)
        torch.testing.assert_close(dx, dx_ref, **tol)
        torch.testing.assert_close(dw, rms.rms_norm_bwd_triton(dy, s, w, rstd)[1], rtol=0, atol=0)


def test_rms_norm_kernel_strided_rows():
    x = _r(6, 2 * 64, dtype=torch.float32)[:, :64]  # row stride 128, last dim dense
    w = _r(64, dtype=torch.float32)
    torch.testing.assert_close(rms.rms_norm_fwd_triton(x, w, 1e-5)[0], reference.rms_norm_fwd(x, w, 1e-5)[0])


@pytest.mark.parametrize("shape", [(1,), (3, 1000), (5000,)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_kernels(shape, dtype):
    g, u, do = _r(*shape, dtype=dtype, scale=3), _r(*shape, dtype=dtype), _r(*shape, dtype=dtype)
    torch.testing.assert_close(swi.swiglu_fwd_triton(g, u), reference.swiglu_fwd(g, u), **TOL[dtype])
    for a, b in zip(swi.swiglu_bwd_triton(do, g, u), reference.swiglu_bwd(do, g, u)):
        torch.testing.assert_close(a, b, **TOL[dtype])
    *grads, h = swi.swiglu_bwd_h_triton(do, g, u)
    assert torch.equal(h, swi.swiglu_fwd_triton(g, u))  # the forward's product, recomputed bit for bit
    for a, b in zip(grads, swi.swiglu_bwd_triton(do, g, u)):
        assert torch.equal(a, b)
    # into_dout: dgate lands in the caller's dout buffer (swiglu_linear's dh), with the same values.
    for bwd in (swi.swiglu_bwd_h_triton, swi.swiglu_bwd_triton):
        buf = do.clone()
        dg, du = bwd(buf, g, u, into_dout=True)[:2]
        assert dg.data_ptr() == buf.data_ptr()
        assert torch.equal(dg, grads[0]) and torch.equal(du, grads[1])


@pytest.mark.parametrize("need_dw", [True, False], ids=["dw", "frozen"])
def test_swiglu_linear_backward_kernels(need_dw, monkeypatch):
    """The op's backward through the kernels (the recomputing one, or the plain one for a frozen weight)
    against its torch reference path."""
    sl = importlib.import_module("chronipatch.ops.swiglu_linear")
    g, u = _r(3, 5, 40, dtype=torch.float32, scale=3), _r(3, 5, 40, dtype=torch.float32)
    w, do = _r(24, 40, dtype=torch.float32), _r(3, 5, 24, dtype=torch.float32)
    ref = sl._bwd(do.cpu(), g.cpu(), u.cpu(), w.cpu(), need_dw, True)  # CPU tensors: the reference
    monkeypatch.setattr(sl, "on_gpu", lambda t: True)  # the kernels, on KERNEL_DEVICE
    ours = sl._bwd(do, g, u, w, need_dw, True)
    assert ours[2].shape == ((24, 40) if need_dw else (0,))
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.cpu(), b, **TOL[torch.float32])


@pytest.mark.parametrize(
    "b,t,hq,hk,d,cos_b",
    [
        (1, 3, 2, 1, 8, 1),
        (2, 5, 6, 2, 64, 2),
        (1, 4, 3, 3, 24, 1),
        (3, 7, 4, 2, 16, 3),
        (2, 3, 64, 8, 128, 1),
    ],
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_kernels(b, t, hq, hk, d, cos_b, dtype):
    q = hf_view(b, t, hq, d).to(KERNEL_DEVICE, dtype)
    k = hf_view(b, t, hk, d).to(KERNEL_DEVICE, dtype)
    cos, sin = _r(cos_b, t, d, dtype=dtype), _r(cos_b, t, d, dtype=dtype)
    for backward, ref in ((False, reference.rope_fwd), (True, reference.rope_bwd)):
        out = rope.rope_triton(q, k, cos, sin, backward=backward)
        for a, e in zip(out, ref(q, k, cos, sin)):
            torch.testing.assert_close(a, e, **TOL[dtype])
            assert a.transpose(1, 2).is_contiguous()  # [B, T, H, D] memory, as HF's projections lay it out
    for a, e in zip(rope.rope_triton(q, k, cos, sin, dense=True), reference.rope_fwd(q, k, cos, sin)):
        assert a.is_contiguous()
        torch.testing.assert_close(a, e, **TOL[dtype])


def test_rms_norm_backward_idle_programs_store_zero_partials(monkeypatch):
    """More programs than row blocks: the idle ones store zero partials, so an unfilled buffer is safe."""
    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    x, w = _r(65, 2048, dtype=torch.float32), _r(2048, dtype=torch.float32)
    dy = _r(65, 2048, dtype=torch.float32)
    rstd = rms.rms_norm_fwd_triton(x, w, 1e-6)[1]
    monkeypatch.setattr(torch, "empty", nan_empty)
    dx, dw = rms.rms_norm_bwd_triton(dy, x, w, rstd)
    monkeypatch.undo()
    dx_ref, dw_ref = reference.rms_norm_bwd(dy, x, w, rstd)
    torch.testing.assert_close(dx, dx_ref, **TOL[torch.float32])
    torch.testing.assert_close(dw, dw_ref, **TOL[torch.float32])


@pytest.mark.parametrize("progs,n", [(1, 1), (300, 96), (7, 2001)])  # both tiles of the sum, ragged
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_rms_norm_dw_sum(progs, n, dtype):
    """The sum of the backward's fp64 partial rows of dw: torch's sum and cast (16-bit dtypes through fp32, as
    torch casts; fp64 sums in another order may differ in their last bits, far below any cast's), also of a
    strided buffer."""
    part = torch.randn(progs, 2 * n, dtype=torch.float64, device=KERNEL_DEVICE)
    for p in (part[:, :n].contiguous(), part[:, n:]):
        got = rms.dw_sum(p, dtype, wrap=False)
        assert got.dtype == dtype and got.shape == (n,)
        torch.testing.assert_close(got, p.sum(0).to(dtype), rtol=torch.finfo(dtype).eps, atol=1e-12)


def test_rms_norm_backward_of_no_rows():
    """No rows: an empty dx and a zero dw (the one partial row a launch of nothing leaves)."""
    x, dy = (torch.empty(0, 96, device=KERNEL_DEVICE) for _ in range(2))
    dx, dw = rms.rms_norm_bwd_triton(dy, x, _r(96, dtype=torch.float32), torch.empty(0, device=KERNEL_DEVICE))
    assert dx.shape == (0, 96) and torch.equal(dw, torch.zeros(96, device=KERNEL_DEVICE))


def test_direct_launch_runs_on_the_inputs_device(monkeypatch):
    """The eager fast path launches raw kernels (``wrap=False``) on the input's GPU: with no device context
    when that is the current device already (one per call costs ~2 us), with one otherwise; CPU tensors (the
    interpreter) need none."""
    from chronipatch.ops import _utils

    entered, calls = [], []

    def launcher(x, *args, wrap=True, **kwargs):
        calls.append((wrap, args, kwargs))
        return "out"

    @contextlib.contextmanager
    def device(index):
        entered.append(index)
        yield

    class OnGpu:  # a CUDA tensor on GPU ``index``, as far as ``direct`` looks
        def __init__(self, index):
            self.index = index

        def get_device(self):
            return self.index

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", device)
    run = _utils.direct(launcher)
    assert run(OnGpu(0), 1, k=2) == "out" and entered == []
    assert run(OnGpu(1), 1, k=2) == "out" and entered == [1]
    assert run(torch.zeros(1), 1, k=2) == "out" and entered == [1]
    assert calls == [(False, (1,), {"k": 2})] * 3


def test_rope_head_offsets_are_int64():
    """A head stride below 2^31 (an int32 argument) times a head index passes 2^31 for a contiguous
    [B, H, T, D] of H * T * D > 2^31 elements (dense outputs, SDPA's gradients). Three int8 heads 1.5 * 2^30
    apart (a lazily mapped buffer): head 2 reads its own entries, not the ones 2^32 below."""
    stride, base = 3 * 2**29, 2**30
    buf = torch.empty(base + 2 * stride + 2, dtype=torch.int8, device=KERNEL_DEVICE)
    for at, values in ((0, [11, 12]), (base, [1, 2]), (base + stride, [3, 4]), (base + 2 * stride, [21, 22])):
        buf[at : at + 2] = torch.tensor(values, dtype=torch.int8)
    q = buf[base:]
    k = torch.tensor([5, 6], dtype=torch.int8, device=KERNEL_DEVICE)
    cos, sin = torch.ones(2, device=KERNEL_DEVICE), torch.zeros(2, device=KERNEL_DEVICE)
    qo, ko = torch.zeros(3, 2, device=KERNEL_DEVICE), torch.zeros(1, 2, device=KERNEL_DEVICE)
    # (b, h, t) strides of q, k, qo, ko; then (b, t) of cos and sin
    strides = (0, stride, 2, 0, 2, 2, 0, 2, 2, 0, 2, 2, 0, 2, 0, 2)
    rope._rope_kernel[(1,)](
        q, k, cos, sin, qo, ko, 1, 1, *strides, 3, 1, D=2, BLOCK_HQ=4, BLOCK_HK=1, BLOCK_D=2, TOKENS=1,
        BACKWARD=False,
    )  # fmt: skip
    assert qo.tolist() == [[1, 2], [3, 4], [21, 22]]
    del buf


def test_eager_fast_path_functions_run_the_launchers(monkeypatch):
    """The eager fast path (``_*Eager``, taken by the public ops for plain CUDA tensors outside tracing)
    gives the launchers' results and gradients bit for bit, and refuses a double backward."""
    for mod in (rms, swi, rope):  # CPU tensors here: take the direct branch as a CUDA call would
        monkeypatch.setattr(mod, "eager_cuda", lambda *tensors: True)
    torch.manual_seed(0)
    x, w = _r(7, 100, dtype=torch.float32), _r(100, dtype=torch.float32)
    g, u = _r(5, 33, dtype=torch.float32), _r(5, 33, dtype=torch.float32)
    q, k = hf_view(2, 5, 4, 16).to(KERNEL_DEVICE), hf_view(2, 5, 2, 16).to(KERNEL_DEVICE)
    cos, sin = _r(1, 5, 16, dtype=torch.float32), _r(1, 5, 16, dtype=torch.float32)
    cases = [
        (lambda a, b: rms._RMSNormEager.apply(a, b, 1e-6), (x, w)),
        (swi._SwiGLUEager.apply, (g, u)),
        (lambda a, b: rope._RoPEEager.apply(a, b, cos, sin, False), (q, k)),
        (lambda a, b: rope._RoPEEager.apply(a, b, cos, sin, True), (q, k)),
    ]
    launched = [
        lambda go, a, b: (
            rms.rms_norm_fwd_triton(a, b, 1e-6)[0],
            *rms.rms_norm_bwd_triton(go[0], a, b, rms.rms_norm_fwd_triton(a, b, 1e-6)[1]),
        ),
        lambda go, a, b: (swi.swiglu_fwd_triton(a, b), *swi.swiglu_bwd_triton(go[0], a, b)),
        lambda go, a, b: (
            *rope.rope_triton(a, b, cos, sin),
            *rope.rope_triton(go[0], go[1], cos, sin, backward=True),
        ),
        lambda go, a, b: (
            *rope.rope_triton(a, b, cos, sin, dense=True),
            *rope.rope_triton(go[0], go[1], cos, sin, backward=True),
        ),
    ]
    nodes = ["_RMSNormEagerBackward", "_SwiGLUEagerBackward", "_RoPEEagerBackward", "_RoPEEagerBackward"]
    for (fast, inputs), manual, node in zip(cases, launched, nodes):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        out = fast(*leaves)
        outs = out if isinstance(out, tuple) else (out,)
        assert type(outs[0].grad_fn).__name__ == node  # named after its op in profiles
        grads = [torch.randn_like(o) for o in outs]
        got = [*outs, *torch.autograd.grad(outs, leaves, grads)]
        for a, b in zip(got, manual(grads, *inputs)):
            assert torch.equal(a, b) and a.stride() == b.stride()  # rope's dense layout too
        # The kernels' gradients carry no graph: a second derivative is an error, never a silent zero.
        again = fast(*leaves)
        again = again if isinstance(again, tuple) else (again,)
        first = torch.autograd.grad(sum((o**2).sum() for o in again), leaves[0], create_graph=True)[0]
        assert first.requires_grad  # with a node that refuses, not a silently graph-less tensor
        with pytest.raises(RuntimeError, match="once_differentiable"):
            first.sum().backward()
